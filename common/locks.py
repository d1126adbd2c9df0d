"""Cross-process exclusive locks on a file, through the `filelock` package (flock on Linux and
macOS, `msvcrt.locking` on Windows).

Rules:
- a lock is released by the OS when its process dies, so a killed holder never leaves it stuck;
- two lock objects on one path exclude each other, also within one process, and a lock is not
  tied to the thread that took it (the agent takes its update lock in a request and releases it
  in the job's thread);
- `acquire()` says whether it was taken without waiting (or within `wait_s`); `with lock:` takes
  it or raises `LockHeldError`, `lock.held(error)` raises the caller's own error instead.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock

from common.errors import LockHeldError


class FileLock:
    """An exclusive lock on the file at `path` (created if missing, never deleted)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # a real OS lock always (no soft marker file a crash would leave behind), and the file stays
        self._lock = filelock.FileLock(str(self.path), thread_local=False, is_singleton=False,
                                       fallback_to_soft=False, preserve_lock_file=True)

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the lock (waiting up to `wait_s` seconds); whether it was taken."""
        if self._lock.is_locked:  # not re-entrant: this object holds it already
            return False
        try:
            self._lock.acquire(timeout=wait_s, poll_interval=0.05)
        except filelock.Timeout:
            return False
        return True

    def release(self) -> None:
        """Give the lock up (nothing happens when this object does not hold it)."""
        if self._lock.is_locked:
            self._lock.release(force=True)

    def held_elsewhere(self) -> bool:
        if self.acquire():
            self.release()
            return False
        return True

    @contextmanager
    def held(self, error: BaseException | None = None, wait_s: float = 0.0) -> Iterator[FileLock]:
        """The lock for the `with` block; `error` (or LockHeldError) when it cannot be taken."""
        if not self.acquire(wait_s):
            raise error if error is not None else LockHeldError(f"{self.path}: held by another process")
        try:
            yield self
        finally:
            self.release()

    def __enter__(self) -> FileLock:
        if not self.acquire():
            raise LockHeldError(f"{self.path}: held by another process")
        return self

    def __exit__(self, *exc) -> None:
        self.release()
