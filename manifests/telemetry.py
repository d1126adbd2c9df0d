"""Telemetry rows: the tables a device records and `fleet.db` pulls.

Rule: these column lists are the contract, in this order, nothing more: the three DESIGN.md
tables (`DESIGN_TABLES`) exactly as DESIGN.md lists them, and `requests` (one row per admitted
completion: the application key's name, never the key, and how it ended: `completed`,
`cancelled` or `failed`). `ts` is the UNIX time in seconds (float) at which the row was
recorded, and `since` filters are on it. A table is added, never changed: old rows stay valid.
"""
from __future__ import annotations

from manifests.errors import ManifestError

TELEMETRY_TABLES: dict[str, dict[str, type]] = {
    "generations": {
        "ts": float, "model": str, "version": str, "prompt_tokens": int, "completion_tokens": int,
        "prefill_ms": float, "decode_ms": float, "decode_tokens_per_s": float, "peak_rss_bytes": int,
        "expert_cache_hits": int, "expert_cache_misses": int, "prefetch_hits": int, "bytes_read": int,
    },
    "updates": {
        "ts": float, "job_id": str, "model": str, "from_version": str, "to_version": str, "state": str,
        "detail": str, "bytes_downloaded": int, "bytes_total": int,
    },
    "health_checks": {
        "ts": float, "model": str, "version": str, "passed": int, "decode_tokens_per_s": float,
        "peak_rss_bytes": int, "detail": str,
    },
    "requests": {
        "ts": float, "key": str, "model": str, "version": str, "outcome": str, "queued_ms": float,
        "prompt_tokens": int, "completion_tokens": int,
    },
}
DESIGN_TABLES = ("generations", "updates", "health_checks")


def telemetry_row(table: str, values: dict) -> dict:
    """`values` restricted to `table`'s columns, each coerced to its type (missing -> None)."""
    columns = check_table(table)
    row = {}
    for name, kind in columns.items():
        value = values.get(name)
        row[name] = None if value is None else kind(value)
    return row


def check_table(table: str) -> dict[str, type]:
    if table not in TELEMETRY_TABLES:
        raise ManifestError(f"telemetry table {table!r}: expected one of {', '.join(TELEMETRY_TABLES)}")
    return TELEMETRY_TABLES[table]
