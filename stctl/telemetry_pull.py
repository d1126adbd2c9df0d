"""`stctl telemetry pull|show`: the devices' telemetry rows copied into `fleet.db`, and their summary.

Rules: `fleet.db` holds the three DESIGN.md tables (`generations`, `updates`, `health_checks`)
with the same columns plus `device` and `row_key` (sha256 of the device and the row); a pull asks
each device only for rows newer than the newest it already holds (minus a millisecond, so rows
sharing a timestamp across a page boundary are not lost) and inserts with the key as primary key,
so pulling twice, or a pull interrupted at any row, never duplicates nor loses a row (rows a
device reports when it calls home go through the same `insert_rows`). Pages and
devices are bounded (`PullConfig`). The summary is per device and version: median decode
tokens/s, p95 peak RSS, completions, failures (failed update jobs + failed health checks).
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass

import sqlite_utils

from manifests.telemetry import TELEMETRY_TABLES, telemetry_row
from stctl.device_client import ClientConfig, DeviceClient, DeviceError, map_devices
from stctl.fleetdb import open_fleet_db
from stctl.registry import enrolled, write_transaction
from stctl.workspace import Workspace


@dataclass(frozen=True)
class PullConfig:
    page_rows: int = 1000
    max_pages: int = 1000  # per device and table
    concurrency: int = 8  # devices pulled at once
    overlap_s: float = 0.001  # re-ask this much before the newest row held (duplicates are ignored)




def row_key(device: str, row: dict) -> str:
    return hashlib.sha256(json.dumps([device, row], sort_keys=True, default=str).encode()).hexdigest()


def newest_ts(db: sqlite_utils.Database, table: str, device: str) -> float | None:
    return db.execute(f"SELECT MAX(ts) FROM [{table}] WHERE device = ?", [device]).fetchone()[0]


def insert_rows(db: sqlite_utils.Database, table: str, device: str, rows: list[dict]) -> int:
    """Insert the device's rows (restricted to the table's columns) in the caller's transaction;
    returns how many were new. The one way a telemetry row enters fleet.db: pulled here, or
    reported by a device that calls home (`stctl.call_home_store`), a row has the same key."""
    clean = [{"row_key": row_key(device, r), "device": device, **r} for r in (telemetry_row(table, x) for x in rows)]
    before = db.conn.total_changes
    db[table].insert_all(clean, ignore=True)
    return db.conn.total_changes - before


def store_rows(db: sqlite_utils.Database, table: str, device: str, rows: list[dict]) -> int:
    """`insert_rows` in a transaction of its own."""
    with write_transaction(db):
        return insert_rows(db, table, device, rows)


def pull_device(db: sqlite_utils.Database, client: DeviceClient, config: PullConfig = PullConfig(),
                tables: tuple[str, ...] = tuple(TELEMETRY_TABLES)) -> dict[str, int]:
    """Copy the device's new rows of `tables` into `db`; returns new rows per table."""
    added = {}
    for table in tables:
        added[table] = 0
        newest = newest_ts(db, table, client.name)
        since = None if newest is None else newest - config.overlap_s
        for _ in range(config.max_pages):
            rows = client.telemetry(table, since, config.page_rows)
            new = store_rows(db, table, client.name, rows)
            added[table] += new
            if not rows or new == 0:
                break
            since = max(float(r["ts"]) for r in rows) - config.overlap_s
    return added


def pull_fleet(workspace: Workspace, names: list[str] | None = None, config: PullConfig = PullConfig(),
               client_config: ClientConfig = ClientConfig()) -> list[dict]:
    """Pull every device (or `names`); one result per device: new rows per table, or the error."""
    devices = enrolled(workspace, names)
    db = open_fleet_db(workspace.fleet_db)
    db.close()

    def pull(device: dict) -> dict:
        client = DeviceClient.for_device(workspace, device, client_config)
        own = open_fleet_db(workspace.fleet_db)  # one connection per thread
        try:
            return {"device": device["name"], **pull_device(own, client, config), "error": None}
        except DeviceError as e:
            return {"device": device["name"], **{t: 0 for t in TELEMETRY_TABLES}, "error": str(e)}
        finally:
            own.close()
            client.close()

    return map_devices(pull, devices, config.concurrency)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summarize(db: sqlite_utils.Database, device: str | None = None) -> list[dict]:
    """Per device and version: completions, median decode tokens/s, p95 peak RSS, failures."""
    where, args = ("WHERE device = ?", [device]) if device else ("", [])
    groups: dict[tuple[str, str, str], dict] = {}

    def group(dev: str, model: str | None, version: str | None) -> dict:
        key = (dev, model or "", version or "")
        return groups.setdefault(key, {"device": dev, "model": model or "", "version": version or "",
                                       "tps": [], "rss": [], "completions": 0, "failures": 0})

    for dev, model, version, tps, rss in db.execute(
            f"SELECT device, model, version, decode_tokens_per_s, peak_rss_bytes FROM generations {where}", args):
        g = group(dev, model, version)
        g["completions"] += 1
        if tps is not None:
            g["tps"].append(tps)
        if rss is not None:
            g["rss"].append(rss)
    for dev, model, version in db.execute(
            f"SELECT device, model, to_version FROM updates {where} {'AND' if where else 'WHERE'} state = 'failed'", args):
        group(dev, model, version)["failures"] += 1
    for dev, model, version in db.execute(
            f"SELECT device, model, version FROM health_checks {where} {'AND' if where else 'WHERE'} passed = 0", args):
        group(dev, model, version)["failures"] += 1
    out = []
    for key in sorted(groups):
        g = groups[key]
        out.append({"device": g["device"], "model": g["model"], "version": g["version"],
                    "completions": g["completions"],
                    "median_decode_tokens_per_s": statistics.median(g["tps"]) if g["tps"] else None,
                    "p95_peak_rss_bytes": percentile(g["rss"], 95), "failures": g["failures"]})
    return out


def show(workspace: Workspace, device: str | None = None) -> list[dict]:
    if device:
        enrolled(workspace, [device])
    db = open_fleet_db(workspace.fleet_db)
    try:
        return summarize(db, device)
    finally:
        db.close()
