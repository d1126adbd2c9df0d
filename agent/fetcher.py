"""Transport for the TUF client: HTTP(S) with resume, and offline bundles; python-tuf verifies.

Rules (python-tuf's FetcherInterface contract):
- every download stops with `DownloadLengthMismatchError` as soon as it exceeds the length the
  signed metadata allows (endless-data attack), and every failure is a tuf `DownloadError`;
- a target download (URL under the targets base URL, content-addressed so its URL names one
  fixed content) goes to `<partial_dir>/<sha256 of URL>.partial` and, when interrupted, resumes
  with an HTTP Range request; a partial file whose content then fails verification, or that
  overflows, is deleted so it is never resumed;
- metadata downloads are small and mutable, so they are never resumed;
- `TransferStats` counts every body byte received, and `progress(bytes)` is called per chunk.
"""
from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass
class TransferStats:
    """Body bytes received: everything, and the part that was TUF metadata."""

    bytes_received: int = 0
    metadata_bytes: int = 0


@dataclass(frozen=True)
class FetcherConfig:
    """Transport limits."""

    socket_timeout: float = 30.0  # seconds: connect, and the longest gap between bytes
    chunk_size: int = 1 << 18
    retries: int = 2  # urllib3 connection retries per request (not body resumes)


class _CountingFetcher(FetcherInterface):
    """Shared by both transports: classify and count bytes, report progress."""

    def __init__(self, targets_prefix: str, stats: TransferStats, progress: Callable[[int], None] | None):
        self.targets_prefix = targets_prefix
        self.stats = stats
        self.progress = progress or (lambda n: None)

    def _count(self, url: str, n: int) -> None:
        self.stats.bytes_received += n
        if not url.startswith(self.targets_prefix):
            self.stats.metadata_bytes += n
        self.progress(n)


class HttpFetcher(_CountingFetcher):
    """urllib3 transport with Range resume of target downloads into `.partial` files."""

    def __init__(self, targets_prefix: str, partial_dir: Path, stats: TransferStats,
                 progress: Callable[[int], None] | None = None, config: FetcherConfig = FetcherConfig(),
                 ca_certs: str | None = None):
        super().__init__(targets_prefix, stats, progress)
        self.partial_dir = partial_dir
        self.config = config
        self._pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=config.socket_timeout, read=config.socket_timeout),
            retries=urllib3.Retry(total=config.retries, redirect=0, raise_on_status=False),
            ca_certs=ca_certs,
        )

    def _request(self, url: str, offset: int = 0) -> urllib3.BaseHTTPResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = self._pool.request("GET", url, headers=headers, preload_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"{url}: {e}") from None
        if response.status >= 400:
            response.release_conn()
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {response.status}", response.status)
        return response

    def _chunks(self, url: str, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            # read1 hands over every byte that arrived, so a cut transfer keeps its bytes for resume
            while chunk := response.read1(self.config.chunk_size):
                self._count(url, len(chunk))
                yield chunk
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"{url}: transfer interrupted ({e})") from None
        finally:
            response.release_conn()

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._chunks(url, self._request(url))

    def partial_path(self, url: str) -> Path:
        return self.partial_dir / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".partial")

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO]:
        if not url.startswith(self.targets_prefix):
            with super().download_file(url, max_length) as f:
                yield f
            return
        part = self.partial_path(url)
        part.parent.mkdir(parents=True, exist_ok=True)
        offset = part.stat().st_size if part.exists() else 0
        if offset > max_length:
            part.unlink()
            offset = 0
        if offset < max_length:
            self._download_into(url, part, offset, max_length)
        try:
            with open(part, "rb") as f:
                yield f
        except BaseException:
            part.unlink(missing_ok=True)  # failed verification: never resume these bytes
            raise
        part.unlink(missing_ok=True)

    def _download_into(self, url: str, part: Path, offset: int, max_length: int) -> None:
        try:
            response = self._request(url, offset)
        except exceptions.DownloadHTTPError as e:
            if e.status_code == 416:  # the server's file is shorter than our partial: start over next time
                part.unlink(missing_ok=True)
            raise
        if offset and response.status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                response.release_conn()
                part.unlink(missing_ok=True)
                raise exceptions.DownloadError(f"{url}: server answered Range {offset}- with {m and m.group(0)!r}")
        elif offset:
            offset = 0  # the server ignored Range (plain static server): start over
        received = offset
        with open(part, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            try:
                for chunk in self._chunks(url, response):
                    received += len(chunk)
                    if received > max_length:
                        raise exceptions.DownloadLengthMismatchError(
                            f"{url}: more than the {max_length} bytes signed for it")
                    out.write(chunk)
            except exceptions.DownloadLengthMismatchError:
                part.unlink(missing_ok=True)
                raise
            finally:
                out.flush()  # no fsync: a partial torn by a crash fails verification and is refetched


class BundleFetcher(_CountingFetcher):
    """Serves `metadata/...` and `targets/...` URLs from an offline bundle (a tar file).

    URLs are `bundle:///metadata/<file>` and `bundle:///targets/<path>`; a name that is not a
    regular file member of the tar answers 404, like a static server."""

    BASE = "bundle:///"

    def __init__(self, tar: tarfile.TarFile, stats: TransferStats, progress: Callable[[int], None] | None = None,
                 chunk_size: int = 1 << 18):
        super().__init__(self.BASE + "targets/", stats, progress)
        self.tar = tar
        self.chunk_size = chunk_size

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url[len(self.BASE):] if url.startswith(self.BASE) else None
        try:
            member = self.tar.getmember(name) if name else None
        except KeyError:
            member = None
        if member is None or not member.isfile():
            raise exceptions.DownloadHTTPError(f"{url}: not in the bundle", 404)
        return self._read(url, self.tar.extractfile(member))

    def _read(self, url: str, f: IO[bytes]) -> Iterator[bytes]:
        with f:
            while chunk := f.read(self.chunk_size):
                self._count(url, len(chunk))
                yield chunk
