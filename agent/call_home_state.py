"""What a calling-home device remembers between polls and across restarts: `call_home.json`.

Rules:
- the file is replaced whole (`common.files.atomic_write_json`) at every change, so after a
  crash it holds the old state or the new, never a torn one; an unreadable file is an error
  (ConfigError), never silently reset;
- `seq` is taken (and saved) before the report that carries it is sent, so it grows strictly
  across restarts and crashes; it is also at least the clock in milliseconds, so a device whose
  state file was lost does not send a seq the server already saw;
- `acked` is, per telemetry table, the newest `ts` the server said it stored: rows up to it are
  never sent again, the rest are (the server stores a resent row once);
- `acted` lists the assignments the device acted on (each is acted on once), and `jobs` links
  an update job to the assignment that started it; both keep only the newest `KEPT` entries.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import ConfigError
from common.files import atomic_write_json, read_json

KEPT = 100


class CallHomeState:
    """The state at `path` (read at once; written at every change)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time):
        self.path, self.clock = path, clock
        try:
            d = read_json(path) or {}
        except (ValueError, OSError) as e:
            raise ConfigError(f"{path}: unreadable call-home state ({e})") from None
        try:
            self.seq = int(d.get("seq", 0))
            self.acked = {str(t): float(ts) for t, ts in d.get("acked", {}).items()}
            self.acted = [str(a) for a in d.get("acted", [])]
            self.jobs = {str(j): str(a) for j, a in d.get("jobs", {}).items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{path}: malformed call-home state ({e})") from None

    def _save(self) -> None:
        atomic_write_json(self.path, {"seq": self.seq, "acked": self.acked, "acted": self.acted[-KEPT:],
                                      "jobs": dict(list(self.jobs.items())[-KEPT:])})

    def next_seq(self) -> int:
        """The seq of the next report, saved before it is returned."""
        self.seq = max(self.seq + 1, int(self.clock() * 1000))
        self._save()
        return self.seq

    def ack(self, acked: dict[str, float]) -> None:
        """Take the server's acks (its word on what it stored replaces ours, table by table)."""
        if acked and any(self.acked.get(t) != ts for t, ts in acked.items()):
            self.acked.update(acked)
            self._save()

    def acted_on(self, assignment_id: str) -> bool:
        return assignment_id in self.acted

    def act(self, assignment_id: str, job_id: str | None = None) -> None:
        """Remember that `assignment_id` was acted on (and, for an update, the job it started)."""
        self.acted.append(assignment_id)
        if job_id is not None:
            self.jobs[job_id] = assignment_id
        self._save()

    def assignment_of(self, job_id: str) -> str | None:
        return self.jobs.get(job_id)
