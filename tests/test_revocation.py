"""Revocation of fleet certificates, without a model: `stctl pki revoke|renew-operator` on a fresh
workspace whose repository is served on 127.0.0.1, a device data dir made from a real enrollment,
and the device's real TLS context (`agent.server.tls_context`) behind an asyncio TLS server, used
per connection as uvicorn's loop uses it. Handshakes use TLS 1.2, so a refused client certificate
shows as the alert the device sent during the handshake.

The attacks: a stolen device certificate or a leaked operator key still working after `stctl pki
revoke`; a forged or rolled-back CRL taken by the device; a CRL withheld or swapped by the
repository going unnoticed; an expired or future-dated CRL locking every client out; a device
impersonated with a revoked certificate fooling stctl."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import CliRunner

from agent.enrollment import init_data_dir
from cli_helpers import assert_one_error_line
from agent.errors import DownloadError, VerificationError
from agent.revocation import CRL_METADATA_DIR, CrlRefresher, DeviceCrl, RevocationError, crl_file
from agent.server import tls_context
from agent.tuf_client import fetch_crl
from manifests.crl import read_crl
from manifests.enrollment import Enrollment
from manifests.release import CRL_TARGET
from release_helpers import serve
from revocation_helpers import REVOKED, TlsServer, make_crl
from stctl.bootstrap import init_workspace
from stctl.cli import app as stctl_app
from stctl.enroll import EnrollmentError, enroll_device
from stctl.pki import load_ca
from stctl.repository import Repository
from stctl.revocation import CrlCheckingAdapter, renew_operator, revoke_device, revoke_operator

DEVICE_URL = "https://127.0.0.1:8443"


class Fleet:
    """A fresh workspace with pc1 and pc2 enrolled (repository at `url`) and pc1's data dir."""

    def __init__(self, ws, url: str, root: Path):
        self.ws, self.url, self.root = ws, url, root
        self.pki = ws.pki_dir
        self.ca = self.pki / "ca.crt"
        for name in ("pc1", "pc2"):
            enroll_device(ws, name, DEVICE_URL, root / f"{name}.enroll", url)
        self.config = init_data_dir(root / "pc1.enroll", root / "pc1")
        self.pc2 = self.credentials(root / "pc2.enroll")

    def credentials(self, enrollment_file: Path) -> tuple[Path, Path]:
        """(certificate, key) files of the device an enrollment file is for."""
        e = Enrollment.from_bytes(enrollment_file.read_bytes())
        folder = self.root / f"{e.name}-{enrollment_file.stem}-credentials"
        folder.mkdir(exist_ok=True)
        (folder / "device.crt").write_text(e.device_cert_pem)
        (folder / "device.key").write_text(e.device_key_pem)
        return folder / "device.crt", folder / "device.key"

    def operator(self, keep_as: str | None = None) -> tuple[Path, Path]:
        """The current operator certificate and key (copied aside as `keep_as`, to outlive a renewal)."""
        pair = (self.pki / "operator.crt", self.pki / "operator.key")
        if keep_as is None:
            return pair
        (self.root / keep_as).mkdir()
        return tuple(Path(shutil.copy(p, self.root / keep_as / p.name)) for p in pair)

    def published(self) -> bytes:
        return Repository(self.ws).target_bytes(CRL_TARGET)

    def held(self):
        return DeviceCrl(self.config).current()


@pytest.fixture
def fleet(tmp_path):
    ws = init_workspace(tmp_path / "fleet")
    with serve(ws.repository) as url:
        yield Fleet(ws, url, tmp_path)


def days_valid(cert_file: Path) -> float:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return (cert.not_valid_after_utc - datetime.now(timezone.utc)) / timedelta(days=1)


# ---- enforcement at the handshake ------------------------------------------------------------------

def test_stolen_device_and_leaked_operator_certificates_are_refused_at_the_next_handshake(fleet):
    ctx = tls_context(fleet.config)
    old_operator = fleet.operator(keep_as="old-operator")
    with TlsServer(ctx) as server:
        assert server.handshake(fleet.ca, *fleet.pc2) == "ok"
        revoke_device(fleet.ws, "pc2")
        assert DeviceCrl(fleet.config).take(fleet.published())
        assert server.handshake(fleet.ca, *fleet.pc2) == REVOKED
        assert server.handshake(fleet.ca, *old_operator) == "ok"
        assert server.handshake(fleet.ca) == "ok"  # no certificate: completions, /healthz

        result = revoke_operator(fleet.ws)
        assert DeviceCrl(fleet.config).take(fleet.published())
        assert server.handshake(fleet.ca, *old_operator) == REVOKED
        assert ctx.cert_store_stats()["crl"] == 2  # both loaded in the live context: OpenSSL enforced the newer
        assert server.handshake(fleet.ca, *fleet.pc2) == REVOKED
        assert server.handshake(fleet.ca, *fleet.operator()) == "ok"  # the new operator certificate
        assert server.handshake(fleet.ca) == "ok"
    assert result["crl_number"] == 2 and fleet.held().number == 2
    with TlsServer(tls_context(fleet.config)) as restarted:  # a restart enforces the held CRL at once
        assert restarted.handshake(fleet.ca, *old_operator) == REVOKED
        assert restarted.handshake(fleet.ca, *fleet.operator()) == "ok"


@pytest.mark.parametrize("forgery", ["other-key", "other-ca", "same-number", "lower-number", "future",
                                     "expired", "not-a-crl"])
def test_forged_rolled_back_or_unusable_crl_is_refused_and_the_held_one_stays(fleet, tmp_path, forgery):
    revoke_device(fleet.ws, "pc2")
    revoke_operator(fleet.ws)
    device = DeviceCrl(fleet.config)
    assert device.take(fleet.published())
    held = crl_file(fleet.config).read_bytes()
    ca_key, ca_cert = load_ca(fleet.ws)
    now = datetime.now(timezone.utc)
    evil = init_workspace(tmp_path / "evil")
    pem = {
        "other-key": lambda: make_crl(ec.generate_private_key(ec.SECP256R1()), ca_cert.subject, 99),
        "other-ca": lambda: make_crl(load_ca(evil)[0], load_ca(evil)[1].subject, 99),
        "same-number": lambda: make_crl(ca_key, ca_cert.subject, 2),  # the number held, other content
        "lower-number": lambda: make_crl(ca_key, ca_cert.subject, 1),
        "future": lambda: make_crl(ca_key, ca_cert.subject, 99, last_update=now + timedelta(hours=2)),
        "expired": lambda: make_crl(ca_key, ca_cert.subject, 99, last_update=now - timedelta(days=2),
                                    next_update=now - timedelta(days=1)),
        "not-a-crl": lambda: ca_cert.public_bytes(Encoding.PEM),
    }[forgery]()
    with pytest.raises(RevocationError):
        device.take(pem)
    device.offer(pem)  # the update channel's way: logged, not raised
    assert crl_file(fleet.config).read_bytes() == held
    with TlsServer(tls_context(fleet.config)) as server:
        assert server.handshake(fleet.ca, *fleet.pc2) == REVOKED
        assert server.handshake(fleet.ca, *fleet.operator()) == "ok"  # never locked out


def test_crl_numbers_and_issue_times_only_grow_even_within_one_second(fleet):
    pems = []
    for revoke in (lambda: revoke_device(fleet.ws, "pc2"), lambda: revoke_operator(fleet.ws),
                   lambda: revoke_operator(fleet.ws)):
        revoke()
        pems.append(fleet.published())
    _, ca_cert = load_ca(fleet.ws)
    crls = [read_crl(pem, ca_cert) for pem in pems]
    assert [c.number for c in crls] == [1, 2, 3]
    assert crls[0].last_update < crls[1].last_update < crls[2].last_update  # OpenSSL enforces the latest
    assert crls[0].revoked < crls[1].revoked < crls[2].revoked  # a revocation is never dropped
    assert all(c.next_update - datetime.now(timezone.utc) > timedelta(days=3000) for c in crls)
    assert all(c.usable_at(datetime.now(timezone.utc) - timedelta(hours=12)) for c in crls)  # a slow clock
    device = DeviceCrl(fleet.config)
    assert device.take(pems[0]) and device.take(pems[2])
    assert not device.take(pems[2])  # the same CRL again: nothing to do
    with pytest.raises(RevocationError, match="not newer"):
        device.take(pems[1])
    assert fleet.held().number == 3


# ---- the way to the device: TUF, the periodic refresh, enrollment ---------------------------------

def test_repository_without_a_crl_is_not_an_error(fleet):
    assert fetch_crl(fleet.root / "meta", fleet.url, (fleet.ws.metadata_dir / "1.root.json").read_bytes()) is None
    assert CrlRefresher(fleet.config).refresh() is False
    assert not crl_file(fleet.config).exists()
    with TlsServer(tls_context(fleet.config)) as server:
        assert server.handshake(fleet.ca, *fleet.pc2) == "ok"


@pytest.mark.parametrize("attack", ["withheld", "swapped"])
def test_crl_withheld_or_swapped_by_the_repository_fails_the_fetch(fleet, attack):
    revoke_device(fleet.ws, "pc2")
    stored = Repository(fleet.ws).target_file(CRL_TARGET)
    if attack == "withheld":
        stored.unlink()
    else:  # a CRL the CA really signed, but not the one the targets metadata lists
        ca_key, ca_cert = load_ca(fleet.ws)
        stored.write_bytes(make_crl(ca_key, ca_cert.subject, 7))
    with pytest.raises(DownloadError if attack == "withheld" else VerificationError):
        CrlRefresher(fleet.config).refresh()
    assert not crl_file(fleet.config).exists()


def test_periodic_refresh_learns_of_a_revocation_without_any_update(fleet):
    config = replace(fleet.config, limits=replace(fleet.config.limits, crl_refresh_s=0.2))
    refresher = CrlRefresher(config)
    refresher.start()
    try:
        revoke_device(fleet.ws, "pc2")
        deadline = time.monotonic() + 60
        while (fleet.held() is None or fleet.held().number < 1) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        refresher.stop(30)
    assert fleet.held() is not None and fleet.held().pem == fleet.published()
    assert (config.data_dir / CRL_METADATA_DIR / "timestamp.json").exists()  # its own folder, never tuf/
    assert not (config.tuf_dir / "timestamp.json").exists()


def test_enrollment_hands_over_the_crl_and_a_revoked_device_name_can_be_enrolled_again(fleet):
    with pytest.raises(EnrollmentError, match="already enrolled"):
        enroll_device(fleet.ws, "pc2", DEVICE_URL, fleet.root / "pc2-again.enroll", fleet.url)
    revoke_device(fleet.ws, "pc2")
    enroll_device(fleet.ws, "pc2", DEVICE_URL, fleet.root / "pc2-new.enroll", fleet.url)
    new_pc2 = fleet.credentials(fleet.root / "pc2-new.enroll")
    config = init_data_dir(fleet.root / "pc2-new.enroll", fleet.root / "pc2-new")
    assert DeviceCrl(config).current().pem == fleet.published()
    with TlsServer(tls_context(config)) as server:
        assert server.handshake(fleet.ca, *fleet.pc2) == REVOKED  # the stolen one
        assert server.handshake(fleet.ca, *new_pc2) == "ok"  # the replacement
    again = revoke_device(fleet.ws, "pc2")  # only the new certificate is left to revoke
    assert again["revoked_serials"] == [f"{x509.load_pem_x509_certificate(new_pc2[0].read_bytes()).serial_number:x}"]


# ---- the operator certificate ----------------------------------------------------------------------

def test_operator_certificate_lives_90_days_and_revoke_cuts_off_every_earlier_one(fleet):
    assert 89 < days_valid(fleet.pki / "operator.crt") <= 90
    first = fleet.operator(keep_as="first")
    renewed = renew_operator(fleet.ws)
    assert 89 < days_valid(fleet.pki / "operator.crt") <= 90
    second = fleet.operator(keep_as="second")
    renew_operator(fleet.ws, days=30)
    assert 29 < days_valid(fleet.pki / "operator.crt") <= 30
    assert renewed["replaced_serial"] != renewed["operator_serial"]
    with TlsServer(tls_context(fleet.config)) as server:
        assert server.handshake(fleet.ca, *first) == "ok"  # a renewal leaves the old one valid
        revoked = revoke_operator(fleet.ws)
        assert len(revoked["revoked_serials"]) == 3  # the one from init and both renewals
        DeviceCrl(fleet.config).take(fleet.published())
        assert server.handshake(fleet.ca, *first) == REVOKED
        assert server.handshake(fleet.ca, *second) == REVOKED
        assert server.handshake(fleet.ca, *fleet.operator()) == "ok"
    assert 89 < days_valid(fleet.pki / "operator.crt") <= 90


# ---- stctl as the client of a device ---------------------------------------------------------------

def test_stctl_refuses_a_device_that_presents_a_revoked_certificate(fleet):
    def session() -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify = str(fleet.ca)
        s.cert = tuple(str(p) for p in fleet.operator())
        s.mount("https://", CrlCheckingAdapter(fleet.pki))
        return s

    with TlsServer(tls_context(fleet.config)) as impostor:  # serves with pc1's certificate
        url = f"https://127.0.0.1:{impostor.port}/v1/status"
        with session() as s:
            assert s.get(url, timeout=30).text == "ok"
        revoke_device(fleet.ws, "pc1")
        with session() as s, pytest.raises(requests.exceptions.SSLError, match="certificate revoked"):
            s.get(url, timeout=30)


# ---- the command line ------------------------------------------------------------------------------

def stctl(fleet, *args: str):
    return CliRunner().invoke(stctl_app, ["pki", *args, "--workspace", str(fleet.ws.root)])


def test_cli_revokes_and_renews_and_each_refusal_is_one_line(fleet):
    done = stctl(fleet, "revoke", "device", "pc2", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["crl_number"] == 1
    assert_one_error_line(stctl(fleet, "revoke", "device", "pc2"), "already revoked (CRL 1)")
    assert_one_error_line(stctl(fleet, "revoke", "device", "pc9"), "no device named 'pc9'")
    assert_one_error_line(stctl(fleet, "revoke", "device", "[/PATH]"), "[/PATH]")  # text, never markup
    assert_one_error_line(stctl(fleet, "renew-operator", "--days", "0"), "--days 0")
    assert_one_error_line(stctl(fleet, "renew-operator", "--days", "100000"), "from 1 to 825")
    before = (fleet.pki / "operator.crt").read_bytes()
    done = stctl(fleet, "revoke", "operator")
    assert done.exit_code == 0, done.output
    assert "new operator certificate" in " ".join(done.stdout.split())
    assert (fleet.pki / "operator.crt").read_bytes() != before
    done = stctl(fleet, "renew-operator", "--json")
    assert done.exit_code == 0 and 89 < days_valid(Path(json.loads(done.stdout)["operator_cert"])) <= 90
    assert read_crl(fleet.published(), load_ca(fleet.ws)[1]).number == 2  # a renewal publishes nothing
