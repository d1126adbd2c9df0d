"""Fair turns at one engine: completions wait in one queue per application key, and the engine
goes to the keys in rotation.

Rules:
- one turn at a time (the engine is not thread-safe); a turn ends with `release`;
- the next turn goes to the first waiter of the key that was served longest ago (round robin over
  the keys that have waiters, each key's waiters in arrival order): a key with many queued
  requests waits its turn like a key with one;
- a waiter whose `cancel` event is set, or whose deadline passes, leaves the queue within
  `POLL_S` without a turn; every wait is bounded.
"""
from __future__ import annotations

import threading
import time
from collections import deque

POLL_S = 0.05  # how soon a cancelled waiter notices (cancel is an Event of its own)


class FairQueue:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: dict[str, deque[object]] = {}  # key -> its tickets, in arrival order
        self._served: list[str] = []  # keys in the order they were last served (oldest first)
        self._busy = False

    def waiting(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._waiting.values())

    def acquire(self, key: str, cancel: threading.Event, timeout: float) -> bool:
        """Wait for a turn; False when cancelled or timed out (the caller then has no turn)."""
        ticket = object()
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting.setdefault(key, deque()).append(ticket)
            try:
                while True:
                    if not self._busy and self._next() is ticket:
                        self._take(key)
                        return True
                    remaining = deadline - time.monotonic()
                    if cancel.is_set() or remaining <= 0:
                        self._leave(key, ticket)
                        return False
                    self._cond.wait(min(remaining, POLL_S))
            except BaseException:  # interrupted while waiting: no turn was taken
                self._leave(key, ticket)
                raise

    def release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _next(self) -> object | None:
        """The first ticket of the key with waiters that was served longest ago (never served first)."""
        keys = [k for k in self._waiting if k not in self._served] + [k for k in self._served if k in self._waiting]
        return self._waiting[keys[0]][0] if keys else None

    def _take(self, key: str) -> None:
        queue = self._waiting[key]
        queue.popleft()
        if not queue:
            del self._waiting[key]
        if key in self._served:
            self._served.remove(key)
        self._served.append(key)
        del self._served[:-64]  # bounded memory: the oldest-served keys count as never served
        self._busy = True

    def _leave(self, key: str, ticket: object) -> None:
        queue = self._waiting.get(key)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
            if not queue:
                del self._waiting[key]
        self._cond.notify_all()
