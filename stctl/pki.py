"""The fleet CA and its certificates, for the device API's mutual TLS.

Files: `pki/ca.crt`, `pki/ca.key` (0600; encrypted like the signing keys when the workspace says
so), `pki/operator.crt`, `pki/operator.key` (0600, plain PEM so HTTP clients can load it).
Keys are EC P-256 (what Python's ssl module and every TLS stack accept), signatures ECDSA-SHA256.

Role marker (the device API authorises by it): every leaf certificate carries exactly one
SAN URI `urn:st:role:<role>` (the constants and `certificate_role` live in `manifests.enrollment`, which the agent shares) and the same role as its subject OU:
- `urn:st:role:operator` (OU=operator): the operator's client certificate, EKU clientAuth;
- `urn:st:role:device` (OU=device): a device's server certificate, EKU serverAuth and
  clientAuth, with the device's DNS names and IP addresses as SANs so HTTPS to them verifies;
- `urn:st:role:server` (OU=server): the fleet server's certificate (`stctl server serve`, devices
  call home to it), EKU serverAuth only, with the server's host names and IPs as SANs.
A device accepts management requests only from a client certificate of the fleet CA whose SAN
URI is `urn:st:role:operator`.

Lifetimes: the CA 10 years, a device certificate 825 days, the operator certificate 90 days by
default (`stctl pki renew-operator` issues a fresh one; the one it replaces stays valid until it
expires unless revoked). Revocation (the CRL the CA signs) lives in `stctl.revocation`.
"""
from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption, Encoding, NoEncryption, PrivateFormat, load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from manifests.enrollment import ROLE_DEVICE, ROLE_OPERATOR, ROLE_URI_PREFIX
from stctl.errors import SigningKeyError, WorkspaceError
from stctl.keys import passphrase
from common.files import atomic_write
from stctl.workspace import ENV_PASSPHRASE, Workspace

CA_VALIDITY = timedelta(days=3650)
DEVICE_VALIDITY = timedelta(days=825)
SERVER_VALIDITY = timedelta(days=825)
ROLE_SERVER = "server"  # only stctl issues it; the agent will check it through manifests.enrollment
OPERATOR_VALIDITY = timedelta(days=90)
MAX_OPERATOR_DAYS = 825  # `renew-operator --days` at most this


def _key_pem(key: ec.EllipticCurvePrivateKey, secret: bytes | None = None) -> bytes:
    encryption = BestAvailableEncryption(secret) if secret else NoEncryption()
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)


def _name(common_name: str, role: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SmallThinker Fleet")]
    if role:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, validity: timedelta) -> x509.CertificateBuilder:
    now = datetime.now(timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + validity))


def create_pki(pki_dir: Path, secret: bytes | None, fleet_name: str) -> None:
    """A new fleet CA and operator certificate in `pki_dir` (which must not hold a CA yet)."""
    if (pki_dir / "ca.key").exists():
        raise WorkspaceError(f"{pki_dir}/ca.key: already exists; refusing to overwrite the fleet CA")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{fleet_name} fleet CA")
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), CA_VALIDITY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    atomic_write(pki_dir / "ca.key", _key_pem(ca_key, secret), mode=0o600)
    atomic_write(pki_dir / "ca.crt", ca_cert.public_bytes(Encoding.PEM))
    write_operator_credentials(pki_dir, *_issue(ca_key, ca_cert, "operator", ROLE_OPERATOR, [], OPERATOR_VALIDITY))


def write_operator_credentials(pki_dir: Path, key_pem: bytes, cert_pem: bytes) -> None:
    """Replace `operator.key` (0600) and `operator.crt`, each atomically, the key first."""
    atomic_write(pki_dir / "operator.key", key_pem, mode=0o600)
    atomic_write(pki_dir / "operator.crt", cert_pem)


def _issue(ca_key, ca_cert: x509.Certificate, name: str, role: str, hosts: list[str],
           validity: timedelta) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role)]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    usages = {ROLE_DEVICE: [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
              ROLE_SERVER: [ExtendedKeyUsageOID.SERVER_AUTH]}.get(role, [ExtendedKeyUsageOID.CLIENT_AUTH])
    cert = (_builder(_name(name, role), ca_cert.subject, key.public_key(), validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _key_pem(key), cert.public_bytes(Encoding.PEM)


def load_ca(workspace: Workspace) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The fleet CA's key (passphrase checked) and certificate."""
    path = workspace.pki_dir / "ca.key"
    try:
        ca_key = load_pem_private_key(path.read_bytes(), passphrase(workspace))
    except FileNotFoundError:
        raise WorkspaceError(f"{path}: missing; this workspace has no fleet CA") from None
    except (TypeError, ValueError):
        raise SigningKeyError(f"{path}: wrong passphrase (${ENV_PASSPHRASE}) or corrupt key file") from None
    return ca_key, load_ca_cert(workspace)


def load_ca_cert(workspace: Workspace) -> x509.Certificate:
    path = workspace.pki_dir / "ca.crt"
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise WorkspaceError(f"{path}: missing; this workspace has no fleet CA") from None
    except ValueError:
        raise WorkspaceError(f"{path}: not a PEM certificate") from None


def issue_device_cert(workspace: Workspace, name: str, hosts: list[str]) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for device `name`, valid for TLS to each of `hosts` (DNS names or IPs)."""
    if not name or not hosts:
        raise WorkspaceError("a device certificate needs a name and at least one host name or IP address")
    ca_key, ca_cert = load_ca(workspace)
    return _issue(ca_key, ca_cert, name, ROLE_DEVICE, hosts, DEVICE_VALIDITY)


def issue_operator_cert(workspace: Workspace, validity: timedelta = OPERATOR_VALIDITY) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a new operator certificate (written by the caller)."""
    ca_key, ca_cert = load_ca(workspace)
    return _issue(ca_key, ca_cert, "operator", ROLE_OPERATOR, [], validity)


def issue_server_cert(workspace: Workspace, hosts: list[str]) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of the fleet server, valid for TLS to each of `hosts` (DNS names or IPs)."""
    if not hosts:
        raise WorkspaceError("a server certificate needs at least one host name or IP address")
    ca_key, ca_cert = load_ca(workspace)
    return _issue(ca_key, ca_cert, "fleet-server", ROLE_SERVER, hosts, SERVER_VALIDITY)
