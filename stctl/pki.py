"""The fleet CA and its certificates, for the device API's mutual TLS.

Files: `pki/ca.crt`, `pki/ca.key` (0600; encrypted like the signing keys when the workspace says
so), `pki/operator.crt`, `pki/operator.key` (0600, plain PEM so HTTP clients can load it).
Keys are EC P-256 (what Python's ssl module and every TLS stack accept), signatures ECDSA-SHA256.

Role marker (the device API authorises by it): every leaf certificate carries exactly one
SAN URI `urn:st:role:<role>` (the constants and `certificate_role` live in `manifests.enrollment`, which the agent shares) and the same role as its subject OU:
- `urn:st:role:operator` (OU=operator): the operator's client certificate, EKU clientAuth;
- `urn:st:role:device` (OU=device): a device's server certificate, EKU serverAuth and
  clientAuth, with the device's DNS names and IP addresses as SANs so HTTPS to them verifies.
A device accepts management requests only from a client certificate of the fleet CA whose SAN
URI is `urn:st:role:operator`.
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
from agent.files import atomic_write
from stctl.workspace import ENV_PASSPHRASE, Workspace

CA_VALIDITY = timedelta(days=3650)
LEAF_VALIDITY = timedelta(days=825)


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
    key_pem, cert_pem = _issue(ca_key, ca_cert, "operator", ROLE_OPERATOR, [])
    atomic_write(pki_dir / "operator.key", key_pem, mode=0o600)
    atomic_write(pki_dir / "operator.crt", cert_pem)


def _issue(ca_key, ca_cert: x509.Certificate, name: str, role: str, hosts: list[str]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role)]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if role == ROLE_DEVICE else [])
    cert = (_builder(_name(name, role), ca_cert.subject, key.public_key(), LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _key_pem(key), cert.public_bytes(Encoding.PEM)


def issue_device_cert(workspace: Workspace, name: str, hosts: list[str]) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for device `name`, valid for TLS to each of `hosts` (DNS names or IPs)."""
    if not name or not hosts:
        raise WorkspaceError("a device certificate needs a name and at least one host name or IP address")
    path = workspace.pki_dir / "ca.key"
    try:
        ca_key = load_pem_private_key(path.read_bytes(), passphrase(workspace))
    except FileNotFoundError:
        raise WorkspaceError(f"{path}: missing; this workspace has no fleet CA") from None
    except (TypeError, ValueError):
        raise SigningKeyError(f"{path}: wrong passphrase (${ENV_PASSPHRASE}) or corrupt key file") from None
    ca_cert = x509.load_pem_x509_certificate((workspace.pki_dir / "ca.crt").read_bytes())
    return _issue(ca_key, ca_cert, name, ROLE_DEVICE, hosts)
