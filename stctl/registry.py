"""The device registry: what `fleet.db` knows about each enrolled device, and a live probe of it.

Rules: the enrolled devices are the `devices` table (stctl.enroll); what a device last said about
itself (reachable, active and previous release, when) is one row per device in `device_status`,
replaced at every probe; speed, memory and health come from the telemetry pulled into `fleet.db`
(stctl.telemetry_pull): the newest generation on the active version, else the newest health check
of it. A probe asks every device at once, at most `concurrency` in flight, each bounded by the
client's timeouts; an unreachable device is reported as such, never as an error of the listing.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import sqlite_utils

from stctl.device_client import ClientConfig, DeviceClient, DeviceError, map_devices, release_of
from stctl.enroll import list_devices
from stctl.errors import StctlError
from stctl.fleetdb import open_fleet_db
from stctl.workspace import Workspace


CALL_HOME_SILENT_S = 600.0  # a call-home device silent this long counts as unreachable (10 polls at 60 s)


class RegistryError(StctlError):
    """A device named on the command line is not enrolled, or the fleet is empty."""




@contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """A write transaction that takes the write lock at its start (`BEGIN IMMEDIATE`), so it waits
    for other writers (busy timeout) instead of failing when a read inside it would need upgrading.
    Statements of sqlite-utils inside it become savepoints."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.conn.rollback()
        raise
    db.conn.commit()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def status_row(name: str, status: dict | None, error: str = "") -> dict:
    active = release_of(status or {})
    previous = release_of(status or {}, "previous")
    update = (status or {}).get("update") or {}
    return {"name": name, "reachable": int(status is not None), "model": active[0] if active else None,
            "version": active[1] if active else None, "previous_version": previous[1] if previous else None,
            "probation": int(bool((status or {}).get("probation"))), "update_state": update.get("state"),
            "detail": error, "checked_at": now_iso()}


def record_status(db: sqlite_utils.Database, name: str, status: dict | None, error: str = "") -> None:
    """Record what the device said; an unreachable device keeps its last known release."""
    row = status_row(name, status, error)
    if status is None:
        row = {k: row[k] for k in ("name", "reachable", "detail", "checked_at")}
    with write_transaction(db):
        db["device_status"].upsert(row, pk="name")


def probe(workspace: Workspace, devices: list[dict], concurrency: int = 16,
          client_config: ClientConfig = ClientConfig(connect_timeout_s=3.0, read_timeout_s=10.0)) -> dict[str, dict]:
    """GET /v1/status of each push device and record it; returns name -> status row. A device that
    calls home (`server_url` set) is not asked: its row is what its last report said, and it counts
    as unreachable once no report came for `CALL_HOME_SILENT_S`."""
    def ask(device: dict) -> tuple[str, dict | None, str]:
        client = DeviceClient.for_device(workspace, device, client_config)
        try:
            return device["name"], client.status(), ""
        except DeviceError as e:
            return device["name"], None, str(e)
        finally:
            client.close()

    answers = map_devices(ask, [d for d in devices if not d.get("server_url")], concurrency)
    db = open_fleet_db(workspace.fleet_db)
    try:
        for name, status, error in answers:
            record_status(db, name, status, error)
        rows = {row["name"]: row for row in db["device_status"].rows}
    finally:
        db.close()
    for device in devices:
        if device.get("server_url"):
            rows[device["name"]] = called_home(device["name"], rows.get(device["name"]))
    return rows


def called_home(name: str, row: dict | None, now: datetime | None = None) -> dict:
    """The status row of a call-home device as the fleet reads it: reachable while its last report
    is at most CALL_HOME_SILENT_S old."""
    if row is None:
        return {"name": name, "reachable": 0, "detail": "has not called home yet", "checked_at": None}
    age = ((now or datetime.now(timezone.utc)) - datetime.fromisoformat(row["checked_at"])).total_seconds()
    if age <= CALL_HOME_SILENT_S:
        return row
    return {**row, "reachable": 0, "detail": f"silent: last called home {row['checked_at']}"}


def _last_figures(db: sqlite_utils.Database, name: str, version: str | None) -> dict:
    clause, args = ("AND version = ?", [name, version]) if version else ("", [name])
    gen = db.execute(f"SELECT decode_tokens_per_s, peak_rss_bytes FROM generations WHERE device = ? {clause} "
                     "ORDER BY ts DESC LIMIT 1", args).fetchone()
    health = db.execute(f"SELECT passed, decode_tokens_per_s, peak_rss_bytes, ts, detail FROM health_checks "
                        f"WHERE device = ? {clause} ORDER BY ts DESC LIMIT 1", args).fetchone()
    figures = gen or (health[1:3] if health else (None, None))
    return {"last_decode_tokens_per_s": figures[0], "last_peak_rss_bytes": figures[1],
            "last_health": None if health is None else ("passed" if health[0] else "failed"),
            "last_health_detail": None if health is None else health[4]}


def fleet_table(workspace: Workspace, probe_devices: bool = True, concurrency: int = 16) -> list[dict]:
    """Every enrolled device: name, url, tags, reachable, model and version, last decode tokens/s,
    last peak RSS, last health result (probing the devices first unless `probe_devices` is False)."""
    devices = list_devices(workspace)
    statuses = probe(workspace, devices, concurrency) if probe_devices and devices else None
    db = open_fleet_db(workspace.fleet_db)
    try:
        if statuses is None:
            statuses = {row["name"]: row for row in db["device_status"].rows}
        out = []
        for d in devices:
            s = statuses.get(d["name"], {})
            out.append({"name": d["name"], "url": d["url"], "tags": d["tags"],
                        "reachable": None if not s else bool(s["reachable"]),
                        "model": s.get("model"), "version": s.get("version"),
                        "previous_version": s.get("previous_version"), "checked_at": s.get("checked_at"),
                        "detail": s.get("detail") or "",
                        **_last_figures(db, d["name"], s.get("version"))})
        return out
    finally:
        db.close()


def enrolled(workspace: Workspace, names: list[str] | None = None) -> list[dict]:
    """The devices table's rows (tags parsed), all or the named ones (an unknown name is an error)."""
    devices = list_devices(workspace)
    if names:
        known = {d["name"]: d for d in devices}
        for n in names:
            if n not in known:
                raise RegistryError(f"no enrolled device named {n!r}")
        devices = [known[n] for n in names]
    return devices

