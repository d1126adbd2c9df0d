"""`fleet.db`: the operator's SQLite state (releases, and later devices, rollouts, telemetry).

Rules: WAL mode; the schema changes only through `MIGRATIONS`, an append-only list of
(version, name, function); each migration runs in its own transaction together with the row
that records it in `_migrations`, so a crash leaves the schema at one version or the next.
Never edit or reorder a released migration: append a new one.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import sqlite_utils

Migration = tuple[int, str, Callable[[sqlite_utils.Database], None]]


def _create_releases(db: sqlite_utils.Database) -> None:
    db["releases"].create(
        {"model": str, "version": str, "manifest_sha256": str, "shards": int, "bytes_full": int,
         "bytes_new": int, "published_at": str, "targets_version": int},
        pk=("model", "version"),
    )


MIGRATIONS: list[Migration] = [
    (1, "releases: one row per published model version", _create_releases),
]


def register_migration(migration: Migration) -> None:
    """Add a module's migration (idempotent; versions are unique and applied in order)."""
    version = migration[0]
    existing = [m for m in MIGRATIONS if m[0] == version]
    if existing and existing[0][1] != migration[1]:
        raise ValueError(f"fleet.db migration {version} is registered twice")
    if not existing:
        MIGRATIONS.append(migration)


def open_fleet_db(path: str | os.PathLike) -> sqlite_utils.Database:
    """Open (creating if needed) the fleet database at `path` with every migration applied.

    `path` is the workspace's `fleet.db` (`Workspace.fleet_db`)."""
    db = sqlite_utils.Database(path)
    db.execute("PRAGMA busy_timeout = 5000")
    db.enable_wal()
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
    done = {row[0] for row in db.execute("SELECT version FROM _migrations")}
    for version, name, apply in sorted(MIGRATIONS, key=lambda m: m[0]):
        if version in done:
            continue
        with db.atomic():  # one transaction: the schema change and its record
            apply(db)
            db.execute("INSERT INTO _migrations (version, name, applied_at) VALUES (?, ?, datetime('now'))",
                       (version, name))
    return db
