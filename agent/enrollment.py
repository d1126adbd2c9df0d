"""`st-agent init`: turn an enrollment file into an initialized data dir.

Rules: the enrollment is checked before anything is written (format, the device certificate is
signed by the enclosed fleet CA, carries the device role and matches the enclosed key, the
enclosed CRL if any is a CRL of that CA); the CRL is kept by `agent.revocation.DeviceCrl` (so
the server enforces it from the first start); an
initialized data dir is never overwritten; `agent.json` is written last, so a data dir is
initialized only once everything else is in place. The private key is written 0600.
"""
from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

from agent.config import CONFIG_FILE, CallHomeConfig, DeviceConfig
from agent.errors import ConfigError
from common.files import atomic_write
from agent.revocation import DeviceCrl, RevocationError
from agent.telemetry import Telemetry
from manifests import ManifestError
from manifests.crl import read_crl
from manifests.enrollment import ROLE_DEVICE, Enrollment, certificate_role

MAX_ENROLLMENT_BYTES = 1 << 20


def read_enrollment(path: str | os.PathLike) -> Enrollment:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENROLLMENT_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such enrollment file") from None
    if len(data) > MAX_ENROLLMENT_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_ENROLLMENT_BYTES} bytes; not an enrollment file")
    try:
        enrollment = Enrollment.from_bytes(data)
    except ManifestError as e:
        raise ConfigError(f"{path}: {e}") from None
    _check_credentials(enrollment, str(path))
    return enrollment


def _check_credentials(e: Enrollment, where: str) -> None:
    try:
        ca = x509.load_pem_x509_certificate(e.ca_cert_pem.encode())
        cert = x509.load_pem_x509_certificate(e.device_cert_pem.encode())
        key = load_pem_private_key(e.device_key_pem.encode(), None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: unreadable certificate or key ({err})") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise ConfigError(f"{where}: the device certificate is not signed by the enclosed fleet CA ({err})") from None
    if certificate_role(e.device_cert_pem.encode()) != ROLE_DEVICE:
        raise ConfigError(f"{where}: the certificate does not carry the device role")
    spki = PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(Encoding.PEM, spki) != cert.public_key().public_bytes(Encoding.PEM, spki):
        raise ConfigError(f"{where}: the private key does not belong to the device certificate")
    if e.crl_pem is not None:
        try:
            read_crl(e.crl_pem.encode(), ca)
        except ManifestError as err:
            raise ConfigError(f"{where}: {err}") from None


def init_data_dir(enrollment_file: str | os.PathLike, data_dir: str | os.PathLike) -> DeviceConfig:
    """Set up `data_dir` (created if missing) from the enrollment file; refuses an initialized dir."""
    enrollment = read_enrollment(enrollment_file)
    root = Path(data_dir).resolve()
    if (root / CONFIG_FILE).exists():
        raise ConfigError(f"{root}: already initialized ({CONFIG_FILE} exists); refusing to overwrite")
    call_home = None if enrollment.server_url is None else CallHomeConfig(enrollment.server_url)
    config = DeviceConfig(root, enrollment.name, enrollment.url, enrollment.repository_url, enrollment.tags,
                          call_home=call_home)
    atomic_write(config.ca_cert, enrollment.ca_cert_pem.encode())
    atomic_write(config.device_cert, enrollment.device_cert_pem.encode())
    atomic_write(config.device_key, enrollment.device_key_pem.encode(), mode=0o600)
    atomic_write(config.trusted_root, enrollment.trusted_root.encode())
    if enrollment.crl_pem is not None:
        try:
            DeviceCrl(config).take(enrollment.crl_pem.encode())
        except RevocationError as e:
            raise ConfigError(f"{enrollment_file}: {e}") from None
    for folder in (config.jobs_dir, config.releases_dir, config.store_dir):
        folder.mkdir(parents=True, exist_ok=True)
    Telemetry(config.telemetry_db, config.limits.telemetry_max_rows).close()
    config.save()
    return config
