"""The rollout tables of `fleet.db` (`rollouts`, `rollout_waves`, `rollout_devices`,
`rollout_events`; their schema is in `stctl.schema`): `RolloutStore`, the one way the controller
and the library API read and write them.

Rules: every change of a row is one transaction; a change of state is asked for as an event
(`move_rollout`, `move_wave`, `move_device`), checked against `stctl.rollout_policy`'s tables on
the row as it is inside that transaction (an event the table refuses raises `TransitionError`
and writes nothing), and appends a `rollout_events` row; `set_*` change anything but the state.
One connection shared by the controller's threads, behind a lock.
"""
from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from stctl.fleetdb import open_fleet_db
from stctl.registry import write_transaction
from stctl.rollout_policy import (
    PENDING, REACHABLE, ROLLOUT_FINAL, UNREACHABLE, RolloutError, TransitionError, next_device_state,
    next_rollout_state, next_wave_state,
)
from stctl.schema import OUTAGE_COLUMNS


# a device's outage (it does not answer): all NULL while it answers (the columns: stctl.schema)
NO_OUTAGE = dict.fromkeys(OUTAGE_COLUMNS)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class RolloutStore:
    """The rollout tables of `fleet.db`, shared by the controller's threads (one connection, a lock)."""

    def __init__(self, path: Path):
        open_fleet_db(path).close()  # migrations
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA busy_timeout = 30000")
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # ---- reads -----------------------------------------------------------------------------------
    def rollout(self, rollout_id: int) -> dict:
        with self._lock:
            rows = list(self.db["rollouts"].rows_where("id = ?", [rollout_id]))
        if not rows:
            raise RolloutError(f"no rollout {rollout_id}")
        return rows[0]

    def latest(self, unfinished_only: bool = False) -> dict | None:
        clause = f"state NOT IN ({','.join('?' * len(ROLLOUT_FINAL))})" if unfinished_only else None
        with self._lock:
            rows = list(self.db["rollouts"].rows_where(clause, list(ROLLOUT_FINAL) if clause else [],
                                                       order_by="id desc", limit=1))
        return rows[0] if rows else None

    def waves(self, rollout_id: int) -> list[dict]:
        with self._lock:
            return list(self.db["rollout_waves"].rows_where("rollout_id = ?", [rollout_id], order_by="idx"))

    def devices(self, rollout_id: int, wave: int | None = None) -> list[dict]:
        clause, args = ("rollout_id = ? AND wave = ?", [rollout_id, wave]) if wave is not None else \
            ("rollout_id = ?", [rollout_id])
        with self._lock:
            return list(self.db["rollout_devices"].rows_where(clause, args, order_by="wave, device"))

    def device(self, rollout_id: int, name: str) -> dict:
        with self._lock:
            return self.db["rollout_devices"].get((rollout_id, name))

    def events(self, rollout_id: int) -> list[dict]:
        with self._lock:
            return list(self.db["rollout_events"].rows_where("rollout_id = ?", [rollout_id], order_by="rowid"))

    # ---- writes ----------------------------------------------------------------------------------
    def create(self, row: dict, waves: list[tuple[str, list[str]]]) -> int:
        now = _now()
        with self._lock, write_transaction(self.db):
            self.db["rollouts"].insert({**row, "created_at": now, "updated_at": now})
            rollout_id = self.db.execute("SELECT MAX(id) FROM rollouts").fetchone()[0]
            for idx, (name, devices) in enumerate(waves):
                self.db["rollout_waves"].insert({"rollout_id": rollout_id, "idx": idx, "name": name, "state": PENDING,
                                                 "soak_until": None, "detail": "", "updated_at": now})
                self.db["rollout_devices"].insert_all(
                    {"rollout_id": rollout_id, "device": d, "wave": idx, "state": PENDING, "requests": 0,
                     "failure": "", "detail": "", "updated_at": now} for d in devices)
            self._event(rollout_id, None, None, row["state"], "created")
        return rollout_id

    def _event(self, rollout_id: int, wave: int | None, device: str | None, state: str, detail: str) -> None:
        self.db["rollout_events"].insert({"rollout_id": rollout_id, "ts": _now(), "wave": wave, "device": device,
                                          "state": state, "detail": detail})

    def move_rollout(self, rollout_id: int, event: str, **values) -> str:
        """Apply `event` to the rollout (with `values`); returns its new state."""
        with self._lock, write_transaction(self.db):
            state = next_rollout_state(self.rollout(rollout_id)["state"], event)
            self.db["rollouts"].update(rollout_id, {**values, "state": state, "updated_at": _now()})
            self._event(rollout_id, None, None, state, values.get("detail", ""))
        return state

    def set_rollout(self, rollout_id: int, **values) -> None:
        """Change the rollout's other columns; a `requested` pause or abort appends an event."""
        if "state" in values:
            raise TransitionError("a rollout changes state only through move_rollout")
        with self._lock, write_transaction(self.db):
            self.db["rollouts"].update(rollout_id, {**values, "updated_at": _now()})
            if "requested" in values:
                self._event(rollout_id, None, None, f"requested:{values['requested']}", values.get("detail", ""))

    def move_wave(self, rollout_id: int, idx: int, event: str, **values) -> str:
        """Apply `event` to wave `idx` (with `values`); returns its new state."""
        with self._lock, write_transaction(self.db):
            table = self.db["rollout_waves"]
            state = next_wave_state(table.get((rollout_id, idx))["state"], event)
            table.update((rollout_id, idx), {**values, "state": state, "updated_at": _now()})
            self._event(rollout_id, idx, None, state, values.get("detail", ""))
        return state

    def move_device(self, rollout_id: int, name: str, event: str, **values) -> dict:
        """Apply `event` to the device (with `values`); returns its row."""
        with self._lock, write_transaction(self.db):
            table = self.db["rollout_devices"]
            row = table.get((rollout_id, name))
            state = next_device_state(row["state"], event)
            table.update((rollout_id, name), {**values, "state": state, "updated_at": _now()})
            self._event(rollout_id, row["wave"], name, state, values.get("detail", ""))
            return table.get((rollout_id, name))

    def set_device(self, rollout_id: int, name: str, **values) -> dict:
        """Change the device's other columns (requests, detail, ...); returns its row."""
        if "state" in values:
            raise TransitionError("a device changes state only through move_device")
        with self._lock, write_transaction(self.db):
            table = self.db["rollout_devices"]
            table.update((rollout_id, name), {**values, "updated_at": _now()})
            return table.get((rollout_id, name))

    def note_unreachable(self, rollout_id: int, name: str, error: str, fails_at: float, detail: str) -> dict:
        """Count a failed attempt to reach the device; the first of an outage sets `unreachable_since`
        and appends an `unreachable` event with `detail`. Returns the row."""
        with self._lock, write_transaction(self.db):
            table = self.db["rollout_devices"]
            row = table.get((rollout_id, name))
            values = {"unreachable_error": error, "unreachable_attempts": (row["unreachable_attempts"] or 0) + 1,
                      "fails_at": fails_at}
            if not row["unreachable_since"]:
                values["unreachable_since"] = _now()
                self._event(rollout_id, row["wave"], name, UNREACHABLE, detail)
            table.update((rollout_id, name), values)
        return {**row, **values}

    def clear_unreachable(self, rollout_id: int, name: str, detail: str) -> None:
        """The device answered again: drop its outage and append a `reachable` event with `detail`."""
        with self._lock, write_transaction(self.db):
            table = self.db["rollout_devices"]
            row = table.get((rollout_id, name))
            if row["unreachable_since"]:
                table.update((rollout_id, name), NO_OUTAGE)
                self._event(rollout_id, row["wave"], name, REACHABLE, detail)
