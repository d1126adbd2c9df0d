"""Installed releases: package folders, the active/previous pointer, rollback, garbage collection.

Layout: `releases/<model>/<version>/` is a package materialized from the blob store (every file
a hardlink of its verified blob, the folder renamed into place whole); `current.json` is the
pointer: `{active, previous, probation, probation_boots}`.

Rules:
- activation and rollback are one atomic replace of the pointer file (no symlinks, so it works
  on Windows too): after a crash at any instant the pointer names the old or the new release;
- a release folder named by the pointer is never changed or removed;
- `probation` marks a release activated but not yet confirmed by a passing health check;
  `probation_boots` counts daemon starts while on probation (a crash loop rolls it back);
- garbage collection keeps the folders and blobs of the active and previous releases (and of a
  release the updater asks it to keep: one staged by a job that waits to install it), and
  removes everything else, packed copies of other experts included (it runs when a job has
  ended, under the update lock).
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agent.blobstore import MANIFEST_FILE, BlobStore
from agent.config import DeviceConfig
from agent.errors import InstallError, StoreError
from common.files import atomic_write_json, read_json
from manifests import ManifestError, ModelManifest
from manifests.model_manifest import parse_version
from manifests.names import check_name
from manifests.release import package_files
from model.errors import ModelError
from model.package import verify_package
from model.packed_cache import prune as prune_packed_cache


@dataclass(frozen=True)
class ReleaseRef:
    model: str
    version: str

    def __post_init__(self):
        try:
            check_name(self.model, "model")
            parse_version(self.version)
        except ManifestError as e:
            raise InstallError(str(e)) from None

    def __str__(self) -> str:
        return f"{self.model}@{self.version}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> ReleaseRef | None:
        if d is None:
            return None
        if not isinstance(d, dict):
            raise InstallError(f"release reference {d!r}: expected {{model, version}}")
        return cls(d.get("model"), d.get("version"))


@dataclass(frozen=True)
class Pointer:
    active: ReleaseRef | None = None
    previous: ReleaseRef | None = None
    probation: bool = False
    probation_boots: int = 0

    def to_dict(self) -> dict:
        return {"active": self.active and self.active.to_dict(), "previous": self.previous and self.previous.to_dict(),
                "probation": self.probation, "probation_boots": self.probation_boots}


class Installation:
    """The releases of one data dir."""

    def __init__(self, config: DeviceConfig, store: BlobStore):
        self.config = config
        self.store = store

    # ---- pointer ---------------------------------------------------------------------------
    def pointer(self) -> Pointer:
        d = read_json(self.config.pointer_file)
        if d is None:
            return Pointer()
        if not isinstance(d, dict):
            raise InstallError(f"{self.config.pointer_file}: corrupt pointer")
        return Pointer(ReleaseRef.from_dict(d.get("active")), ReleaseRef.from_dict(d.get("previous")),
                       bool(d.get("probation", False)), int(d.get("probation_boots", 0)))

    def _write(self, pointer: Pointer) -> Pointer:
        atomic_write_json(self.config.pointer_file, pointer.to_dict())
        return pointer

    def release_dir(self, ref: ReleaseRef) -> Path:
        return self.config.releases_dir / ref.model / ref.version

    # ---- staging ---------------------------------------------------------------------------
    def stage(self, manifest_bytes: bytes) -> tuple[ReleaseRef, Path]:
        """The verified package folder of a release whose blobs are in the store (materialized
        if missing; a folder that fails verification and no pointer names is rebuilt)."""
        try:
            manifest = ModelManifest.from_bytes(manifest_bytes)
        except ManifestError as e:
            raise StoreError(f"manifest: {e}") from None
        ref = ReleaseRef(manifest.name, manifest.version)
        folder = self.release_dir(ref)
        if folder.exists():
            try:
                if verify_package(folder).to_bytes() == manifest.to_bytes():
                    return ref, folder
            except ModelError:
                pass
            if ref in self._pinned():
                raise InstallError(f"{folder}: the installed {ref} fails verification; it is in use, not rebuilt")
            shutil.rmtree(folder)
        self.store.materialize(manifest_bytes, folder)
        try:
            verify_package(folder)
        except ModelError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise StoreError(f"{ref}: materialized package fails verification: {e}") from None
        return ref, folder

    # ---- activation --------------------------------------------------------------------------
    def activate(self, ref: ReleaseRef) -> Pointer:
        """Make `ref` (a staged folder) active, the active one previous; on probation."""
        if not (self.release_dir(ref) / MANIFEST_FILE).is_file():
            raise InstallError(f"{ref}: not staged")
        current = self.pointer()
        if current.active == ref:
            return current
        return self._write(Pointer(ref, current.active, probation=current.active is not None))

    def rollback(self) -> Pointer:
        """Swap active and previous."""
        current = self.pointer()
        if current.previous is None or not (self.release_dir(current.previous) / MANIFEST_FILE).is_file():
            raise InstallError("no previous release to roll back to")
        return self._write(Pointer(current.previous, current.active))

    def confirm(self) -> Pointer:
        """The active release passed a health check: probation ends."""
        current = self.pointer()
        return self._write(replace(current, probation=False, probation_boots=0)) if current.probation else current

    def count_probation_boot(self) -> Pointer:
        current = self.pointer()
        if not current.probation:
            return current
        return self._write(replace(current, probation_boots=current.probation_boots + 1))

    # ---- garbage collection -----------------------------------------------------------------
    def _pinned(self) -> set[ReleaseRef]:
        p = self.pointer()
        return {r for r in (p.active, p.previous) if r is not None}

    def gc(self, also_keep: frozenset[ReleaseRef] = frozenset()) -> dict:
        """Remove release folders and blobs that neither the active nor the previous release (nor
        one in `also_keep`) uses."""
        pinned = self._pinned() | also_keep
        removed_releases = []
        for folder in sorted(self.config.releases_dir.glob("*/*")):
            try:
                ref = ReleaseRef(folder.parent.name, folder.name)
            except InstallError:
                ref = None  # a half-materialized folder of a killed stage
            if ref not in pinned:
                shutil.rmtree(folder, ignore_errors=True)
                removed_releases.append(str(ref))
        needed: set[str] = set()
        for ref in pinned:
            try:
                manifest_bytes = (self.release_dir(ref) / MANIFEST_FILE).read_bytes()
            except FileNotFoundError:
                continue
            needed.add(self.store.put(manifest_bytes))
            needed.update(sha for _, sha, _ in package_files(ModelManifest.from_bytes(manifest_bytes)))
        removed_blobs = 0
        for sha256 in self.store.installed() - needed:
            self.store.path(sha256).unlink(missing_ok=True)
            removed_blobs += 1
        for folder in self.config.releases_dir.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        packed_removed = prune_packed_cache(self.config.packed_cache_dir, needed)
        return {"releases_removed": removed_releases, "blobs_removed": removed_blobs, "packed_removed": packed_removed}

    def clean_temp(self) -> None:
        """Remove what a killed writer leaves and nothing resumes: the store's temp files and
        half-materialized package folders (partial downloads and unstaged blobs stay for the resume)."""
        for path in self.store.tmp_dir.iterdir():
            path.unlink(missing_ok=True)
        for partial in self.config.releases_dir.glob("*/.*.partial-*"):
            shutil.rmtree(partial, ignore_errors=True)

    def clean_scratch(self) -> None:
        """Remove all unfinished work of a job that ended: temp files, half-materialized folders,
        partial downloads and verified blobs never committed."""
        self.clean_temp()
        for folder in (self.store.partial_dir, self.store.incoming_dir):
            for path in folder.iterdir():
                path.unlink(missing_ok=True)
