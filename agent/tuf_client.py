"""The device's update client: fetch a signed model release into the blob store.

API (all the agent needs):

    store = BlobStore(data_dir / "store")
    client = ReleaseClient(data_dir / "tuf", "http://repo:8080", trusted_root_bytes, store, progress=cb)
    release = client.fetch_release("st-demo", "2.0.0")           # -> FetchedRelease
    store.materialize(release.manifest_bytes, data_dir / "packages" / "st-demo-2.0.0")
    # offline: the same checks, from a bundle file and its own metadata folder
    release = verify_bundle(bundle_path, trusted_root_bytes, data_dir / "tuf-bundle", store)

`trusted_root_bytes` is the root.json handed over at enrollment; newer roots are followed
through the repository's signed chain. `cb(done_bytes, total_bytes, label)` reports progress.
Failures raise `agent.errors.UpdateError` subclasses; a release already in the store is a normal
fetch that downloads no shard.

Rules: python-tuf's `ngclient.Updater` verifies all metadata (signatures, thresholds, versions,
expiry, hashes) and every target; this module adds the release rules on top: the manifest
target must name the requested model and version, and every file it lists must be a signed
`blobs/<sha256>` target of the same sha256 and size. Only files missing from the store are
downloaded; they are installed only after the whole release verified (nothing on failure).
One updater per metadata folder at a time (an exclusive lock). Limits live in `ClientConfig`.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tuf.api import exceptions
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from agent.blobstore import BlobStore
from agent.errors import (
    BundleFormatError, DownloadError, ReleaseNotFoundError, UpdaterBusyError, VerificationError,
)
from agent.fetcher import BundleFetcher, FetcherConfig, HttpFetcher, TransferStats
from manifests import ManifestError, ModelManifest
from agent.files import FileLock
from manifests.release import BUNDLE_INFO, METADATA_DIR, TARGETS_DIR, blob_target, manifest_target, package_files

Progress = Callable[[int, int, str], None]  # (done bytes, total bytes, label)


@dataclass(frozen=True)
class ClientConfig:
    """Limits of the update client."""

    download_attempts: int = 3  # tries per target; each try resumes the previous one's bytes
    max_bundle_info_bytes: int = 64 * 1024
    fetcher: FetcherConfig = FetcherConfig()
    updater: UpdaterConfig = field(default_factory=UpdaterConfig)


@dataclass(frozen=True)
class FetchedRelease:
    """A release whose every file is now installed in the blob store."""

    manifest: ModelManifest
    manifest_bytes: bytes
    bytes_downloaded: int  # every body byte received (metadata, manifest, shards)
    metadata_bytes: int  # the part that was TUF metadata or the manifest
    bytes_total: int  # the size of the whole package (what a full download would move)
    shards_downloaded: int  # files fetched this time (0: already up to date)


@contextmanager
def metadata_lock(metadata_dir: Path) -> Iterator[None]:
    """Exclusive use of a TUF metadata folder (python-tuf requires a single updater per folder)."""
    metadata_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(metadata_dir / ".lock")
    if not lock.acquire():
        raise UpdaterBusyError(f"{metadata_dir}: another update is using this metadata folder")
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _translated_errors() -> Iterator[None]:
    """python-tuf's and the manifest's errors -> the agent's UpdateError family."""
    try:
        yield
    except exceptions.RepositoryError as e:
        raise VerificationError(f"{type(e).__name__}: {e}") from e
    except exceptions.DownloadError as e:
        raise DownloadError(f"{type(e).__name__}: {e}") from e
    except ManifestError as e:
        raise VerificationError(f"manifest: {e}") from e


class _ProgressTracker:
    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.done = self.total = 0
        self.label = "metadata"

    def on_chunk(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, max(self.total, self.done), self.label)


class ReleaseClient:
    """Fetches releases from one repository URL (serving `metadata/` and `targets/`)."""

    def __init__(self, metadata_dir: str | os.PathLike, repository_url: str, trusted_root: bytes,
                 blob_store: BlobStore, progress: Progress | None = None, config: ClientConfig = ClientConfig(),
                 ca_certs: str | None = None):
        self.metadata_dir = Path(metadata_dir)
        self.base_url = repository_url.rstrip("/") + "/"
        self.trusted_root = trusted_root
        self.store = blob_store
        self.progress = progress
        self.config = config
        self.ca_certs = ca_certs

    def fetch_release(self, model: str, version: str) -> FetchedRelease:
        """Refresh metadata, then download and verify every file of `model` `version` the store lacks."""
        with metadata_lock(self.metadata_dir):
            stats, tracker = TransferStats(), _ProgressTracker(self.progress)
            targets_url = self.base_url + TARGETS_DIR + "/"
            fetcher = HttpFetcher(targets_url, self.store.partial_dir, stats, tracker.on_chunk,
                                  self.config.fetcher, self.ca_certs)
            with _translated_errors():
                updater = Updater(str(self.metadata_dir), self.base_url + METADATA_DIR + "/",
                                  target_base_url=targets_url, fetcher=fetcher, config=self.config.updater, bootstrap=self.trusted_root)
            return _fetch_release(updater, stats, tracker, self.store, model, version, self.config)


def verify_bundle(bundle_path: str | os.PathLike, trusted_root: bytes, metadata_dir: str | os.PathLike,
                  blob_store: BlobStore, progress: Progress | None = None,
                  config: ClientConfig = ClientConfig()) -> FetchedRelease:
    """Verify an offline bundle against `trusted_root` and install the files the store lacks.

    Use a metadata folder for bundles apart from the online one: a bundle carries its own
    snapshot and timestamp (a longer expiry, versions of the bundle channel)."""
    metadata = Path(metadata_dir)
    try:
        tar = tarfile.open(bundle_path, "r:")
    except (OSError, tarfile.TarError) as e:
        raise BundleFormatError(f"{bundle_path}: not a bundle ({e})") from None
    with tar, metadata_lock(metadata):
        model, version = _bundle_release(tar, bundle_path, config.max_bundle_info_bytes)
        stats, tracker = TransferStats(), _ProgressTracker(progress)
        fetcher = BundleFetcher(tar, stats, tracker.on_chunk)
        with _translated_errors():
            updater = Updater(str(metadata), fetcher.BASE + METADATA_DIR + "/", target_base_url=fetcher.targets_prefix,
                              fetcher=fetcher, config=config.updater, bootstrap=trusted_root)
        return _fetch_release(updater, stats, tracker, blob_store, model, version, config)


def _bundle_release(tar: tarfile.TarFile, path, limit: int) -> tuple[str, str]:
    """(model, version) the bundle says it carries (unsigned: TUF checks it against signed targets)."""
    try:
        member = tar.getmember(BUNDLE_INFO)
        if not member.isfile() or member.size > limit:
            raise BundleFormatError(f"{path}: {BUNDLE_INFO} is not a small regular file")
        info = json.loads(tar.extractfile(member).read())
        return str(info["model"]), str(info["version"])
    except (KeyError, TypeError, ValueError, tarfile.TarError) as e:
        raise BundleFormatError(f"{path}: no readable {BUNDLE_INFO} ({e})") from None


def _fetch_release(updater: Updater, stats: TransferStats, tracker: _ProgressTracker, store: BlobStore,
                   model: str, version: str, config: ClientConfig) -> FetchedRelease:
    try:
        target = manifest_target(model, version)
    except ManifestError as e:
        raise ReleaseNotFoundError(str(e)) from None
    with _translated_errors():
        updater.refresh()
        info = updater.get_targetinfo(target)
        if info is None:
            raise ReleaseNotFoundError(f"{model}@{version}: no such signed release")
        tracker.label = "manifest"
        before = stats.bytes_received
        tmp = _download_target(updater, info, store, config.download_attempts)
        manifest_bytes = tmp.read_bytes()
        tmp.unlink()
        stats.metadata_bytes += stats.bytes_received - before
        manifest = ModelManifest.from_bytes(manifest_bytes)
        if (manifest.name, manifest.version) != (model, version):
            raise VerificationError(f"{target} holds {manifest.name}@{manifest.version}")
        needed: dict[str, TargetFile] = {}
        for file, sha256, size in package_files(manifest):
            if sha256 in needed or store.has(sha256):
                continue
            blob = updater.get_targetinfo(blob_target(sha256))
            if blob is None or blob.length != size or blob.hashes.get("sha256") != sha256:
                raise VerificationError(f"manifest lists {file} ({sha256[:12]}, {size} bytes), "
                                        "which is not a signed target of that hash and size")
            needed[sha256] = blob
        to_download = [sha for sha in needed if not store.is_staged(sha)]
        tracker.total = tracker.done + sum(needed[sha].length for sha in to_download)
        for sha256 in to_download:
            tracker.label = needed[sha256].path
            store.stage(_download_target(updater, needed[sha256], store, config.download_attempts), sha256)
        store.commit(list(needed))
    return FetchedRelease(manifest, manifest_bytes, stats.bytes_received, stats.metadata_bytes,
                          manifest.total_bytes, len(to_download))


def _download_target(updater: Updater, info: TargetFile, store: BlobStore, attempts: int) -> Path:
    """A temp file in the store holding the verified target; interrupted transfers are retried,
    each retry resuming where the last stopped."""
    tmp = store.temp_path()
    attempt = 1
    try:
        while True:
            try:
                updater.download_target(info, filepath=str(tmp))
                return tmp
            except exceptions.DownloadLengthMismatchError:
                raise
            except exceptions.DownloadError:
                if attempt >= attempts:
                    raise
                attempt += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
