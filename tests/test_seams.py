"""The seams between packages hold: who imports whom, where platform code lives, and fleet.db's
schema is the same however a process came to open it."""
from __future__ import annotations

import ast
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "stctl", "model", "manifests", "common")
# package -> the project's packages it must never import
FORBIDDEN = {
    "stctl": {"agent"},
    "agent": {"stctl"},
    "model": {"agent", "stctl"},
    "manifests": {"agent", "stctl", "model"},
    "common": {"agent", "stctl", "model", "manifests"},
}


def imports_of(path: Path) -> set[str]:
    """Top-level module names `path` imports (at any depth: function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant):
            found.add(str(node.args[0].value).split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_the_side_it_must_not(package):
    offenders = {str(p.relative_to(ROOT)): sorted(imports_of(p) & FORBIDDEN[package])
                 for p in (ROOT / package).rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_fcntl_outside_the_platform_package():
    users = [str(p.relative_to(ROOT)) for package in PACKAGES if package != "common"
             for p in (ROOT / package).rglob("*.py") if "fcntl" in imports_of(p)]
    assert users == []


def _schema(db_path: Path) -> list[tuple]:
    with sqlite3.connect(db_path) as conn:
        return sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name != '_migrations'"))


def _open_in_a_process(db_path: Path, first_import: str) -> None:
    code = f"import {first_import}\nfrom stctl.fleetdb import open_fleet_db\nopen_fleet_db({str(db_path)!r}).close()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_fresh_fleet_db_is_the_same_whatever_was_imported_first(tmp_path):
    schemas = []
    for i, first in enumerate(("stctl.fleetdb", "stctl.rollout", "stctl.cli", "stctl.telemetry_pull")):
        _open_in_a_process(tmp_path / f"{i}.db", first)
        schemas.append(_schema(tmp_path / f"{i}.db"))
    assert all(s == schemas[0] for s in schemas)
    tables = {name for kind, name, _, _ in schemas[0] if kind == "table"}
    assert {"releases", "devices", "rollouts", "rollout_devices", "certificates", "app_keys", "requests",
            "generations", "device_status"} <= tables


def test_an_older_fleet_db_migrates_to_the_fresh_schema(tmp_path):
    from common.migrations import migrate
    from stctl.fleetdb import open_fleet_db
    from stctl.schema import MIGRATIONS

    import sqlite_utils

    old = sqlite_utils.Database(tmp_path / "old.db")
    migrate(old, [m for m in MIGRATIONS if m.version <= 22], lambda: "2026-01-01 00:00:00", "TEXT")
    old["devices"].insert({"name": "pc1", "url": "https://127.0.0.1:1", "tags": "[]"})
    old.close()
    open_fleet_db(tmp_path / "old.db").close()
    open_fleet_db(tmp_path / "fresh.db").close()
    assert _schema(tmp_path / "old.db") == _schema(tmp_path / "fresh.db")
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT name FROM devices").fetchall() == [("pc1",)]  # nothing lost
        assert [v for (v,) in conn.execute("SELECT version FROM _migrations ORDER BY version")] == \
            [m.version for m in MIGRATIONS]


def test_a_migration_list_out_of_order_is_refused(tmp_path):
    import sqlite_utils

    from common.migrations import Migration, MigrationError, migrate

    noop = lambda db: None  # noqa: E731
    with pytest.raises(MigrationError, match="strictly increase"):
        migrate(sqlite_utils.Database(tmp_path / "x.db"), [Migration(2, "b", noop), Migration(1, "a", noop)],
                lambda: 0, "REAL")
