"""`stctl device enroll`: enrollment files for devices, and the device registry in `fleet.db`.

Rules: an enrollment file is never overwritten and is written 0600 (it holds the device's private
key); the device certificate is valid for the host of the device URL; the trusted root handed
over is the repository's newest root, and the CRL handed over the one the repository publishes
(if any); a device name is enrolled once, unless every certificate it had is revoked (then the
replacement device gets a new certificate and the row is replaced); a device is in `fleet.db`
(`devices`, and its certificate's serial in `certificates`, see `stctl.revocation`) only if its
enrollment file was written.

The `devices` table comes from a migration this module adds to `stctl.fleetdb.MIGRATIONS`
(append-only list, applied by `open_fleet_db`).
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from manifests import ManifestError
from manifests.enrollment import (
    ROLE_DEVICE, Enrollment, check_repository_url, check_server_url, parse_device_url, parse_tag,
)
from manifests.model_manifest import check_name
from stctl.errors import StctlError, WorkspaceError
from stctl.fleetdb import open_fleet_db
from stctl.pki import issue_device_cert
from stctl.repository import Repository
from stctl.revocation import certificate_row, device_revoked, published_crl
from common.files import atomic_write
from stctl.workspace import Workspace

ENV_REPOSITORY_URL = "STCTL_REPOSITORY_URL"
ENV_SERVER_URL = "STCTL_SERVER_URL"


class EnrollmentError(StctlError):
    """A device cannot be enrolled (bad name, URL or tag; already enrolled; file exists)."""




def enroll_device(workspace: Workspace, name: str, url: str, out: str | os.PathLike,
                  repository_url: str | None, tags: list[str] = (), server_url: str | None = None) -> dict:
    """Write the enrollment file of device `name` serving at `url` and register the device;
    `server_url`: the fleet server it calls home to (`$STCTL_SERVER_URL`; none: push only)."""
    out = Path(out)
    try:
        check_name(name, "device name")
        host, _ = parse_device_url(url)
        tag_map = dict(parse_tag(t) for t in tags)
        repository_url = check_repository_url(repository_url or os.environ.get(ENV_REPOSITORY_URL) or "")
        server_url = server_url or os.environ.get(ENV_SERVER_URL) or None
        server_url = None if server_url is None else check_server_url(server_url)
    except ManifestError as e:
        raise EnrollmentError(str(e)) from None
    if out.exists():
        raise EnrollmentError(f"{out}: already exists; refusing to overwrite an enrollment file")
    db = open_fleet_db(workspace.fleet_db)
    try:
        if db["devices"].count_where("name = ?", [name]) and not device_revoked(workspace, db, name):
            raise EnrollmentError(f"device {name!r} is already enrolled")
        repo = Repository(workspace)
        root = (workspace.metadata_dir / f"{repo.root_version()}.root.json").read_text()
        crl = published_crl(workspace)
        key_pem, cert_pem = issue_device_cert(workspace, name, [host])
        enrollment = Enrollment(name=name, url=url, repository_url=repository_url,
                                ca_cert_pem=(workspace.pki_dir / "ca.crt").read_text(),
                                device_cert_pem=cert_pem.decode(), device_key_pem=key_pem.decode(),
                                trusted_root=root, tags=tag_map, crl_pem=crl.pem.decode() if crl else None,
                                server_url=server_url)
        cert = x509.load_pem_x509_certificate(cert_pem)
        row = {"name": name, "url": url, "tags": json.dumps(tag_map, sort_keys=True),
               "cert_sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
               "cert_not_after": cert.not_valid_after_utc.isoformat(),
               "enrolled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "server_url": server_url}
        with db.atomic():
            db["devices"].insert(row, replace=True)  # replaces only a revoked device (checked above)
            db["certificates"].insert(certificate_row(cert_pem, ROLE_DEVICE, name))
            atomic_write(out, enrollment.to_bytes(), mode=0o600)  # the commit point is this write
    finally:
        db.close()
    return {"device": name, "url": url, "tags": tag_map, "repository_url": repository_url, "server_url": server_url,
            "enrollment": str(out), "cert_not_after": row["cert_not_after"]}


def list_devices(workspace: Workspace) -> list[dict]:
    if not workspace.fleet_db.exists():
        raise WorkspaceError(f"{workspace.fleet_db}: missing")
    db = open_fleet_db(workspace.fleet_db)
    try:
        return [{**row, "tags": json.loads(row["tags"])} for row in db["devices"].rows_where(order_by="name")]
    finally:
        db.close()
