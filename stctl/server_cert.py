"""The fleet server's TLS certificate: `pki/server.crt` and `pki/server.key` (0600) in the workspace.

Rules: issued by the fleet CA (`stctl.pki.issue_server_cert`, role marker `server`) on the
server's first start, and again whenever the one there does not name every host the server is
asked to answer as, was not signed by the current CA, or expires within `RENEW_BEFORE`; a new one
is recorded in fleet.db `certificates` (role `server`, so it can be revoked like any other)
before it is written, the key first, each file atomically, under the workspace lock.
"""
from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

from common.files import atomic_write
from stctl.fleetdb import open_fleet_db
from stctl.pki import ROLE_SERVER, issue_server_cert, load_ca_cert
from stctl.revocation import certificate_row
from stctl.workspace import Workspace

RENEW_BEFORE = timedelta(days=30)


def _covers(cert: x509.Certificate, hosts: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    names = set(san.get_values_for_type(x509.DNSName)) | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return all(h in names for h in hosts)


def _normal(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _usable(path: Path, key_path: Path, ca: x509.Certificate, hosts: list[str]) -> bool:
    """Whether the certificate at `path` and the key at `key_path` belong together and will do."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        key = load_pem_private_key(key_path.read_bytes(), None)
    except (FileNotFoundError, ValueError, TypeError):
        return False
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return (cert.issuer == ca.subject and _covers(cert, hosts)
            and key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
            and cert.not_valid_after_utc - datetime.now(timezone.utc) > RENEW_BEFORE)


def ensure_server_cert(workspace: Workspace, hosts: list[str]) -> tuple[Path, Path]:
    """(certificate path, key path) of a server certificate valid for every one of `hosts`."""
    hosts = sorted({_normal(h) for h in hosts})
    cert_path, key_path = workspace.pki_dir / "server.crt", workspace.pki_dir / "server.key"
    if _usable(cert_path, key_path, load_ca_cert(workspace), hosts):
        return cert_path, key_path
    with workspace.lock():
        if not _usable(cert_path, key_path, load_ca_cert(workspace), hosts):
            key_pem, cert_pem = issue_server_cert(workspace, hosts)
            db = open_fleet_db(workspace.fleet_db)
            try:
                with db.atomic():
                    db["certificates"].insert(certificate_row(cert_pem, ROLE_SERVER, "fleet-server"))
            finally:
                db.close()
            atomic_write(key_path, key_pem, mode=0o600)
            atomic_write(cert_path, cert_pem)
    return cert_path, key_path
