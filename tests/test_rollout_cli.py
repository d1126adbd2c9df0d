"""`stctl rollout start` refuses what cannot work before anything happens: a bad plan (the bad field
named), an unpublished version, a wave selecting no device, a second rollout while one is
unfinished. "Nothing happens": no rollout recorded, and no device contacted (the enrolled devices
point at a port where nothing listens, so any contact would show up as a failed device).

Then a rollout over those devices that nothing answers: the live output names them unreachable once
each, the device timeout fails them with a failure that says why, and `fleet.db` keeps the record
(one event per outage; a database made before the record existed is migrated in place)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stctl.cli import app
from stctl.enroll import enroll_device
from stctl.fleetdb import open_fleet_db
from stctl.schema import MIGRATIONS
from stctl.rollout import create_rollout, pause_rollout, rollout_events, rollout_status

pytest_plugins = ["release_fixtures"]

GOOD = "[[waves]]\nname = 'canary'\ntags = { ring = 'canary' }\n[[waves]]\nname = 'rest'\npercent = 100\n"


@pytest.fixture
def fleet_ws(workspace, tmp_path):
    for name, tags in (("pc1", ["ring=canary"]), ("pc2", ["ring=main"])):
        enroll_device(workspace, name, "https://127.0.0.1:9", tmp_path / f"{name}.enroll", "http://127.0.0.1:9", tags)
    return workspace


def start(ws, plan_text: str, tmp_path, version: str = "2.0.0"):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text)
    return CliRunner().invoke(app, ["rollout", "start", "--model", "st-demo", "--version", version, "--plan", str(plan),
                                    "--workspace", str(ws.root)])


def rollouts(ws) -> int:
    db = open_fleet_db(ws.fleet_db)
    try:
        return db["rollouts"].count if "rollouts" in db.table_names() else 0
    finally:
        db.close()


@pytest.mark.parametrize("plan_text, message", [
    (GOOD + "colour = 'red'\n", "colour: unknown key"),
    (GOOD.replace("percent = 100", "percent = 120"), "waves[1].percent: must be <= 100"),
    (GOOD + "soak = -1\n", "waves[1].soak: must be >= 0"),
    (GOOD.replace("'canary' }", "'nightly' }"), "waves[0] (canary): selects no device (no device matches its tags)"),
    ("[[waves]]\npercent = 100\n[[waves]]\nname = 'late'\ncount = 1\n", "waves[1] (late): selects no device"),
])
def test_bad_plan_refused_before_anything_happens(fleet_ws, tmp_path, plan_text, message):
    out = start(fleet_ws, plan_text, tmp_path)
    assert out.exit_code == 1, out.output
    assert message in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) <= 3  # one error line (wrapped at most)
    assert rollouts(fleet_ws) == 0


def test_unpublished_version_and_missing_plan_are_refused(fleet_ws, tmp_path):
    out = start(fleet_ws, GOOD, tmp_path, version="9.9.9")
    assert out.exit_code == 1 and "st-demo 9.9.9 is not published" in out.output
    out = CliRunner().invoke(app, ["rollout", "start", "--model", "st-demo", "--version", "2.0.0", "--plan",
                                   str(tmp_path / "nope.toml"), "--workspace", str(fleet_ws.root)])
    assert out.exit_code == 1 and "cannot read the plan" in out.output
    assert rollouts(fleet_ws) == 0


def test_one_unfinished_rollout_at_a_time_and_pause_without_controller(fleet_ws, tmp_path):
    plan = tmp_path / "good.toml"
    plan.write_text(GOOD)
    first = create_rollout(fleet_ws, "st-demo", "2.0.0", plan)
    out = start(fleet_ws, GOOD, tmp_path)
    assert out.exit_code == 1 and f"rollout {first} (st-demo 2.0.0) is running; resume or abort it" in out.output
    # no controller runs (as after a SIGKILL): pause takes effect at once, nothing was contacted
    assert pause_rollout(fleet_ws)["state"] == "paused"
    status = rollout_status(fleet_ws, first)
    assert status["state"] == "paused" and {d["state"] for d in status["devices"]} == {"pending"}
    shown = CliRunner().invoke(app, ["rollout", "status", "--workspace", str(fleet_ws.root)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "paused" in shown.output and "canary" in shown.output


def test_status_without_rollouts_is_one_line(workspace):
    out = CliRunner().invoke(app, ["rollout", "status", "--workspace", str(workspace.root)])
    assert out.exit_code == 1 and "no rollout yet" in out.output


def test_devices_nothing_answers_are_named_unreachable_and_failed_after_their_timeout(fleet_ws, tmp_path):
    out = start(fleet_ws, "device_timeout = '1.5s'\non_gate_failure = 'halt'\n[[waves]]\npercent = 100\n", tmp_path)
    assert out.exit_code == 1, out.output  # halted: every device failed
    assert "Traceback" not in out.output
    for name in ("pc1", "pc2"):
        said = [line.strip() for line in out.output.splitlines() if line.strip().startswith(f"{name}: unreachable")]
        assert len(said) == 1, out.output  # one line per outage, not one per poll
        assert "connection refused" in said[0] and "still pending; failed in" in said[0]
    status = json.loads(CliRunner().invoke(app, ["rollout", "status", "--json", "--workspace",
                                                 str(fleet_ws.root)]).output)
    assert status["state"] == "halted" and status["waves"][0]["unreachable"] == 0
    for d in status["devices"]:
        assert d["state"] == "failed" and d["unreachable"] is None
        assert d["failure"].startswith("no final update state within 1.5s (in pending; unreachable since ")
        assert "last error: connection refused" in d["failure"]
    events = [(e["device"], e["state"]) for e in rollout_events(fleet_ws, status["id"]) if e["device"]]
    assert sorted(e for e in events if e[1] in ("unreachable", "reachable")) == \
        [("pc1", "unreachable"), ("pc2", "unreachable")]


UNREACHABLE_VERSION = next(m.version for m in MIGRATIONS if m.name.startswith("rollout_devices: unreachable"))


def test_fleet_db_from_before_the_unreachable_record_is_migrated_in_place(fleet_ws, tmp_path):
    plan = tmp_path / "good.toml"
    plan.write_text(GOOD)
    rollout_id = create_rollout(fleet_ws, "st-demo", "2.0.0", plan)
    db = open_fleet_db(fleet_ws.fleet_db)  # back to the schema before the migration
    for column in ("unreachable_since", "unreachable_error", "unreachable_attempts", "fails_at"):
        db.execute(f"ALTER TABLE rollout_devices DROP COLUMN {column}")
    db.execute("DELETE FROM _migrations WHERE version = ?", [UNREACHABLE_VERSION])
    db.conn.commit()
    db.close()
    status = rollout_status(fleet_ws, rollout_id)
    assert [(d["device"], d["state"], d["unreachable"]) for d in status["devices"]] == \
        [("pc1", "pending", None), ("pc2", "pending", None)]
    db = open_fleet_db(fleet_ws.fleet_db)
    try:
        assert {"unreachable_since", "fails_at"} <= set(db["rollout_devices"].columns_dict)
        assert db.execute("SELECT 1 FROM _migrations WHERE version = ?", [UNREACHABLE_VERSION]).fetchone()
    finally:
        db.close()
