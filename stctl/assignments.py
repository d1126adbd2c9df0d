"""Assignments: the release each call-home device should run, kept in fleet.db `assignments`.

Rules:
- one assignment per device at most (`PUT` replaces, `DELETE` removes); only an enrolled device
  can have one, and only a release published in this workspace (`releases`) can be assigned: the
  server names a signed release, the device still verifies it by TUF;
- every field is checked by `manifests.call_home.Assignment.parse` (plus the time zone, which must
  be one the zone database knows, and the repository URL), so what is stored is what a device
  can parse; a refused field raises AssignmentError naming it (`param`);
- the server makes the `id`; putting the same content again keeps it (a retried request is not a
  new instruction), other content gets a new one, so a device acts on each instruction once (to
  repeat an identical instruction, remove it first); a rollout names the id itself (stable per
  rollout, device and action: `stctl.rollout_call_home`), so a resumed rollout that puts it again
  never makes a second instruction;
- the fleet server reads this table at every poll, so `stctl server assign` writes fleet.db
  directly through this module and needs no server process.
"""
from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlite_utils

from manifests import ManifestError
from manifests.call_home import Assignment, Window
from manifests.enrollment import check_repository_url
from manifests.names import check_name
from stctl.errors import StctlError
from stctl.fleetdb import open_fleet_db
from stctl.registry import write_transaction
from stctl.workspace import Workspace

FIELDS = ("action", "model", "version", "repository_url", "allow_downgrade", "window", "download_now",
          "max_bytes_per_s")
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


class AssignmentError(StctlError):
    """An assignment that cannot be made (bad field, unknown device, unpublished release)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownDeviceError(AssignmentError):
    """The device named is not enrolled (or has no assignment to remove)."""


def parse_window(text: str, tz: str) -> dict:
    """`22:00-04:00` in zone `tz` -> the `window` field {start_minute, end_minute, tz}."""
    start, sep, end = text.partition("-")
    clocks = [_CLOCK.match(part.strip()) for part in (start, end)]
    if not sep or not all(clocks):
        raise AssignmentError(f"--window {text!r}: expected HH:MM-HH:MM, e.g. 22:00-04:00", "window")
    minutes = [int(m.group(1)) * 60 + int(m.group(2)) for m in clocks]
    return {"start_minute": minutes[0], "end_minute": minutes[1], "tz": tz}


def _param(message: str) -> str | None:
    """`assignment.window.tz: ...` -> `window.tz`."""
    head = message.split(":", 1)[0]
    return head.split(".", 1)[1] if head.startswith("assignment.") else None


def check_assignment(fields: dict, assignment_id: str) -> Assignment:
    """The assignment `fields` describe (the API body, without id), fully checked."""
    if not isinstance(fields, dict):
        raise AssignmentError("the body must be a JSON object")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise AssignmentError(f"{unknown[0]}: unknown field (expected some of {', '.join(FIELDS)})", unknown[0])
    try:
        assignment = Assignment.parse({"action": "update", **fields, "id": assignment_id})
        if assignment.repository_url is not None:
            check_repository_url(assignment.repository_url)
    except ManifestError as e:
        message = str(e)
        raise AssignmentError(message.removeprefix("assignment."),
                              "repository_url" if "repository url" in message else _param(message)) from None
    if assignment.window is not None:
        try:
            ZoneInfo(assignment.window.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise AssignmentError(f"window.tz: unknown time zone {assignment.window.tz!r} "
                                  "(expected an IANA name such as Europe/Berlin)", "window.tz") from None
    return assignment


def _row(device: str, a: Assignment) -> dict:
    w = a.window
    return {"device": device, "id": a.id, "action": a.action, "model": a.model, "version": a.version,
            "repository_url": a.repository_url, "allow_downgrade": int(a.allow_downgrade),
            "window_start_minute": w.start_minute if w else None, "window_end_minute": w.end_minute if w else None,
            "window_tz": w.tz if w else None, "download_now": int(a.download_now),
            "max_bytes_per_s": a.max_bytes_per_s,
            "assigned_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _assignment(row: dict) -> Assignment:
    window = None if row["window_tz"] is None else Window(row["window_start_minute"], row["window_end_minute"],
                                                          row["window_tz"])
    return Assignment(id=row["id"], action=row["action"], model=row["model"], version=row["version"],
                      repository_url=row["repository_url"], allow_downgrade=bool(row["allow_downgrade"]),
                      window=window, download_now=bool(row["download_now"]), max_bytes_per_s=row["max_bytes_per_s"])


def get_assignment(db: sqlite_utils.Database, device: str) -> Assignment | None:
    rows = list(db["assignments"].rows_where("device = ?", [device]))
    return _assignment(rows[0]) if rows else None


def list_assignments(db: sqlite_utils.Database) -> list[dict]:
    """Every assignment, by device: {device, assigned_at, **the assignment}."""
    return [{"device": r["device"], "assigned_at": r["assigned_at"], **_assignment(r).to_dict()}
            for r in db["assignments"].rows_where(order_by="device")]


def put_assignment(db: sqlite_utils.Database, device: str, fields: dict, assignment_id: str | None = None
                   ) -> Assignment:
    """Give `device` the assignment `fields` describe (replacing its current one); `assignment_id`:
    the id to give it (default: the current one for the same content, else a new one)."""
    try:
        check_name(device, "device")
    except ManifestError as e:
        raise AssignmentError(str(e), "device") from None
    with write_transaction(db):
        if not db["devices"].count_where("name = ?", [device]):
            raise UnknownDeviceError(f"no enrolled device named {device!r}", "device")
        current = get_assignment(db, device)
        assignment = check_assignment(fields, assignment_id or (current.id if current else uuid.uuid4().hex))
        if assignment_id is None and current is not None and assignment != current:
            assignment = check_assignment(fields, uuid.uuid4().hex)
        if not db["releases"].count_where("model = ? AND version = ?", [assignment.model, assignment.version]):
            raise AssignmentError(f"{assignment.model} {assignment.version}: not published in this workspace "
                                  "(stctl model publish)", "version")
        if assignment != current:
            db["assignments"].upsert(_row(device, assignment), pk="device")
    return assignment


def delete_assignment(db: sqlite_utils.Database, device: str) -> Assignment:
    """Remove `device`'s assignment; returns it (UnknownDeviceError if it had none)."""
    with write_transaction(db):
        current = get_assignment(db, device)
        if current is None:
            raise UnknownDeviceError(f"device {device!r} has no assignment", "device")
        db["assignments"].delete(device)
    return current


def default_model(db: sqlite_utils.Database, device: str) -> str:
    """The model an assignment without one means: the device's active model, else the only model published."""
    status = list(db["device_status"].rows_where("name = ? AND model IS NOT NULL", [device]))
    if status:
        return status[0]["model"]
    models = [r[0] for r in db.execute("SELECT DISTINCT model FROM releases ORDER BY model")]
    if len(models) == 1:
        return models[0]
    raise AssignmentError(f"device {device!r} has reported no model and this workspace publishes "
                          f"{len(models)} models; name one with --model", "model")


def assign(workspace: Workspace, device: str, fields: dict) -> dict:
    """`stctl server assign`: `fields` as the API's body; a missing model is `default_model`."""
    db = open_fleet_db(workspace.fleet_db)
    try:
        if fields.get("model") is None:
            if not db["devices"].count_where("name = ?", [device]):
                raise UnknownDeviceError(f"no enrolled device named {device!r}", "device")
            fields = {**fields, "model": default_model(db, device)}
        return {"device": device, **put_assignment(db, device, fields).to_dict()}
    finally:
        db.close()


def unassign(workspace: Workspace, device: str) -> dict:
    db = open_fleet_db(workspace.fleet_db)
    try:
        return {"device": device, **delete_assignment(db, device).to_dict()}
    finally:
        db.close()


def assignments(workspace: Workspace) -> list[dict]:
    db = open_fleet_db(workspace.fleet_db)
    try:
        return list_assignments(db)
    finally:
        db.close()

