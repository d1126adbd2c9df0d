"""The fleet's TUF repository (`repository/` in the workspace), built with python-tuf's Metadata API.

Roles: root, targets, snapshot, timestamp; one Ed25519 key each, threshold 1. Consistent
snapshots are on: root, targets and snapshot versions are new files `N.<role>.json`, a target
is stored as `targets/<dir>/<sha256>.<name>` (names: manifests/release.py), so nothing a client
may be reading is ever rewritten. Only `timestamp.json` (and `root.json`, a copy of the newest
root for operators) have fixed names.

Rules:
- The commit point of every change is the atomic replace of `metadata/timestamp.json`. A
  publish writes, in order, the new target files, `N+1.targets.json`, `M+1.snapshot.json`, then
  the timestamp. Killed before that, clients still see the previous timestamp, snapshot and
  targets, all intact; the files written so far are unreferenced and get overwritten next time.
- The current state is read by following the chain timestamp -> snapshot -> targets; the
  current root is the highest `N.root.json` reachable from `root.json` by +1 steps, the same
  walk clients do.
- Every input is checked, and every signing key loaded, before the first byte is written: bad
  input leaves the repository unchanged.
- Other signed files (the fleet CA's CRL, `stctl.revocation`) are published through the same
  path: `stage_target` under the workspace lock, then `commit`.
- A key rotation publishes root N+1 (signed by the old and the new root keys when root itself
  rotates), then re-signs the rotated role and the roles after it. If it stops half-way,
  `stctl repo refresh` re-signs every role whose signature root no longer trusts.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import BinaryIO
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from manifests import ManifestError, ModelManifest
from manifests.release import (
    METADATA_DIR, TARGETS_DIR, blob_target, manifest_target, package_files, parse_manifest_target,
)
from model.package import MANIFEST_FILE
from stctl import keys
from stctl.errors import PublishError, ReleaseNotFoundError, SigningKeyError, WorkspaceError
from stctl.fleetdb import open_fleet_db
from common.files import atomic_write, fsync_dir
from stctl.workspace import Expiry, Workspace

Progress = Callable[[int, int, str], None]  # (done, total, label)
_SERIALIZER = JSONSerializer(compact=False)
_MAX_ROOT_WALK = 1024
_COPY_CHUNK = 1 << 20


def utc_in(delta: timedelta) -> datetime:
    return (datetime.now(timezone.utc) + delta).replace(microsecond=0)


def stored_target_path(target: str, sha256: str) -> str:
    """Where a target lives under `targets/` with consistent snapshots: `<dir>/<sha256>.<name>`."""
    dirname, sep, basename = target.rpartition("/")
    return f"{dirname}{sep}{sha256}.{basename}"


def meta_file(data: bytes, version: int) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})


@dataclass
class State:
    """The signed metadata a client sees right now."""

    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]


@dataclass(frozen=True)
class PublishReport:
    model: str
    version: str
    shards: int
    bytes_full: int
    bytes_new: int
    targets_version: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Release:
    model: str
    version: str
    manifest_sha256: str


def create_repository(repo_dir: Path, signers: dict[str, Signer], expiry: Expiry) -> None:
    """Version 1 of every role in an empty `repo_dir` (used by `stctl init`)."""
    root = Root(expires=utc_in(expiry.root), consistent_snapshot=True)
    for role, signer in signers.items():
        root.add_key(signer.public_key, role)
    targets = Targets(expires=utc_in(expiry.targets))
    metadata = repo_dir / METADATA_DIR
    (repo_dir / TARGETS_DIR).mkdir(parents=True)
    root_bytes = _signed_bytes(Metadata(root), [signers["root"]])
    atomic_write(metadata / "1.root.json", root_bytes)
    atomic_write(metadata / "root.json", root_bytes)
    targets_bytes = _signed_bytes(Metadata(targets), [signers["targets"]])
    atomic_write(metadata / "1.targets.json", targets_bytes)
    snapshot = Snapshot(expires=utc_in(expiry.snapshot), meta={"targets.json": meta_file(targets_bytes, 1)})
    snapshot_bytes = _signed_bytes(Metadata(snapshot), [signers["snapshot"]])
    atomic_write(metadata / "1.snapshot.json", snapshot_bytes)
    timestamp = Timestamp(expires=utc_in(expiry.timestamp), snapshot_meta=meta_file(snapshot_bytes, 1))
    atomic_write(metadata / "timestamp.json", _signed_bytes(Metadata(timestamp), [signers["timestamp"]]))


def _signed_bytes(md: Metadata, signers: list[Signer]) -> bytes:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes(_SERIALIZER)


def sign_next(state: State, signers: dict[str, list[Signer]], *, targets_changed: bool, snapshot_changed: bool,
              expiry: Expiry, version: int | None = None) -> list[tuple[str, bytes]]:
    """The metadata files (name, bytes) of the next state, in the order clients read them last.

    `state` holds the edited metadata and is updated in place. Targets and snapshot get new
    versions when changed (a targets change implies a snapshot change), the timestamp always
    does; a new version is the old one + 1, or `version` when given (the bundle channel)."""
    files = []

    def bump(md: Metadata, valid_for: timedelta) -> None:
        md.signed.version = version or md.signed.version + 1
        md.signed.expires = utc_in(valid_for)

    if targets_changed:
        bump(state.targets, expiry.targets)
        data = _signed_bytes(state.targets, signers["targets"])
        files.append((f"{state.targets.signed.version}.targets.json", data))
        state.snapshot.signed.meta["targets.json"] = meta_file(data, state.targets.signed.version)
    if targets_changed or snapshot_changed:
        bump(state.snapshot, expiry.snapshot)
        data = _signed_bytes(state.snapshot, signers["snapshot"])
        files.append((f"{state.snapshot.signed.version}.snapshot.json", data))
        state.timestamp.signed.snapshot_meta = meta_file(data, state.snapshot.signed.version)
    bump(state.timestamp, expiry.timestamp)
    files.append(("timestamp.json", _signed_bytes(state.timestamp, signers["timestamp"])))
    return files


class Repository:
    """The TUF repository of one workspace. Methods that change it take the workspace lock."""

    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self.metadata_dir = workspace.metadata_dir
        self.targets_dir = workspace.targets_dir

    # ---- reading -------------------------------------------------------------------------
    def _read(self, name: str) -> Metadata:
        path = self.metadata_dir / name
        try:
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise WorkspaceError(f"{path}: missing; the repository is incomplete") from None
        except Exception as e:  # python-tuf raises DeserializationError and ValueError subclasses
            raise WorkspaceError(f"{path}: not valid TUF metadata ({e})") from None

    def root_version(self) -> int:
        version = self._read("root.json").signed.version
        for _ in range(_MAX_ROOT_WALK):
            if not (self.metadata_dir / f"{version + 1}.root.json").exists():
                return version
            version += 1
        raise WorkspaceError(f"{self.metadata_dir}: more than {_MAX_ROOT_WALK} root versions ahead of root.json")

    def state(self) -> State:
        timestamp = self._read("timestamp.json")
        snapshot = self._read(f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
        targets = self._read(f"{snapshot.signed.meta['targets.json'].version}.targets.json")
        root = self._read(f"{self.root_version()}.root.json")
        return State(root=root, targets=targets, snapshot=snapshot, timestamp=timestamp)

    def releases(self) -> list[Release]:
        """Every published release, in target order."""
        found = []
        for path, info in self.state().targets.signed.targets.items():
            if ref := parse_manifest_target(path):
                found.append(Release(ref[0], ref[1], info.hashes["sha256"]))
        return found

    def target_file(self, target: str, state: State | None = None) -> Path:
        """The file on disk holding `target`."""
        info = (state or self.state()).targets.signed.targets.get(target)
        if info is None:
            raise ReleaseNotFoundError(f"{target}: not a target of this repository")
        return self.targets_dir / stored_target_path(target, info.hashes["sha256"])

    def manifest_bytes(self, model: str, version: str, state: State | None = None) -> bytes:
        """The published manifest of `model` `version`."""
        try:
            target = manifest_target(model, version)
        except ManifestError as e:
            raise ReleaseNotFoundError(str(e)) from None
        try:
            return self.target_file(target, state).read_bytes()
        except ReleaseNotFoundError:
            raise ReleaseNotFoundError(f"{model}@{version}: not published in {self.ws.root}") from None

    # ---- signing -------------------------------------------------------------------------
    def signers(self, roles: list[str], state: State | None = None) -> dict[str, list[Signer]]:
        """The signers root trusts for each of `roles`, loaded from `keys/` (passphrase checked)."""
        root = (state or self.state()).root.signed
        secret = keys.passphrase(self.ws)
        return {role: keys.load_signers(self.ws.keys_dir, role, root.roles[role].keyids, secret) for role in roles}

    def commit(self, state: State, signers: dict[str, list[Signer]], *, targets_changed: bool,
               snapshot_changed: bool = False) -> None:
        """Sign the next versions (see `sign_next`) and write them in client order; the timestamp
        write is the commit point."""
        for name, data in sign_next(state, signers, targets_changed=targets_changed,
                                    snapshot_changed=snapshot_changed, expiry=self.ws.config.expiry):
            atomic_write(self.metadata_dir / name, data)

    def stage_target(self, state: State, target: str, data: bytes) -> str:
        """Write the small target `target` (content-addressed, so no file a client may read is
        rewritten) and list it in `state`'s targets, replacing an earlier version; returns its
        sha256. The caller holds the workspace lock and `commit`s next."""
        sha256 = hashlib.sha256(data).hexdigest()
        atomic_write(self.targets_dir / stored_target_path(target, sha256), data)
        state.targets.signed.targets[target] = TargetFile(len(data), {"sha256": sha256}, target)
        return sha256

    def target_bytes(self, target: str, state: State | None = None) -> bytes | None:
        """The published content of `target`, None if the repository has no such target."""
        try:
            return self.target_file(target, state).read_bytes()
        except ReleaseNotFoundError:
            return None
        except FileNotFoundError:
            raise WorkspaceError(f"{target}: signed, but its file is missing from {self.targets_dir}") from None

    # ---- publish -------------------------------------------------------------------------
    def publish(self, package_dir: str | os.PathLike, progress: Progress | None = None) -> PublishReport:
        """Add a model package as a release: every file as `blobs/<sha256>`, the manifest as
        `models/<name>/<version>/manifest.json`. New blobs are checked and copied into a staging
        folder first and moved under `targets/` only when every file of the package checked out."""
        report = progress or (lambda done, total, label: None)
        package = Path(package_dir)
        manifest_data, manifest = _read_package_manifest(package)
        target = manifest_target(manifest.name, manifest.version)
        with self.ws.lock():
            state = self.state()
            signers = self.signers(["targets", "snapshot", "timestamp"], state)
            published = state.targets.signed.targets
            if target in published:
                raise PublishError(f"{manifest.name}@{manifest.version} is already published; "
                                   "build the package with a new --version")
            files = package_files(manifest)
            total = sum(size for _, _, size in files)
            staging = Path(tempfile.mkdtemp(prefix=".publish-", dir=self.ws.root))
            try:
                done = bytes_new = 0
                staged: dict[str, Path] = {}  # sha256 -> final path of a blob new on disk
                for file, sha256, size in files:
                    report(done, total, file)
                    blob = blob_target(sha256)
                    dest = self.targets_dir / stored_target_path(blob, sha256)
                    if dest.exists() or sha256 in staged:
                        _check_copy(package / file, sha256, size, None)
                    else:
                        with open(staging / sha256, "wb") as out:
                            _check_copy(package / file, sha256, size, out)
                            os.fsync(out.fileno())
                        staged[sha256] = dest
                        bytes_new += size
                    published[blob] = TargetFile(size, {"sha256": sha256}, blob)
                    done += size
                for sha256, dest in staged.items():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging / sha256, dest)
                for folder in {dest.parent for dest in staged.values()}:
                    fsync_dir(folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            manifest_sha = self.stage_target(state, target, manifest_data)
            self.commit(state, signers, targets_changed=True)
            report(total, total, "signed")
        result = PublishReport(manifest.name, manifest.version, len(manifest.shards), manifest.total_bytes,
                               bytes_new, state.targets.signed.version)
        self._record(result, manifest_sha)
        return result

    def _record(self, report: PublishReport, manifest_sha: str) -> None:
        db = open_fleet_db(self.ws.fleet_db)
        try:
            with db.atomic():
                db["releases"].upsert({**report.to_dict(), "manifest_sha256": manifest_sha,
                                       "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                                      pk=("model", "version"))
        finally:
            db.close()

    # ---- refresh and rotation --------------------------------------------------------------
    def refresh(self) -> dict:
        """Re-sign the timestamp; also root, targets and snapshot when less than half their validity
        is left, and any role not signed by the key root trusts (a rotation that stopped half-way)."""
        with self.ws.lock():
            state = self.state()
            expiry = self.ws.config.expiry
            now = datetime.now(timezone.utc)
            root_due = state.root.signed.expires - now < expiry.root / 2
            targets_due = (state.targets.signed.expires - now < expiry.targets / 2
                           or not _trusted(state.root, "targets", state.targets))
            snapshot_due = (targets_due or state.snapshot.signed.expires - now < expiry.snapshot / 2
                            or not _trusted(state.root, "snapshot", state.snapshot))
            roles = ["timestamp"] + (["snapshot"] if snapshot_due else []) + (["targets"] if targets_due else [])
            signers = self.signers(roles + (["root"] if root_due else []), state)
            if root_due:
                self._write_root(state, signers["root"])
            self.commit(state, signers, targets_changed=targets_due, snapshot_changed=snapshot_due)
        return {"resigned": (["root"] if root_due else []) + roles, "timestamp_version": state.timestamp.signed.version,
                "timestamp_expires": state.timestamp.signed.expires.isoformat()}

    def _write_root(self, state: State, signers: list[Signer]) -> None:
        """Root N+1 from the edited `state.root`, signed by `signers`; clients pick it up first."""
        root = state.root.signed
        root.version += 1
        root.expires = utc_in(self.ws.config.expiry.root)
        data = _signed_bytes(state.root, signers)
        atomic_write(self.metadata_dir / f"{root.version}.root.json", data)
        atomic_write(self.metadata_dir / "root.json", data)

    def rotate(self, role: str) -> dict:
        """Replace `role`'s key: root N+1 revokes the old key and trusts a new one."""
        if role not in keys.ROLES:
            raise SigningKeyError(f"role {role!r}: expected one of {', '.join(keys.ROLES)}")
        with self.ws.lock():
            state = self.state()
            root = state.root.signed
            old_keyids = list(root.roles[role].keyids)
            resigned = keys.ROLES[keys.ROLES.index(role):] if role != "root" else ("timestamp",)
            signers = self.signers(sorted({"root", *resigned}), state)
            new_signer = keys.generate_key(self.ws.keys_dir, role, keys.passphrase(self.ws))
            for keyid in old_keyids:
                root.revoke_key(keyid, role)
            root.add_key(new_signer.public_key, role)
            self._write_root(state, signers["root"] + ([new_signer] if role == "root" else []))
            if role != "root":
                signers[role] = [new_signer]
            self.commit(state, signers, targets_changed=role == "targets", snapshot_changed=role == "snapshot")
            keys.remove_keys(self.ws.keys_dir, role, keep=[new_signer.public_key.keyid])
        return {"role": role, "root_version": root.version, "revoked": old_keyids,
                "new_keyid": new_signer.public_key.keyid}


def _trusted(root: Metadata[Root], role: str, md: Metadata) -> bool:
    try:
        root.signed.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError:
        return False
    return True


def _read_package_manifest(package: Path) -> tuple[bytes, ModelManifest]:
    if not package.is_dir():
        raise PublishError(f"{package}: no such package directory")
    try:
        data = (package / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        raise PublishError(f"{package}: no {MANIFEST_FILE}; not a model package") from None
    try:
        return data, ModelManifest.from_bytes(data)
    except ManifestError as e:
        raise PublishError(f"{package / MANIFEST_FILE}: {e}") from None


def _check_copy(src: Path, sha256: str, size: int, out: BinaryIO | None) -> None:
    """Stream `src` into `out` (if given), checking its size and sha256 against the manifest."""
    h = hashlib.sha256()
    read = 0
    try:
        with open(src, "rb") as f:
            while (chunk := f.read(_COPY_CHUNK)) and read <= size:
                read += len(chunk)
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
    except FileNotFoundError:
        raise PublishError(f"{src}: missing from the package; nothing published") from None
    if read != size or h.hexdigest() != sha256:
        raise PublishError(f"{src}: {'size' if read != size else 'sha256'} does not match the manifest "
                           "(corrupt or tampered shard); nothing published")
