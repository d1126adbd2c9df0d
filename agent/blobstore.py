"""The device's content-addressed store of package files: `blobs/sha256/<hex>`.

Layout under the store root:
- `blobs/sha256/<hex>`: installed blobs, each exactly the bytes whose sha256 is `<hex>`;
- `incoming/<hex>`: blobs verified during a fetch that has not finished; they become installed
  all together when the whole release verified (`commit`), so a failed or attacked fetch
  installs nothing, and a later fetch does not download them again;
- `partial/`: interrupted downloads (the fetcher resumes them);
- `tmp/`: temp files of atomic writes.

Rules: a blob is written whole or not at all (temp file, fsync, rename, fsync the folder) and is
read-only once written; only verified bytes enter `incoming/` or `blobs/`; a blob left in
`incoming/` by an earlier fetch counts only after its bytes hash to its name again
(`staged_intact`), so a flipped bit or a truncation means a new download, never an install;
leftovers are bounded: a fetch removes those its release does not use (`keep_only`), and files
untouched for a while are collected (`collect_stale`); a package directory is materialized from
blobs in a temp folder and renamed into place, so it appears complete or not at all.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from agent.errors import InsufficientSpaceError, StoreError
from manifests import ManifestError, ModelManifest
from common.files import fsync_dir
from manifests.release import package_files

MANIFEST_FILE = "manifest.json"


class BlobStore:
    """Content-addressed blob store rooted at `root` (created if missing)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.incoming_dir = self.root / "incoming"
        self.partial_dir = self.root / "partial"
        self.tmp_dir = self.root / "tmp"
        for d in (self.blobs_dir, self.incoming_dir, self.partial_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.blobs_dir / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        try:
            return open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise StoreError(f"blob {sha256}: not in the store") from None

    def installed(self) -> set[str]:
        """The sha256 of every installed blob."""
        return {p.name for p in self.blobs_dir.iterdir() if not p.name.startswith(".")}

    def put(self, data: bytes) -> str:
        """Install `data`; returns its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has(sha256):
            tmp = self.temp_path()
            with open(tmp, "wb") as f:
                f.write(data)
            self._seal(tmp)
            os.replace(tmp, self.path(sha256))
            fsync_dir(self.blobs_dir)
        return sha256

    # ---- the fetch protocol: temp file -> verified -> incoming -> commit -------------------
    def temp_path(self) -> Path:
        """A fresh temp file path inside the store (same filesystem, so renames are atomic)."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".tmp")
        os.close(fd)
        return Path(name)

    def staged_intact(self, sha256: str) -> bool:
        """Whether `incoming/<sha256>` holds exactly the bytes of that hash; one that does not
        (bit rot, a truncation) is removed."""
        staged = self.incoming_dir / sha256
        try:
            with open(staged, "rb") as f:
                intact = hashlib.file_digest(f, "sha256").hexdigest() == sha256
        except FileNotFoundError:
            return False
        if not intact:
            staged.unlink(missing_ok=True)
        return intact

    def stage(self, verified_file: Path, sha256: str) -> None:
        """Move a file the caller verified to hash to `sha256` into `incoming/` (content synced;
        the folders are synced by `commit`)."""
        self._seal(verified_file)
        os.replace(verified_file, self.incoming_dir / sha256)

    def commit(self, sha256s: list[str]) -> None:
        """Install the staged blobs `sha256s` (blobs already installed are skipped)."""
        for sha256 in sha256s:
            staged = self.incoming_dir / sha256
            if staged.exists():
                os.replace(staged, self.path(sha256))
        fsync_dir(self.blobs_dir)
        fsync_dir(self.incoming_dir)

    # ---- leftovers of unfinished fetches, and room for the next one ---------------------------
    def keep_only(self, incoming: set[str], partials: set[Path] | None) -> None:
        """Remove staged blobs not in `incoming` and partial downloads not in `partials` (None:
        leave `partial/` alone, the fetch under way does not resume downloads)."""
        self._remove(p for p in self.incoming_dir.iterdir() if p.name not in incoming)
        if partials is not None:
            self._remove(p for p in self.partial_dir.iterdir() if p not in partials)

    def collect_stale(self, max_age_s: float) -> None:
        """Remove staged blobs and partial downloads nobody wrote for `max_age_s` seconds."""
        oldest = time.time() - max_age_s
        for folder in (self.incoming_dir, self.partial_dir):
            self._remove(p for p in folder.iterdir() if p.stat().st_mtime < oldest)

    @staticmethod
    def _remove(paths: Iterable[Path]) -> None:
        for path in list(paths):
            path.unlink(missing_ok=True)

    def ensure_room(self, nbytes: int, purpose: str) -> None:
        """Refuse (InsufficientSpaceError) unless the store's filesystem has `nbytes` free."""
        free = shutil.disk_usage(self.root).free
        if free < nbytes:
            raise InsufficientSpaceError(f"not enough disk space for {purpose}: {nbytes} bytes needed free in "
                                         f"{self.root}, {free} available")

    @staticmethod
    def _seal(path: Path) -> None:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(path, 0o444)  # blobs are hardlinked into packages: nobody may write through them

    # ---- packages ------------------------------------------------------------------------
    def materialize(self, manifest_bytes: bytes, dest_dir: str | os.PathLike) -> ModelManifest:
        """Build the package directory `dest_dir` (which must not exist) from installed blobs:
        each file a hardlink of its blob (a copy across filesystems), plus `manifest.json`."""
        try:
            manifest = ModelManifest.from_bytes(manifest_bytes)
        except ManifestError as e:
            raise StoreError(f"manifest: {e}") from None
        dest = Path(dest_dir)
        if dest.exists():
            raise StoreError(f"{dest}: already exists; refusing to overwrite a package")
        missing = [file for file, sha256, _ in package_files(manifest) if not self.has(sha256)]
        if missing:
            raise StoreError(f"blob store lacks {len(missing)} file(s) of {manifest.name}@{manifest.version}, "
                             f"e.g. {missing[0]}; fetch the release first")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            for file, sha256, _ in package_files(manifest):
                target = tmp / file
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.path(sha256), target)
                except OSError:
                    shutil.copyfile(self.path(sha256), target)
            with open(tmp / MANIFEST_FILE, "wb") as f:
                f.write(manifest_bytes)
                os.fsync(f.fileno())
            for folder in {tmp, *(p.parent for p in tmp.rglob("*") if p.is_file())}:
                fsync_dir(folder)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(dest.parent)
        return manifest
