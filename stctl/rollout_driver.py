"""The fleet server drives rollouts: `RolloutDriver`, a thread of `stctl server serve` that is the
controller (`stctl.rollout.Controller`) of the workspace's unfinished rollout, so a rollout
completes with no operator process attached (`stctl rollout start --detach`).

Rules:
- it drives only while it holds the workspace's rollout lock (`stctl.rollout.ControllerLock`),
  taken without waiting: a foreground `stctl rollout start|resume` and the server never drive one
  workspace at once; whoever holds the lock drives, the other looks again later;
- every `interval_s` it looks for the unfinished rollout (there is at most one) and drives it
  unless it is paused (`stctl rollout resume` resumes it; an abort request is driven even then); a
  pause request left by a server killed before it obeyed pauses it at once;
- it keeps nothing of its own: every transition is in fleet.db, as for a foreground controller,
  so a server killed at any instant resumes the rollout when it starts again;
- `pause` and `abort` from `stctl rollout` are requests the controller obeys, as with a
  foreground controller;
- an error of a look is said and the rollout tried again at the next; `stop()` ends the thread
  between looks (a controller in the middle of a rollout ends with the server's process, and its
  records resume it).
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from stctl.rollout import Controller, ControllerLock, RolloutConfig
from stctl.rollout_policy import ABORT, PAUSE, PAUSED, RUNNING
from stctl.rollout_store import RolloutStore
from stctl.workspace import Workspace


def drive_once(workspace: Workspace, config: RolloutConfig, say: Callable[[str], None]) -> str | None:
    """Drive the unfinished rollout if the lock is free and it needs a controller; the state it
    ended in (None: nothing driven)."""
    lock = ControllerLock(workspace)
    if not lock.acquire():
        return None
    try:
        store = RolloutStore(workspace.fleet_db)
        try:
            row = store.latest(unfinished_only=True)
            if row is None or (row["state"] == PAUSED and row["requested"] != ABORT):
                return None
            if row["state"] == RUNNING and row["requested"] == PAUSE:
                return store.move_rollout(row["id"], PAUSE, requested="", detail=f"paused in wave {row['wave'] + 1}")
            say(f"rollout {row['id']}: driven by the fleet server ({row['state']}, wave {row['wave'] + 1})")
            return Controller(workspace, store, row["id"], config, say).run()
        finally:
            store.close()
    finally:
        lock.release()


class RolloutDriver:
    """The server's rollout thread: `drive_once` every `interval_s` until `stop()`."""

    def __init__(self, workspace: Workspace, config: RolloutConfig = RolloutConfig(), interval_s: float = 2.0,
                 say: Callable[[str], None] = lambda _m: None):
        self.workspace, self.config, self.interval_s, self.say = workspace, config, interval_s, say
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rollouts", daemon=True)

    def start(self) -> RolloutDriver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                drive_once(self.workspace, self.config, self.say)
            except Exception as e:  # noqa: BLE001 - fleet.db busy, a bug: the server's rollouts go on
                self.say(f"rollouts: {type(e).__name__}: {e}; trying again in {self.interval_s:g}s")
            self._stop.wait(self.interval_s)
