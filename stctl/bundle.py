"""`stctl bundle export`: one tar file for an air-gapped site, verifiable offline.

Contents: `bundle.json` (what it carries; informative, unsigned), `metadata/` (every root
version, so any device walks the chain from its enrollment root, plus targets, snapshot and
timestamp of the *bundle channel*) and `targets/` (the release's manifest and only the blobs a
device on `--from-version` lacks), laid out like the repository.

Expiry rule: a site may stay offline far longer than the online timestamp (1 day) lives, so a
bundle does not carry the repository's timestamp. Export re-signs the current targets, a
snapshot and a timestamp with the same keys, valid for `[expiry] bundle` (default 90 days)
from the export, with a version from the export time in milliseconds, so later bundles
supersede earlier ones. Devices verify bundles in their own metadata folder (the bundle
channel), apart from the online one, so the two version sequences never meet. Past its expiry
a bundle is refused like stale metadata: export a new one.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from common.files import writing
from manifests import ModelManifest
from manifests.release import BUNDLE_INFO, CRL_TARGET, METADATA_DIR, blob_target, manifest_target, package_files
from stctl.errors import BundleError
from stctl.repository import Repository, sign_next, stored_target_path
from stctl.workspace import Workspace

Progress = Callable[[int, int, str], None]


def export_bundle(workspace: Workspace, model: str, version: str, out: str | os.PathLike,
                  from_version: str | None = None, progress: Progress | None = None) -> dict:
    """Write the bundle for `model` `version` (only blobs new since `from_version`) to `out`."""
    report = progress or (lambda done, total, label: None)
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out}: already exists; refusing to overwrite")
    repo = Repository(workspace)
    with workspace.lock():
        state = repo.state()
        manifest_bytes = repo.manifest_bytes(model, version, state)
        manifest = ModelManifest.from_bytes(manifest_bytes)
        held = set()
        if from_version is not None:
            base = ModelManifest.from_bytes(repo.manifest_bytes(model, from_version, state))
            held = {sha256 for _, sha256, _ in package_files(base)}
        blobs = {sha256: size for _, sha256, size in package_files(manifest) if sha256 not in held}
        signers = repo.signers(["targets", "snapshot", "timestamp"], state)
        expiry = workspace.config.expiry
        channel = replace(expiry, targets=expiry.bundle, snapshot=expiry.bundle, timestamp=expiry.bundle)
        signed = sign_next(state, signers, targets_changed=True, snapshot_changed=True, expiry=channel,
                           version=int(time.time() * 1000))
        files = [repo.metadata_dir / f"{v}.root.json" for v in range(1, state.root.signed.version + 1)]
        files.append(repo.target_file(manifest_target(model, version), state))
        if CRL_TARGET in state.targets.signed.targets:  # air-gapped devices learn revocations too
            files.append(repo.target_file(CRL_TARGET, state))
        files += [repo.targets_dir / stored_target_path(blob_target(sha256), sha256) for sha256 in blobs]
        info = {"model": model, "version": version, "from_version": from_version, "blobs": len(blobs),
                "bytes": sum(blobs.values()), "expires": state.timestamp.signed.expires.isoformat(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_tar(out, info, [(f"{METADATA_DIR}/{name}", data) for name, data in signed],
                   [(str(path.relative_to(workspace.repository)), path) for path in files], report)
    return {"bundle": str(out), **info, "bundle_bytes": out.stat().st_size}


def _write_tar(out: Path, info: dict, generated: list[tuple[str, bytes]], files: list[tuple[str, Path]],
               report: Progress) -> None:
    """The tar, written beside `out` and renamed into place when complete."""
    total = sum(p.stat().st_size for _, p in files)
    done = 0
    with writing(out) as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(BUNDLE_INFO, json.dumps(info, indent=1).encode()), *generated]:
            member = tarfile.TarInfo(name)
            member.size, member.mtime, member.mode = len(data), int(time.time()), 0o644
            tar.addfile(member, io.BytesIO(data))
        for name, path in files:
            report(done, total, name)
            tar.add(path, arcname=name, recursive=False)
            done += path.stat().st_size
    report(total, total, "done")
