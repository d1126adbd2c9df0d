"""Transport for the TUF client: HTTP(S) with retries and resume, and offline bundles; python-tuf verifies.

Rules (python-tuf's FetcherInterface contract):
- every download stops with `DownloadLengthMismatchError` as soon as it exceeds the length the
  signed metadata allows (endless-data attack), and every failure is a tuf `DownloadError`;
- a transport failure (connection refused or reset, timeout, a cut body, HTTP 5xx/408/429: see
  `is_transient`) is retried with exponential backoff and full jitter (`FetcherConfig`: first
  delay, longest delay, retry window); the window restarts when a retry moved a download forward
  by at least one chunk, so a link that keeps cutting but keeps delivering completes, and one
  that delivers nothing fails after the window with a `TransientDownloadError`. Anything else
  (hash mismatch, length overflow, other 4xx, a bad certificate, a local write error) is never
  retried;
- a target download (URL under the targets base URL, content-addressed so its URL names one
  fixed content) goes to `<partial_dir>/<sha256 of URL>.partial` and each retry resumes it with an
  HTTP Range request; a failed download leaves its partial file for a later job to resume; a
  partial whose content then fails verification, or that overflows, is deleted so it is never
  resumed again;
- metadata downloads are small and mutable, so a retry starts them over;
- a set `stop` event ends a backoff wait or a target transfer at once with `UpdateStoppedError`
  (the partial file stays);
- `TransferStats` counts every body byte received, and `progress(bytes)` is called per chunk;
- with `FetcherConfig.max_bytes_per_s` every body chunk (metadata and targets, first tries,
  retries and resumes alike) is charged to one token bucket per fetcher (`agent.rate_limit`),
  reads are no larger than its burst, and a resumed download sends only what it lacks.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
import ssl
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from agent.errors import UpdateStoppedError
from agent.rate_limit import TokenBucket

log = logging.getLogger("st-agent.fetcher")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_RETRIED_STATUS = frozenset({408, 429})  # besides every 5xx


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
    retry_window_s: float = 300.0  # how long one download keeps retrying without progress (0: never retry)
    retry_first_delay_s: float = 1.0  # the first backoff ceiling; it doubles per retry...
    retry_max_delay_s: float = 30.0  # ...up to this (each wait is uniform in [0, ceiling]: full jitter)
    max_bytes_per_s: int | None = None  # the bandwidth cap of every body byte (None: none)


class TransientDownloadError(exceptions.DownloadError):
    """The connection failed or broke: refused, reset, timed out, or cut mid-body (a transient failure)."""


def is_transient(error: BaseException) -> bool:
    """Whether a failed transfer may succeed if tried again later."""
    if isinstance(error, exceptions.DownloadHTTPError):
        return error.status_code >= 500 or error.status_code in _RETRIED_STATUS
    return isinstance(error, TransientDownloadError)


def _connection_failure(url: str, e: urllib3.exceptions.HTTPError) -> exceptions.DownloadError:
    """A urllib3 failure as a tuf DownloadError: transient unless the server's certificate was refused."""
    shown = e.reason if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason else e
    cause: BaseException | None = e
    for _ in range(8):  # MaxRetryError -> SSLError -> ssl.SSLCertVerificationError, at most a few links
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return exceptions.DownloadError(f"{url}: {shown}")
        wrapped = [a for a in getattr(cause, "args", ()) if isinstance(a, BaseException)]
        cause = getattr(cause, "reason", None) or next(iter(wrapped), None) or cause.__cause__ or cause.__context__
    return TransientDownloadError(f"{url}: {shown}")


class _Backoff:
    """Waits between retries of one download: exponential ceiling, full jitter, inside a window
    that opens at the first failure."""

    def __init__(self, config: FetcherConfig):
        self.config = config
        self.attempts = 1
        self.restart()

    def restart(self) -> None:
        """The download made progress: the window (opened by the next failure) and the ceiling start over."""
        self.deadline: float | None = None
        self.retries = 0

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try, or None once the window is spent."""
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.config.retry_window_s
        left = self.deadline - now
        if left <= 0:
            return None
        ceiling = min(self.config.retry_max_delay_s, self.config.retry_first_delay_s * 2 ** min(self.retries, 32))
        self.retries += 1
        self.attempts += 1
        return min(left, random.uniform(0, ceiling))


class _CountingFetcher(FetcherInterface):
    """Shared by both transports: classify and count bytes, report progress."""

    def __init__(self, targets_prefix: str, stats: TransferStats, progress: Callable[[int], None] | None):
        self.targets_prefix = targets_prefix
        self.stats = stats
        self.progress = progress or (lambda n: None)
        self.resumed_bytes = 0  # what the last target download took from a partial file left before it began

    def _count(self, url: str, n: int) -> None:
        self.stats.bytes_received += n
        if not url.startswith(self.targets_prefix):
            self.stats.metadata_bytes += n
        self.progress(n)

    def held_bytes(self, url: str, max_length: int) -> int:
        """Bytes of `url` a download would not transfer again (none: this transport never resumes)."""
        return 0


class HttpFetcher(_CountingFetcher):
    """urllib3 transport with backoff retries and Range resume of target downloads into `.partial` files."""

    def __init__(self, targets_prefix: str, partial_dir: Path, stats: TransferStats,
                 progress: Callable[[int], None] | None = None, config: FetcherConfig = FetcherConfig(),
                 ca_certs: str | None = None, stop: threading.Event | None = None):
        super().__init__(targets_prefix, stats, progress)
        self.partial_dir = partial_dir
        self.config = config
        self.stop = stop or threading.Event()
        self.cap = TokenBucket(config.max_bytes_per_s, self.stop) if config.max_bytes_per_s else None
        self._read_size = self.cap.read_size(config.chunk_size) if self.cap else config.chunk_size
        self._pool = urllib3.PoolManager(  # no urllib3 retries: `_retrying` is the one retry policy
            timeout=urllib3.Timeout(connect=config.socket_timeout, read=config.socket_timeout),
            retries=urllib3.Retry(total=0, redirect=0, raise_on_status=False),
            ca_certs=ca_certs,
        )

    def _request(self, url: str, offset: int = 0) -> urllib3.BaseHTTPResponse:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = self._pool.request("GET", url, headers=headers, preload_content=False)
        except urllib3.exceptions.HTTPError as e:
            raise _connection_failure(url, e) from None
        if response.status >= 400:
            response.release_conn()
            raise exceptions.DownloadHTTPError(f"{url}: HTTP {response.status}", response.status)
        return response

    def _chunks(self, url: str, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            # read1 hands over every byte that arrived, so a cut transfer keeps its bytes for resume
            while chunk := response.read1(self._read_size):
                if self.cap is not None:
                    self.cap.take(len(chunk))
                self._count(url, len(chunk))
                yield chunk
        except urllib3.exceptions.HTTPError as e:
            raise TransientDownloadError(f"{url}: transfer interrupted ({e})") from None
        finally:
            response.release_conn()

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._chunks(url, self._request(url))

    def partial_path(self, url: str) -> Path:
        """Where an interrupted download of `url` is kept for a resume."""
        return self.partial_dir / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".partial")

    def held_bytes(self, url: str, max_length: int) -> int:
        """What the partial file of `url` already holds (0 if it overflows `max_length`: it is discarded)."""
        part = self.partial_path(url)
        size = part.stat().st_size if part.exists() else 0
        return size if size <= max_length else 0

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO]:
        if not url.startswith(self.targets_prefix):
            with tempfile.TemporaryFile() as f:
                self._retrying(url, lambda: self._download_metadata(url, f, max_length), lambda: 0)
                f.seek(0)
                yield f
            return
        part = self.partial_path(url)
        part.parent.mkdir(parents=True, exist_ok=True)
        self.resumed_bytes = self.held_bytes(url, max_length)
        if not self.resumed_bytes:
            part.unlink(missing_ok=True)  # none, or longer than the signed length: start over
        self._retrying(url, lambda: self._download_into(url, part, max_length),
                       lambda: part.stat().st_size if part.exists() else 0)
        try:
            with open(part, "rb") as f:
                yield f
        except BaseException:
            part.unlink(missing_ok=True)  # failed verification: never resume these bytes
            raise
        part.unlink(missing_ok=True)

    def _retrying(self, url: str, attempt: Callable[[], None], position: Callable[[], int]) -> None:
        """Run `attempt` until it succeeds, retrying transient failures with backoff (see the module rules)."""
        backoff = _Backoff(self.config)
        while True:
            before = position()
            try:
                return attempt()
            except exceptions.DownloadError as e:
                if not is_transient(e):
                    raise
                if position() - before >= self.config.chunk_size:
                    backoff.restart()
                delay = backoff.next_delay()
                if delay is None:
                    raise TransientDownloadError(f"{e} (gave up after {backoff.attempts} attempt(s): no progress for "
                                        f"{self.config.retry_window_s:g}s)") from None
                log.info("%s; retry %d in %.1fs", e, backoff.attempts, delay)
                if self.stop.wait(delay):
                    raise UpdateStoppedError(f"{url}: the agent is stopping") from None

    def _download_metadata(self, url: str, out: IO[bytes], max_length: int) -> None:
        out.seek(0)
        out.truncate()
        received = 0
        for chunk in self._fetch(url):
            received += len(chunk)
            if received > max_length:
                raise exceptions.DownloadLengthMismatchError(f"{url}: more than the {max_length} bytes allowed")
            out.write(chunk)

    def _download_into(self, url: str, part: Path, max_length: int) -> None:
        """One try: fetch the bytes `part` lacks (all of them if the server ignores Range)."""
        offset = part.stat().st_size if part.exists() else 0
        if offset >= max_length:
            return  # complete (an earlier try broke after its last byte): python-tuf verifies it
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
                    if self.stop.is_set():
                        raise UpdateStoppedError(f"{url}: the agent is stopping")
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
