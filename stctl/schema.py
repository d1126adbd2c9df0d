"""`fleet.db`'s schema: every table the operator side keeps, as one ordered list of migrations.

Rules: this list is the whole schema (`common.migrations`): `stctl.fleetdb.open_fleet_db` applies
it, and no module adds to it by being imported, so a fresh fleet.db is the same whatever a
process imported first. Versions are those the tables were released with (2-19 were never
used); a change to a released table is a new migration at the end, never an edit.
"""
from __future__ import annotations

import sqlite_utils

from common.migrations import Migration
from manifests.telemetry import DESIGN_TABLES, TELEMETRY_TABLES

# a device's outage during a rollout (it does not answer): all NULL while it answers
OUTAGE_COLUMNS = {"unreachable_since": "TEXT", "unreachable_error": "TEXT", "unreachable_attempts": "INTEGER",
                  "fails_at": "REAL"}


def _create_releases(db: sqlite_utils.Database) -> None:
    db["releases"].create(
        {"model": str, "version": str, "manifest_sha256": str, "shards": int, "bytes_full": int,
         "bytes_new": int, "published_at": str, "targets_version": int},
        pk=("model", "version"),
    )


def _create_devices(db: sqlite_utils.Database) -> None:
    db["devices"].create({"name": str, "url": str, "tags": str, "cert_sha256": str, "cert_not_after": str,
                          "enrolled_at": str}, pk="name")


def _create_telemetry(*tables: str):
    def create(db: sqlite_utils.Database) -> None:
        for table in tables:
            db[table].create({"row_key": str, "device": str, **TELEMETRY_TABLES[table]}, pk="row_key")
            db[table].create_index(["device", "ts"])

    return create


def _create_device_status(db: sqlite_utils.Database) -> None:
    db["device_status"].create({"name": str, "reachable": int, "model": str, "version": str,
                                "previous_version": str, "probation": int, "update_state": str,
                                "detail": str, "checked_at": str}, pk="name")


def _create_rollouts(db: sqlite_utils.Database) -> None:
    db["rollouts"].create({"id": int, "model": str, "version": str, "plan": str, "plan_file": str,
                           "repository_url": str, "allow_downgrade": int, "state": str, "wave": int,
                           "requested": str, "detail": str, "created_at": str, "updated_at": str}, pk="id")
    db["rollout_waves"].create({"rollout_id": int, "idx": int, "name": str, "state": str, "soak_until": float,
                                "detail": str, "updated_at": str}, pk=("rollout_id", "idx"))
    db["rollout_devices"].create({"rollout_id": int, "device": str, "wave": int, "state": str, "from_model": str,
                                  "from_version": str, "mark": float, "job_id": str, "requests": int,
                                  "decode_tokens_per_s": float, "peak_rss_bytes": int, "health": str,
                                  "failure": str, "detail": str, "updated_at": str}, pk=("rollout_id", "device"))
    db["rollout_events"].create({"rollout_id": int, "ts": str, "wave": int, "device": str, "state": str,
                                 "detail": str})
    db["rollout_events"].create_index(["rollout_id"])


def _add_outage_columns(db: sqlite_utils.Database) -> None:
    for column, kind in OUTAGE_COLUMNS.items():
        db.execute(f"ALTER TABLE rollout_devices ADD COLUMN {column} {kind}")


def _create_certificates(db: sqlite_utils.Database) -> None:
    db["certificates"].create({"serial": str, "role": str, "name": str, "sha256": str, "not_after": str,
                               "issued_at": str, "revoked_at": str}, pk="serial")
    db["certificates"].create_index(["role", "name"])


def _create_app_keys(db: sqlite_utils.Database) -> None:
    db["app_keys"].create({"id": int, "device": str, "name": str, "digest_prefix": str, "created_at": str,
                           "revoked_at": str}, pk="id")
    db["app_keys"].create_index(["device", "name"])


def _create_call_home(db: sqlite_utils.Database) -> None:
    db["call_home"].create({"device": str, "cert_sha256": str, "seq": int, "polled_at": str}, pk="device")
    db["device_jobs"].create({"device": str, "id": str, "state": str, "model": str, "version": str,
                              "assignment_id": str, "bytes_downloaded": int, "bytes_total": int, "detail": str,
                              "reported_at": str}, pk="device")


def _create_call_home_refusals(db: sqlite_utils.Database) -> None:
    db["call_home_refusals"].create({"id": int, "at": str, "peer": str, "device": str, "status": int,
                                     "reason": str}, pk="id")


def _create_assignments(db: sqlite_utils.Database) -> None:
    db["assignments"].create({"device": str, "id": str, "action": str, "model": str, "version": str,
                              "repository_url": str, "allow_downgrade": int, "window_start_minute": int,
                              "window_end_minute": int, "window_tz": str, "download_now": int,
                              "max_bytes_per_s": int, "assigned_at": str}, pk="device")


def _add_device_server_url(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE devices ADD COLUMN server_url TEXT")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "releases: one row per published model version", _create_releases),
    Migration(2, "devices: one row per enrolled device", _create_devices),
    Migration(20, "generations, updates, health_checks: device telemetry rows with a device column",
              _create_telemetry(*DESIGN_TABLES)),
    Migration(21, "device_status: what each device last said about itself", _create_device_status),
    Migration(22, "rollouts, rollout_waves, rollout_devices, rollout_events", _create_rollouts),
    Migration(23, "rollout_devices: unreachable since, last error, attempts, fails_at", _add_outage_columns),
    Migration(24, "certificates: serials of the device and operator certificates the fleet CA issued, "
                  "and when each was revoked", _create_certificates),
    Migration(25, "app_keys: application keys put on devices (name, digest prefix, created, revoked; "
                  "never the key)", _create_app_keys),
    Migration(26, "requests: the devices' completions by application key and outcome", _create_telemetry("requests")),
    Migration(27, "call_home, device_jobs: each calling-home device's last accepted report (certificate, seq) "
                  "and the update job it reported", _create_call_home),
    Migration(28, "call_home_refusals: reports the fleet server refused (who, why, when)", _create_call_home_refusals),
    Migration(29, "assignments: the release each device should run, with window, download-now and bandwidth cap",
              _create_assignments),
    Migration(30, "devices: the fleet server a device calls home to (NULL: push only)", _add_device_server_url),
)
