"""Revocation of fleet certificates: `stctl pki revoke device NAME|operator`, `stctl pki renew-operator`.

Rules:
- every certificate the CA issues to a device (`stctl device enroll`) or to the operator (revoke,
  renew) is recorded in fleet.db `certificates` (serial as hex, role, name, not_after, issued_at,
  revoked_at; migration 24), before it is written out. The operator certificate `stctl init`
  wrote is recorded from `pki/operator.crt` by the first renew or revoke, before it is replaced.
  A device enrolled before migration 24 has no row: its serial is unknown and it cannot be
  revoked by name (re-enroll it under a new name).
- the published CRL is the signed TUF target `pki/crl.pem` (`manifests.release.CRL_TARGET`),
  put there by the repository's own publish path (`Repository.stage_target` + `commit`: new
  targets, snapshot and timestamp; the timestamp write is the commit point for devices). It is
  the truth about what is revoked; `pki/crl.pem` is a copy for stctl's own TLS clients
  (`CrlCheckingAdapter`) and for openssl, written after each publish.
- a new CRL lists every serial of the published CRL plus every serial fleet.db marks revoked plus
  the new ones, so no crash between the steps ever drops a revocation; its CRL number is the
  published one + 1; its lastUpdate is `now - CLOCK_SKEW` but always at least one second after
  the published CRL's (OpenSSL enforces the CRL with the latest lastUpdate, and a device whose
  clock is up to `CLOCK_SKEW` behind still accepts it); its nextUpdate is `CRL_VALIDITY` (10
  years) away, because freshness comes from TUF and a CRL past nextUpdate would lock devices out.
- a revoke checks its input and loads every key (CA and TUF, passphrase included) before the
  first write, holds the workspace lock throughout, and writes in this order: fleet.db (new
  certificates, revoked_at), the new operator credentials (operator only), the CRL target and
  metadata, `pki/crl.pem`. A certificate counts as revoked once the published CRL lists it, so a
  revoke that failed half-way is simply run again.
- revoking the operator revokes every operator certificate not yet expired (the current one and
  any earlier one `renew-operator` replaced) and writes a new one in `pki/`, so the operator is
  never locked out; `renew-operator` writes a fresh certificate (90 days by default) and leaves
  the one it replaces valid until it expires.
"""
from __future__ import annotations

import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlite_utils
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from requests.adapters import HTTPAdapter
from urllib3.util.ssl_ import create_urllib3_context

from manifests import ManifestError
from manifests.crl import FleetCrl, enforce_crl, read_crl
from manifests.enrollment import ROLE_DEVICE, ROLE_OPERATOR
from manifests.names import check_name
from manifests.release import CRL_TARGET
from common.files import atomic_write
from stctl.errors import StctlError, WorkspaceError
from stctl.fleetdb import open_fleet_db
from stctl.pki import (
    MAX_OPERATOR_DAYS, OPERATOR_VALIDITY, issue_operator_cert, load_ca, load_ca_cert, write_operator_credentials,
)
from stctl.repository import Repository, State
from stctl.workspace import Workspace

CRL_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(days=1)
CRL_COPY = "crl.pem"  # in pki/


class RevocationError(StctlError):
    """A certificate cannot be revoked or renewed (unknown device, already revoked, bad CRL)."""




def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def serial_hex(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:x}"


def certificate_row(cert_pem: bytes, role: str, name: str) -> dict:
    """The `certificates` row of a certificate just issued (insert it in the caller's transaction)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return {"serial": serial_hex(cert), "role": role, "name": name,
            "sha256": cert.fingerprint(hashes.SHA256()).hex(), "not_after": cert.not_valid_after_utc.isoformat(),
            "issued_at": _now().isoformat(), "revoked_at": None}


def published_crl(workspace: Workspace, state: State | None = None) -> FleetCrl | None:
    """The CRL the repository publishes now (None before the first revocation)."""
    pem = Repository(workspace).target_bytes(CRL_TARGET, state)
    if pem is None:
        return None
    try:
        return read_crl(pem, load_ca_cert(workspace))
    except ManifestError as e:
        raise WorkspaceError(f"the published {CRL_TARGET}: {e}") from None


def device_revoked(workspace: Workspace, db: sqlite_utils.Database, name: str) -> bool:
    """Whether device `name` has certificates and the published CRL lists every one (so it may be
    enrolled again)."""
    serials = {int(r["serial"], 16) for r in _certificates(db, ROLE_DEVICE, name)}
    crl = published_crl(workspace) if serials else None
    return bool(serials) and crl is not None and serials <= crl.revoked


def _certificates(db: sqlite_utils.Database, role: str, name: str | None = None) -> list[dict]:
    where, args = ("role = ? AND name = ?", [role, name]) if name is not None else ("role = ?", [role])
    return list(db["certificates"].rows_where(where, args)) if db["certificates"].exists() else []


def _sign_crl(ca_key, ca_cert: x509.Certificate, previous: FleetCrl | None,
              revoked: dict[int, datetime]) -> FleetCrl:
    now = _now()
    last_update = now - CLOCK_SKEW
    if previous is not None:
        last_update = max(last_update, previous.last_update + timedelta(seconds=1))
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(last_update).next_update(now + CRL_VALIDITY)
               .add_extension(x509.CRLNumber((previous.number if previous else 0) + 1), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(Encoding.PEM)
    return read_crl(pem, ca_cert)


def _revoke(workspace: Workspace, db: sqlite_utils.Database, serials: set[int],
            new_operator: tuple[bytes, bytes] | None = None) -> tuple[FleetCrl, int]:
    """Publish a CRL that adds `serials` (the caller holds the workspace lock and checked its input).
    Returns (the CRL, the new targets version)."""
    repo = Repository(workspace)
    state = repo.state()
    signers = repo.signers(["targets", "snapshot", "timestamp"], state)
    ca_key, ca_cert = load_ca(workspace)
    previous = published_crl(workspace, state)
    now = _now()
    revoked = {entry.serial_number: entry.revocation_date_utc for entry in previous.crl} if previous else {}
    for serial, revoked_at in db.execute("SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL"):
        revoked.setdefault(int(serial, 16), datetime.fromisoformat(revoked_at))
    for serial in serials:
        revoked.setdefault(serial, now)
    crl = _sign_crl(ca_key, ca_cert, previous, revoked)
    with db.atomic():
        if new_operator is not None:
            db["certificates"].insert(certificate_row(new_operator[1], ROLE_OPERATOR, "operator"))
        for serial in serials:
            db.execute("UPDATE certificates SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                       [now.isoformat(), f"{serial:x}"])
    if new_operator is not None:
        write_operator_credentials(workspace.pki_dir, *new_operator)
    repo.stage_target(state, CRL_TARGET, crl.pem)
    repo.commit(state, signers, targets_changed=True)
    atomic_write(workspace.pki_dir / CRL_COPY, crl.pem)
    return crl, state.targets.signed.version


def revoke_device(workspace: Workspace, name: str) -> dict:
    """Revoke device `name`'s certificate(s) and publish the new CRL."""
    try:
        check_name(name, "device name")
    except ManifestError as e:
        raise RevocationError(str(e)) from None
    with workspace.lock():
        db = open_fleet_db(workspace.fleet_db)
        try:
            rows = _certificates(db, ROLE_DEVICE, name)
            if not rows:
                enrolled = db["devices"].exists() and db["devices"].count_where("name = ?", [name])
                raise RevocationError(
                    f"device {name!r}: its certificate serial was not recorded (enrolled before stctl recorded "
                    "serials); re-enroll the device under a new name" if enrolled else
                    f"no device named {name!r} is enrolled in this workspace")
            listed = published_crl(workspace)
            serials = {int(r["serial"], 16) for r in rows} - (listed.revoked if listed else set())
            if not serials:
                raise RevocationError(f"device {name!r} is already revoked (CRL {listed.number})")
            crl, targets_version = _revoke(workspace, db, serials)
        finally:
            db.close()
    return {"device": name, "revoked_serials": sorted(f"{s:x}" for s in serials), "crl_number": crl.number,
            "crl_revoked": len(crl.revoked), "targets_version": targets_version}


def revoke_operator(workspace: Workspace, validity: timedelta = OPERATOR_VALIDITY) -> dict:
    """Revoke every operator certificate not yet expired, write a new one, publish the new CRL."""
    with workspace.lock():
        db = open_fleet_db(workspace.fleet_db)
        try:
            now = _now()
            listed = published_crl(workspace)
            already = listed.revoked if listed else frozenset()
            _remember_current_operator(workspace, db)
            serials = {int(r["serial"], 16) for r in _certificates(db, ROLE_OPERATOR)
                       if datetime.fromisoformat(r["not_after"]) > now} - already
            new_operator = issue_operator_cert(workspace, validity)
            crl, targets_version = _revoke(workspace, db, serials, new_operator)
        finally:
            db.close()
    new = x509.load_pem_x509_certificate(new_operator[1])
    return {"revoked_serials": sorted(f"{s:x}" for s in serials), "crl_number": crl.number,
            "crl_revoked": len(crl.revoked), "targets_version": targets_version,
            "operator_cert": str(workspace.pki_dir / "operator.crt"), "operator_serial": serial_hex(new),
            "operator_not_after": new.not_valid_after_utc.isoformat()}


def renew_operator(workspace: Workspace, days: int = OPERATOR_VALIDITY.days) -> dict:
    """Write a fresh operator certificate valid `days` days (the old one stays valid until it expires)."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_OPERATOR_DAYS:
        raise RevocationError(f"--days {days!r}: expected a whole number of days from 1 to {MAX_OPERATOR_DAYS}")
    with workspace.lock():
        key_pem, cert_pem = issue_operator_cert(workspace, timedelta(days=days))
        db = open_fleet_db(workspace.fleet_db)
        try:
            replaced = _remember_current_operator(workspace, db)  # once replaced, only fleet.db knows it
            with db.atomic():  # recorded before it is written: `revoke operator` must know of it
                db["certificates"].insert(certificate_row(cert_pem, ROLE_OPERATOR, "operator"))
        finally:
            db.close()
        write_operator_credentials(workspace.pki_dir, key_pem, cert_pem)
    new = x509.load_pem_x509_certificate(cert_pem)
    return {"operator_cert": str(workspace.pki_dir / "operator.crt"), "operator_serial": serial_hex(new),
            "operator_not_after": new.not_valid_after_utc.isoformat(), "replaced_serial": serial_hex(replaced),
            "replaced_not_after": replaced.not_valid_after_utc.isoformat()}


def _remember_current_operator(workspace: Workspace, db: sqlite_utils.Database) -> x509.Certificate:
    """`pki/operator.crt`, recorded in `certificates` if it is not yet (the one `stctl init` wrote)."""
    path = workspace.pki_dir / "operator.crt"
    try:
        pem = path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except FileNotFoundError:
        raise WorkspaceError(f"{path}: missing; this workspace has no operator certificate") from None
    except ValueError:
        raise WorkspaceError(f"{path}: not a PEM certificate") from None
    with db.atomic():
        db["certificates"].insert(certificate_row(pem, ROLE_OPERATOR, "operator"), ignore=True)
    return cert


def crl_checking_context(pki_dir: Path) -> ssl.SSLContext:
    """An SSL context for stctl's clients of devices: verifies against the fleet CA and, once the
    workspace has a CRL (`pki/crl.pem`), refuses a revoked device certificate."""
    ctx = create_urllib3_context()
    ctx.load_verify_locations(cafile=str(pki_dir / "ca.crt"))
    path = pki_dir / CRL_COPY
    if path.exists():
        try:
            crl = read_crl(path.read_bytes(), x509.load_pem_x509_certificate((pki_dir / "ca.crt").read_bytes()))
        except (ManifestError, ValueError) as e:
            raise WorkspaceError(f"{path}: {e}") from None
        enforce_crl(ctx, crl)
    return ctx


class CrlCheckingAdapter(HTTPAdapter):
    """requests transport whose TLS refuses device certificates the workspace's CRL revokes
    (`session.mount("https://", CrlCheckingAdapter(pki_dir))`; `session.verify` stays the CA file)."""

    def __init__(self, pki_dir: Path, **kwargs):
        self._ssl_context = crl_checking_context(pki_dir)
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._ssl_context
        return super().init_poolmanager(*args, **kwargs)
