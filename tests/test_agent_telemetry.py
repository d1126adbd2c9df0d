"""The device's telemetry store: the DESIGN.md tables with exactly their columns, WAL, migrations
applied once each, a retention cap, and queries by `since` and `limit`."""
from __future__ import annotations

import sqlite3

import pytest

from agent.telemetry import MIGRATIONS, Telemetry
from manifests import ManifestError
from manifests.telemetry import TELEMETRY_TABLES

DESIGN_COLUMNS = {
    "generations": "ts, model, version, prompt_tokens, completion_tokens, prefill_ms, decode_ms, decode_tokens_per_s, "
                   "peak_rss_bytes, expert_cache_hits, expert_cache_misses, prefetch_hits, bytes_read",
    "updates": "ts, job_id, model, from_version, to_version, state, detail, bytes_downloaded, bytes_total",
    "health_checks": "ts, model, version, passed, decode_tokens_per_s, peak_rss_bytes, detail",
}


def test_tables_have_exactly_the_design_columns_in_wal_mode(tmp_path):
    Telemetry(tmp_path / "t.db", 10).close()
    with sqlite3.connect(tmp_path / "t.db") as db:
        for table, columns in DESIGN_COLUMNS.items():
            assert [row[1] for row in db.execute(f"PRAGMA table_info({table})")] == columns.split(", ")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert set(TELEMETRY_TABLES) == set(DESIGN_COLUMNS) | {"requests"}


def test_a_database_of_the_first_schema_gains_the_requests_table(tmp_path):
    with sqlite3.connect(tmp_path / "t.db") as db:  # what migration 1 alone made
        db.execute("CREATE TABLE _migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at REAL)")
        db.execute("CREATE TABLE updates (ts FLOAT, job_id TEXT)")
        db.execute("INSERT INTO _migrations VALUES (1, 'first', 0)")
        db.execute("INSERT INTO updates VALUES (1.0, 'kept')")
    t = Telemetry(tmp_path / "t.db", 10)
    t.record("requests", {"key": "line4-hmi", "outcome": "cancelled", "completion_tokens": 1})
    assert [r["outcome"] for r in t.query("requests")] == ["cancelled"]
    assert t.count("updates") == 1
    t.close()


def test_migrations_apply_once(tmp_path):
    for _ in range(2):
        Telemetry(tmp_path / "t.db", 10).close()
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert [row[0] for row in db.execute("SELECT version FROM _migrations")] == [m.version for m in MIGRATIONS]


def test_retention_keeps_the_newest_rows_and_queries_page(tmp_path):
    t = Telemetry(tmp_path / "t.db", max_rows=5)
    for i in range(12):
        t.record("updates", {"ts": 100.0 + i, "job_id": f"j{i}", "state": "fetching", "bytes_downloaded": i,
                             "unknown_column": "dropped"})
    rows = t.query("updates", limit=100)
    assert [r["job_id"] for r in rows] == [f"j{i}" for i in range(7, 12)]
    assert set(rows[0]) == set(DESIGN_COLUMNS["updates"].split(", "))
    assert [r["job_id"] for r in t.query("updates", since=109.0)] == ["j10", "j11"]
    assert [r["job_id"] for r in t.query("updates", limit=2)] == ["j7", "j8"]
    with pytest.raises(ManifestError):
        t.query("sqlite_master")
    t.close()


def test_a_failed_insert_never_fails_the_caller(tmp_path):
    t = Telemetry(tmp_path / "t.db", 5)
    t.close()
    t.record("health_checks", {"model": "st-demo", "version": "1.0.0", "passed": True})  # logged, not raised
