"""Revocation end to end: `stctl pki revoke` on a private copy of the published workspace (served
on 127.0.0.1), and a real `st-agent serve` process (st-demo 1.0.0 active) that learns of it with
an update job or with its periodic CRL refresh, then refuses the revoked certificate at the TLS
handshake while every other client keeps working. Also the update channel's CRL rules with the
release client in-process: a repository without a CRL, with one, and a bundle that carries none.

The attacks: a stolen device certificate, or a leaked operator key, still managing devices after
the operator revoked it; a revocation that never reaches a device that gets no update."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from agent.blobstore import BlobStore
from agent.revocation import DeviceCrl
from agent.tuf_client import ReleaseClient, verify_bundle
from agent_helpers import Fleet, set_limits
from agent.config import load_config
from manifests.enrollment import Enrollment
from manifests.release import CRL_TARGET
from release_helpers import serve
from revocation_helpers import REFUSED, handshake
from stctl.bundle import export_bundle
from stctl.cli import app as stctl_app
from stctl.enroll import enroll_device
from stctl.repository import Repository
from stctl.workspace import open_workspace

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow


@pytest.fixture
def private(fleet, tmp_path):
    """(a copy of the session's workspace served at its own URL, pc2's certificate and key)."""
    shutil.copytree(fleet.workspace.root, tmp_path / "fleet")
    ws = open_workspace(tmp_path / "fleet")
    with serve(ws.repository) as url:
        enroll_device(ws, "stolen-pc", "https://127.0.0.1:8443", tmp_path / "pc2.enroll", url)
        pc2 = Enrollment.from_bytes((tmp_path / "pc2.enroll").read_bytes())
        (tmp_path / "pc2.crt").write_text(pc2.device_cert_pem)
        (tmp_path / "pc2.key").write_text(pc2.device_key_pem)
        yield Fleet(ws, url, fleet.enrollment), (tmp_path / "pc2.crt", tmp_path / "pc2.key")


def point_at(data_dir: Path, repository_url: str, **limits) -> None:
    """The device fetches from `repository_url` (its updates and its CRL refresh)."""
    path = data_dir / "agent.json"
    config = json.loads(path.read_text())
    config["repository_url"] = repository_url
    path.write_text(json.dumps(config))
    set_limits(data_dir, **limits)


def stctl(ws, *args: str) -> dict:
    result = CliRunner().invoke(stctl_app, ["pki", *args, "--workspace", str(ws.root), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def held_number(data_dir: Path) -> int | None:
    crl = DeviceCrl(load_config(data_dir)).current()
    return crl.number if crl else None


def test_stolen_device_certificate_is_refused_by_a_running_agent_after_its_next_update(
        private, device_dir, agent_factory):
    fleet, pc2 = private
    point_at(device_dir, fleet.repository_url)
    agent = agent_factory(device_dir, fleet).start()
    ca, operator = fleet.pki / "ca.crt", (fleet.pki / "operator.crt", fleet.pki / "operator.key")
    assert handshake(agent.port, ca, *pc2) == "ok"
    revoked = stctl(fleet.workspace, "revoke", "device", "stolen-pc")
    assert handshake(agent.port, ca, *pc2) == "ok"  # the device has not fetched the CRL yet
    job = agent.wait_job(agent.update("2.0.0"))
    assert job["state"] == "active", job
    assert held_number(device_dir) == revoked["crl_number"] == 1
    assert handshake(agent.port, ca, *pc2) == REFUSED
    with agent.client(*pc2) as thief, pytest.raises(requests.exceptions.RequestException):
        thief.get(agent.url("/v1/status"), timeout=30)  # default TLS (1.3) is refused too
    assert handshake(agent.port, ca, *operator) == "ok"
    with agent.client(*operator) as admin:
        assert admin.get(agent.url("/v1/status"), timeout=30).json()["active"]["version"] == "2.0.0"
    assert agent.client().get(agent.url("/healthz"), timeout=30).text == "ok"  # no certificate: unaffected
    assert agent.complete()["system_fingerprint"] == "st-demo@2.0.0"
    assert agent.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled


def test_leaked_operator_certificate_is_refused_after_the_periodic_refresh_and_the_new_one_works(
        private, device_dir, agent_factory, tmp_path):
    fleet, _ = private
    point_at(device_dir, fleet.repository_url, crl_refresh_s=0.5)
    agent = agent_factory(device_dir, fleet).start()
    ca = fleet.pki / "ca.crt"
    leaked = tuple(Path(shutil.copy(fleet.pki / name, tmp_path / name)) for name in ("operator.crt", "operator.key"))
    assert handshake(agent.port, ca, *leaked) == "ok"
    revoked = stctl(fleet.workspace, "revoke", "operator")
    deadline = time.monotonic() + 60
    while held_number(device_dir) != revoked["crl_number"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held_number(device_dir) == revoked["crl_number"], agent.log.read_text()[-2000:]
    assert handshake(agent.port, ca, *leaked) == REFUSED
    with agent.client(*leaked) as attacker, pytest.raises(requests.exceptions.RequestException):
        attacker.get(agent.url("/v1/status"), timeout=30)
    with agent.client(fleet.pki / "operator.crt", fleet.pki / "operator.key") as operator:
        r = operator.get(agent.url("/v1/status"), timeout=30)
    assert r.status_code == 200 and r.json()["active"]["version"] == "1.0.0"
    assert agent.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled


def test_update_channel_takes_the_crl_when_published_and_never_needs_one(private, fleet, tmp_path):
    """A repository without a CRL and a bundle without one still install; with one, the fetch hands it over
    (from a bundle too: `stctl bundle export` puts it in)."""
    copy, _ = private
    trusted_root = (fleet.workspace.metadata_dir / "1.root.json").read_bytes()
    store = BlobStore(tmp_path / "store")
    seen: list[bytes] = []

    def fetch(url: str, folder: str):
        return ReleaseClient(tmp_path / folder, url, trusted_root, store, on_crl=seen.append).fetch_release(
            "st-demo", "1.0.0")

    assert fetch(fleet.repository_url, "tuf-old").manifest.version == "1.0.0" and seen == []  # an older fleet
    before = export_bundle(copy.workspace, "st-demo", "2.0.0", tmp_path / "before.bundle", from_version="1.0.0")
    stctl(copy.workspace, "revoke", "device", "stolen-pc")
    assert fetch(copy.repository_url, "tuf-new").shards_downloaded == 0
    crl = Repository(copy.workspace).target_bytes(CRL_TARGET)
    assert seen == [crl]
    release = verify_bundle(before["bundle"], trusted_root, tmp_path / "tuf-bundle", store, on_crl=seen.append)
    assert release.manifest.version == "2.0.0" and seen == [crl]  # a bundle without a CRL: not an error
    after = export_bundle(copy.workspace, "st-demo", "2.0.0", tmp_path / "after.bundle", from_version="1.0.0")
    verify_bundle(after["bundle"], trusted_root, tmp_path / "tuf-bundle-2", store, on_crl=seen.append)
    assert seen == [crl, crl]  # bundles carry the CRL: air-gapped devices learn revocations too
