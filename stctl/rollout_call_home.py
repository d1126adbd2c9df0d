"""`CallHomeDevice`: the rollout controller's way to a device that calls home (the
`stctl.rollout_transport.DeviceTransport` interface over fleet.db, never over the network).

The server cannot open a connection to such a device; it can only answer its polls. So:
- "request update" puts an `update` assignment (`stctl.assignments`) whose id is stable per
  rollout and device (`assignment_id`): a resumed controller puts the same id again, and the
  device, which acts on an id once, never starts a second job for it;
- the job is the `device_jobs` row whose `assignment_id` is that id; the job id the controller
  records is the assignment id; nothing reported yet means the update is still requested
  (`idle`);
- status is the device's last report (`device_status`), unreachable (a transient DeviceError)
  before its first report and once it is silent for `stctl.registry.CALL_HOME_SILENT_S`; the
  previous release is taken to be of the active release's model (reports carry its version);
- telemetry is already in fleet.db (reported at every poll): nothing to pull; the mark is the
  newest `ts` the device has reported (its own clock), so rows after it are this update's;
- the health check is the one the device ran during its update: its newest `health_checks` row
  on the new release after the mark (the device reports it no later than the job's `active`);
- rollback puts a `rollback` assignment, also with a stable id, so asking twice rolls back once.
"""
from __future__ import annotations

import hashlib

import sqlite_utils

from manifests import job_states
from manifests.telemetry import TELEMETRY_TABLES
from stctl.assignments import AssignmentError, get_assignment, put_assignment
from stctl.device_client import DeviceError
from stctl.fleetdb import open_fleet_db
from stctl.registry import called_home
from stctl.telemetry_pull import newest_ts
from stctl.workspace import Workspace

UPDATE, ROLLBACK = "update", "rollback"


def assignment_id(rollout: dict, device: str, action: str) -> str:
    """The id of `action`'s assignment for `device` in `rollout` (a rollouts row): stable for
    this rollout, new for every other (also in another workspace: its creation time is in it)."""
    digest = hashlib.sha256(f"{rollout['id']}\n{rollout['created_at']}\n{device}".encode()).hexdigest()[:16]
    return f"rollout-{rollout['id']}-{action}-{digest}"


class CallHomeDevice:
    """Device `name` as fleet.db knows it from its polls, for the rollout `rollout` (its row)."""

    def __init__(self, workspace: Workspace, name: str, rollout: dict):
        self.name, self.rollout = name, rollout
        self.db: sqlite_utils.Database = open_fleet_db(workspace.fleet_db)

    def close(self) -> None:
        self.db.close()

    def _id(self, action: str) -> str:
        return assignment_id(self.rollout, self.name, action)

    def _reported(self) -> dict:
        """The device's last report as a status row; DeviceError (transient) if none or too old."""
        rows = list(self.db["device_status"].rows_where("name = ?", [self.name]))
        row = called_home(self.name, rows[0] if rows else None)
        if not row["reachable"]:
            raise DeviceError(self.name, row["detail"], unreachable=True)
        return row

    def status(self) -> dict:
        row = self._reported()
        active = {"model": row["model"], "version": row["version"]} if row["version"] else None
        previous = {"model": row["model"], "version": row["previous_version"]} if row["previous_version"] else None
        return {"active": active, "previous": previous, "probation": bool(row["probation"]),
                "update": {"state": row["update_state"]} if row["update_state"] else None}

    def mark(self, clock_margin_s: float) -> float:
        return max([0.0] + [ts for t in TELEMETRY_TABLES if (ts := newest_ts(self.db, t, self.name)) is not None])

    def adopt_job(self, model: str, version: str, mark: float) -> str | None:
        """The update assignment if a killed controller put it already (it is the job's id)."""
        current = get_assignment(self.db, self.name)
        return current.id if current is not None and current.id == self._id(UPDATE) else None

    def _put(self, action: str, fields: dict) -> str:
        try:
            return put_assignment(self.db, self.name, {"action": action, **fields}, self._id(action)).id
        except AssignmentError as e:
            raise DeviceError(self.name, f"cannot assign {action}: {e}") from None

    def request_update(self, model: str, version: str, repository_url: str | None, allow_downgrade: bool) -> str:
        return self._put(UPDATE, {"model": model, "version": version, "repository_url": repository_url,
                                  "allow_downgrade": allow_downgrade})

    def update(self, job_id: str) -> dict:
        """The job the device reported for assignment `job_id` (`idle` while none is reported)."""
        jobs = list(self.db["device_jobs"].rows_where("device = ? AND assignment_id = ?", [self.name, job_id]))
        if jobs:
            return {"id": jobs[0]["id"], "state": jobs[0]["state"], "detail": jobs[0]["detail"] or ""}
        self._reported()  # a silent device is unreachable, not "still requested"
        return {"id": None, "state": job_states.IDLE, "detail": "requested; no job reported yet"}

    def health_check(self, model: str, version: str, since: float) -> dict:
        row = self.db.execute("SELECT passed, detail FROM health_checks WHERE device = ? AND model = ? AND version = ? "
                              "AND ts > ? ORDER BY ts DESC LIMIT 1", [self.name, model, version, since]).fetchone()
        if row is None:
            return {"passed": False, "detail": f"no health check of {model} {version} reported since the update"}
        return {"passed": bool(row[0]), "detail": row[1] or ""}

    def rollback(self, model: str, version: str) -> None:
        self._put(ROLLBACK, {"model": model, "version": version})

    def pull_telemetry(self, db: sqlite_utils.Database) -> None:
        """Nothing to pull: the device reports its rows at every poll."""
