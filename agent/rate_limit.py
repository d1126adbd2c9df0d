"""The download bandwidth cap: a token bucket the fetcher charges with every chunk it receives.

Rules:
- tokens (bytes) refill at `bytes_per_s` up to a burst of `burst_bytes` (an eighth of a second
  at the cap, at least `MIN_BYTES_PER_S`); the bucket starts full;
- `take(n)` charges `n` bytes received and, when that leaves the bucket in debt, waits until the
  debt is paid, so over any stretch the bytes taken stay within the cap plus one burst;
- a wait ends at once when `stop` is set (`UpdateStoppedError`): a capped download stops as fast
  as an uncapped one;
- readers ask `read_size` for their next read, so no single read is much larger than a burst.
"""
from __future__ import annotations

import threading
import time

from agent.errors import UpdateStoppedError
from manifests.call_home import MIN_BYTES_PER_S  # the smallest cap a job takes: one number for both sides


class TokenBucket:
    """A cap of `bytes_per_s` (waits on `stop`, so they end when the agent stops)."""

    def __init__(self, bytes_per_s: int, stop: threading.Event | None = None):
        if bytes_per_s < MIN_BYTES_PER_S:
            raise ValueError(f"a bandwidth cap is at least {MIN_BYTES_PER_S} bytes/s")
        self.rate = float(bytes_per_s)
        self.burst = max(MIN_BYTES_PER_S, bytes_per_s // 8)
        self.stop = stop or threading.Event()
        self.tokens = float(self.burst)
        self.at = time.monotonic()

    def read_size(self, chunk_size: int) -> int:
        return min(chunk_size, self.burst)

    def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - n
        self.at = now
        if self.tokens < 0 and self.stop.wait(-self.tokens / self.rate):
            raise UpdateStoppedError("the agent is stopping")
