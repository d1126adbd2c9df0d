"""`fleet.db`: the operator's SQLite state (releases, devices, rollouts, telemetry, keys).

Rules: WAL mode; the schema is `stctl.schema.MIGRATIONS`, applied by `common.migrations` (each
migration in its own transaction together with its `_migrations` row) whenever the database is
opened, so every process sees the whole schema whatever it imported.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone

import sqlite_utils

from common.migrations import migrate
from stctl.schema import MIGRATIONS


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")  # as SQLite's datetime('now')


def open_fleet_db(path: str | os.PathLike) -> sqlite_utils.Database:
    """Open (creating if needed) the fleet database at `path` with every migration applied.

    `path` is the workspace's `fleet.db` (`Workspace.fleet_db`)."""
    db = sqlite_utils.Database(path)
    db.execute("PRAGMA busy_timeout = 5000")
    db.enable_wal()
    migrate(db, MIGRATIONS, _utc_now, "TEXT")
    return db
