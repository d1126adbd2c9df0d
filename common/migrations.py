"""How a SQLite database's schema changes: an explicit, ordered, append-only list of migrations.

Rules:
- each database names its whole migration list in one place (`stctl/schema.py` for fleet.db,
  `agent/telemetry.py` for telemetry.db); nothing adds to it by being imported, so every process
  applies the same schema whatever it imported first;
- versions strictly increase along the list; a released migration is never edited, reordered or
  removed: a change is a new migration at the end;
- each migration runs in its own transaction together with the `_migrations` row that records
  it, so a crash leaves the schema at one version or the next, never between.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlite_utils

from common.errors import CommonError


class MigrationError(CommonError):
    """A migration list that breaks the rules (versions out of order)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Callable[[sqlite_utils.Database], None]


def migrate(db: sqlite_utils.Database, migrations: Sequence[Migration], applied_at: Callable[[], object],
            applied_at_type: str) -> list[int]:
    """Apply the migrations `db` has not recorded yet, in order; the versions applied now.
    `applied_at()` is the value recorded with each, in a column of `applied_at_type` (each
    database keeps the clock format it was created with)."""
    versions = [m.version for m in migrations]
    if any(b <= a for a, b in zip(versions, versions[1:])):
        raise MigrationError(f"migration versions must strictly increase along the list: {versions}")
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (version INTEGER PRIMARY KEY, name TEXT, "
               f"applied_at {applied_at_type})")
    done = {row[0] for row in db.execute("SELECT version FROM _migrations")}
    applied = []
    for m in migrations:
        if m.version in done:
            continue
        with db.atomic():  # one transaction: the schema change and its record
            m.apply(db)
            db.execute("INSERT INTO _migrations (version, name, applied_at) VALUES (?, ?, ?)",
                       (m.version, m.name, applied_at()))
        applied.append(m.version)
    return applied
