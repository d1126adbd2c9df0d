"""The device's telemetry store: `telemetry.db` with the three DESIGN.md tables.

Rules: SQLite through sqlite-utils in WAL mode (a killed process never corrupts it); the schema
is `MIGRATIONS`, an explicit append-only list applied by `common.migrations` (each in its own
transaction together with its `_migrations` row); the tables hold exactly the columns of
`manifests.telemetry.TELEMETRY_TABLES`; each table keeps at most `max_rows` rows (the oldest go
first), so the disk never fills. One connection per process, used under a lock by any thread.
Recording is best effort: a failed insert (a full disk) is logged and never fails the caller.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable

import sqlite_utils

from common.migrations import Migration, migrate
from manifests.telemetry import DESIGN_TABLES, TELEMETRY_TABLES, check_table, telemetry_row

log = logging.getLogger("st-agent.telemetry")

def _create_tables(*tables: str) -> Callable[[sqlite_utils.Database], None]:
    def create(db: sqlite_utils.Database) -> None:
        for table in tables:
            db[table].create(TELEMETRY_TABLES[table])
            db[table].create_index(["ts"])

    return create


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "generations, updates, health_checks (DESIGN.md columns), indexed by ts", _create_tables(*DESIGN_TABLES)),
    Migration(2, "requests: one row per admitted completion (key name, outcome)", _create_tables("requests")),
)


class Telemetry:
    """Open (creating and migrating) the telemetry database at `path`."""

    def __init__(self, path: str | os.PathLike, max_rows: int):
        self.max_rows = max_rows
        self._lock = threading.Lock()
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10.0, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA busy_timeout = 10000")
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a crash loses at most the last rows, never the file
        with self._lock:
            migrate(self.db, MIGRATIONS, time.time, "REAL")

    def record(self, table: str, values: dict) -> None:
        """Insert one row (`ts` defaults to now), then trim `table` to `max_rows`."""
        row = telemetry_row(table, {"ts": time.time(), **values})
        try:
            with self._lock, self.db.atomic():
                self.db[table].insert(row)
                self.db.execute(f"DELETE FROM [{table}] WHERE rowid <= (SELECT MAX(rowid) FROM [{table}]) - ?",
                                (self.max_rows,))
        except sqlite3.Error as e:
            log.warning("telemetry: could not record a %s row: %s", table, e)

    def query(self, table: str, since: float | None = None, limit: int = 100) -> list[dict]:
        """Rows of `table` with ts > since, oldest first, at most `limit`."""
        check_table(table)
        with self._lock:
            return list(self.db[table].rows_where("ts > ?", [since if since is not None else -1.0],
                                                  order_by="ts", limit=limit))

    def count(self, table: str) -> int:
        check_table(table)
        with self._lock:
            return self.db.execute(f"SELECT COUNT(*) FROM [{table}]").fetchone()[0]

    def integrity_check(self) -> str:
        with self._lock:
            return self.db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self.db.close()
