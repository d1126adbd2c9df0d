"""The device's update client: fetch a signed model release into the blob store.

API (all the agent needs):

    store = BlobStore(data_dir / "store")
    client = ReleaseClient(data_dir / "tuf", "http://repo:8080", trusted_root_bytes, store, progress=cb)
    release = client.fetch_release("st-demo", "2.0.0")           # -> FetchedRelease
    store.materialize(release.manifest_bytes, data_dir / "packages" / "st-demo-2.0.0")
    # offline: the same checks, from a bundle file and its own metadata folder
    release = verify_bundle(bundle_path, trusted_root_bytes, data_dir / "tuf-bundle", store)
    # the fleet CA's CRL alone (the daemon's periodic refresh), in a metadata folder of its own
    crl_pem = fetch_crl(data_dir / "tuf-crl", "http://repo:8080", trusted_root_bytes)   # None: none published

`trusted_root_bytes` is the root.json handed over at enrollment; newer roots are followed
through the repository's signed chain. `cb(done_bytes, total_bytes, label)` reports progress
(bytes transferred by this fetch, and what it has to transfer in all). Failures raise
`agent.errors.UpdateError` subclasses (`TransportError` when the repository stayed unreachable
through the fetcher's retry window); a release already in the store is a normal fetch that
downloads no shard.

Rules: python-tuf's `ngclient.Updater` verifies all metadata (signatures, thresholds, versions,
expiry, hashes) and every target; this module adds the release rules on top: the manifest
target must name the requested model and version, and every file it lists must be a signed
`blobs/<sha256>` target of the same sha256 and size. Only files missing from the store are
downloaded; they are installed only after the whole release verified (nothing on failure).
What an earlier fetch left is reused, never trusted by name: a verified blob in `incoming/` is
re-hashed before it counts, a resumed partial download that fails verification is fetched once
more whole (a local bit flip is not an attack; a second failure is), and leftovers this release
does not use are removed when its fetch starts. Before the first shard is downloaded the store
must have room for the bytes still missing (plus the largest file, copied once by python-tuf, plus
`disk_margin_bytes`): otherwise `InsufficientSpaceError` and nothing is downloaded.
The CRL target (`pki/crl.pem`, manifests.release) travels with every release: when the signed
targets list it, a fetch downloads and verifies it like any target right after the metadata
refresh and hands its bytes to `on_crl` before the release itself (so a release that then fails
still delivers it); a CRL that is listed but cannot be downloaded fails the fetch like any
target (it cannot be withheld), except from a bundle, which may not carry it. A repository
without the target has revoked nothing. What the CRL must be is `on_crl`'s rule (agent.revocation).
One updater per metadata folder at a time (an exclusive lock). Limits live in `ClientConfig`.
"""
from __future__ import annotations

import json
import os
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tuf.api import exceptions
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from agent.blobstore import BlobStore
from agent.errors import (
    BundleFormatError, DownloadError, ReleaseNotFoundError, TransportError, UpdaterBusyError, VerificationError,
)
from agent.fetcher import BundleFetcher, FetcherConfig, HttpFetcher, TransferStats, is_transient
from manifests import ManifestError, ModelManifest
from common.locks import FileLock
from manifests.crl import MAX_CRL_BYTES
from manifests.release import (
    BUNDLE_INFO, CRL_TARGET, METADATA_DIR, TARGETS_DIR, blob_target, manifest_target, package_files,
)

Progress = Callable[[int, int, str], None]  # (done bytes, total bytes, label)
CrlSink = Callable[[bytes], None]  # receives the verified bytes of the CRL target


@dataclass(frozen=True)
class ClientConfig:
    """Limits of the update client."""

    max_bundle_info_bytes: int = 64 * 1024
    disk_margin_bytes: int = 64 * 2**20  # free space left over after a download, at the least
    fetcher: FetcherConfig = FetcherConfig()  # timeouts and the retry policy
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
    with FileLock(metadata_dir / ".lock").held(
            UpdaterBusyError(f"{metadata_dir}: another update is using this metadata folder")):
        yield


@contextmanager
def _translated_errors() -> Iterator[None]:
    """python-tuf's and the manifest's errors -> the agent's UpdateError family."""
    try:
        yield
    except exceptions.RepositoryError as e:
        raise VerificationError(f"{type(e).__name__}: {e}") from e
    except exceptions.DownloadError as e:
        error = TransportError if is_transient(e) else DownloadError
        raise error(f"{type(e).__name__}: {e}") from e
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
                 ca_certs: str | None = None, stop: threading.Event | None = None, on_crl: CrlSink | None = None):
        self.metadata_dir = Path(metadata_dir)
        self.base_url = repository_url.rstrip("/") + "/"
        self.trusted_root = trusted_root
        self.store = blob_store
        self.progress = progress
        self.config = config
        self.ca_certs = ca_certs
        self.stop = stop  # set: a backoff wait or transfer under way ends with UpdateStoppedError
        self.on_crl = on_crl

    def fetch_release(self, model: str, version: str) -> FetchedRelease:
        """Refresh metadata, then download and verify every file of `model` `version` the store lacks."""
        with metadata_lock(self.metadata_dir):
            stats, tracker = TransferStats(), _ProgressTracker(self.progress)
            targets_url = self.base_url + TARGETS_DIR + "/"
            fetcher = HttpFetcher(targets_url, self.store.partial_dir, stats, tracker.on_chunk,
                                  self.config.fetcher, self.ca_certs, self.stop)
            updater = _updater(self.metadata_dir, self.base_url, fetcher, self.trusted_root, self.config)
            return _fetch_release(updater, fetcher, stats, tracker, self.store, model, version, self.config,
                                  self.on_crl)


def _updater(metadata_dir: Path, base_url: str, fetcher: HttpFetcher | BundleFetcher, trusted_root: bytes,
             config: ClientConfig) -> Updater:
    with _translated_errors():
        return Updater(str(metadata_dir), base_url + METADATA_DIR + "/", target_base_url=fetcher.targets_prefix,
                       fetcher=fetcher, config=config.updater, bootstrap=trusted_root)


def fetch_crl(metadata_dir: str | os.PathLike, repository_url: str, trusted_root: bytes,
              config: ClientConfig = ClientConfig(), ca_certs: str | None = None,
              stop: threading.Event | None = None) -> bytes | None:
    """Refresh the metadata in `metadata_dir` and download the CRL target: its verified bytes, or
    None when the repository publishes none. Use a metadata folder of its own: an update job
    holds the online folder for its whole fetch."""
    metadata = Path(metadata_dir)
    with metadata_lock(metadata):
        base_url = repository_url.rstrip("/") + "/"
        fetcher = HttpFetcher(base_url + TARGETS_DIR + "/", metadata / "partial", TransferStats(), None,
                              config.fetcher, ca_certs, stop)
        updater = _updater(metadata, base_url, fetcher, trusted_root, config)
        with _translated_errors():
            updater.refresh()
            return _download_crl(updater, fetcher, metadata / ".crl.tmp", bundle=False)


def _download_crl(updater: Updater, fetcher: HttpFetcher | BundleFetcher, tmp: Path, bundle: bool) -> bytes | None:
    """The verified CRL target, None if the signed targets list none (or a bundle does not carry it)."""
    info = updater.get_targetinfo(CRL_TARGET)
    if info is None:
        return None
    if info.length > MAX_CRL_BYTES:
        raise VerificationError(f"{CRL_TARGET}: signed as {info.length} bytes, more than the {MAX_CRL_BYTES} allowed")
    try:
        _download_target(updater, fetcher, info, tmp)
    except exceptions.DownloadHTTPError as e:
        if bundle and e.status_code == 404:
            return None
        raise
    try:
        return tmp.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)


def verify_bundle(bundle_path: str | os.PathLike, trusted_root: bytes, metadata_dir: str | os.PathLike,
                  blob_store: BlobStore, progress: Progress | None = None,
                  config: ClientConfig = ClientConfig(), on_crl: CrlSink | None = None) -> FetchedRelease:
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
        updater = _updater(metadata, fetcher.BASE, fetcher, trusted_root, config)
        return _fetch_release(updater, fetcher, stats, tracker, blob_store, model, version, config, on_crl)


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


def _fetch_release(updater: Updater, fetcher: HttpFetcher | BundleFetcher, stats: TransferStats,
                   tracker: _ProgressTracker, store: BlobStore, model: str, version: str,
                   config: ClientConfig, on_crl: CrlSink | None = None) -> FetchedRelease:
    try:
        target = manifest_target(model, version)
    except ManifestError as e:
        raise ReleaseNotFoundError(str(e)) from None
    with _translated_errors():
        updater.refresh()
        if on_crl is not None:
            tracker.label = CRL_TARGET
            before = stats.bytes_received
            crl = _download_crl(updater, fetcher, store.temp_path(), bundle=isinstance(fetcher, BundleFetcher))
            stats.metadata_bytes += stats.bytes_received - before
            if crl is not None:
                on_crl(crl)
        info = updater.get_targetinfo(target)
        if info is None:
            raise ReleaseNotFoundError(f"{model}@{version}: no such signed release")
        tracker.label = "manifest"
        before = stats.bytes_received
        tmp = _download_target(updater, fetcher, info, store.temp_path())
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
        urls = {sha256: _target_url(fetcher.targets_prefix, blob) for sha256, blob in needed.items()}
        partials = {fetcher.partial_path(url) for url in urls.values()} if isinstance(fetcher, HttpFetcher) else None
        store.keep_only(set(needed), partials)
        to_download = [sha for sha in needed if not store.staged_intact(sha)]
        missing = sum(needed[sha].length - fetcher.held_bytes(urls[sha], needed[sha].length) for sha in to_download)
        if to_download:
            largest = max(needed[sha].length for sha in to_download)
            store.ensure_room(missing + largest + config.disk_margin_bytes,
                              f"{model}@{version} ({missing} bytes to download + {largest} copied once + "
                              f"{config.disk_margin_bytes} margin); no shard was downloaded")
        tracker.total = tracker.done + missing
        for sha256 in to_download:
            tracker.label = needed[sha256].path
            store.stage(_download_target(updater, fetcher, needed[sha256], store.temp_path()), sha256)
        store.commit(list(needed))
    return FetchedRelease(manifest, manifest_bytes, stats.bytes_received, stats.metadata_bytes,
                          manifest.total_bytes, len(to_download))


def _target_url(targets_prefix: str, info: TargetFile) -> str:
    """The URL python-tuf downloads `info` from: with consistent snapshots (always on in this
    project's repositories, see manifests/release.py) `<dirname>/<sha256>.<basename>`."""
    dirname, sep, basename = info.path.rpartition("/")
    return f"{targets_prefix}{dirname}{sep}{info.hashes['sha256']}.{basename}"


def _download_target(updater: Updater, fetcher: HttpFetcher | BundleFetcher, info: TargetFile, tmp: Path) -> Path:
    """`tmp` (a temp file path) holding the verified target. The fetcher retries transport
    failures; a download that resumed a leftover partial and then fails verification is fetched
    once more from its first byte (the fetcher deleted the partial)."""
    try:
        try:
            updater.download_target(info, filepath=str(tmp))
        except exceptions.LengthOrHashMismatchError:
            if not fetcher.resumed_bytes:
                raise
            updater.download_target(info, filepath=str(tmp))
        return tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
