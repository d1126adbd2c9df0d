"""The fleet server's rollout thread (`stctl.rollout_driver.drive_once`) without devices: it drives
only while it holds the workspace's rollout lock, obeys a pause request left behind, leaves a
paused rollout to `stctl rollout resume`, and `--detach` creates or resumes without driving.
(The rollouts it drives to real devices: tests/test_rollout_call_home_e2e.py.)"""
from __future__ import annotations

import json

from typer.testing import CliRunner

from stctl.cli import app
from stctl.enroll import enroll_device
from stctl.rollout import ControllerLock, RolloutConfig, rollout_status
from stctl.rollout_driver import drive_once
from stctl.rollout_store import RolloutStore

pytest_plugins = ["release_fixtures"]

PLAN = """
device_timeout = "3m"
[[waves]]
name = "all"
percent = 100
"""


def cli(ws, *args: str):
    return CliRunner().invoke(app, [*args, "--workspace", str(ws.root)])


def detached(ws, tmp_path) -> int:
    enroll_device(ws, "cpc1", "https://127.0.0.1:1", tmp_path / "cpc1.enroll", "http://127.0.0.1:8080",
                  server_url="https://127.0.0.1:8444")
    (tmp_path / "plan.toml").write_text(PLAN)
    out = cli(ws, "rollout", "start", "--model", "st-demo", "--version", "2.0.0", "--plan", str(tmp_path / "plan.toml"),
              "--detach", "--json")
    assert out.exit_code == 0, out.output
    return json.loads(out.output)["id"]


def test_the_server_drives_only_while_it_holds_the_rollout_lock(workspace, tmp_path):
    rollout_id = detached(workspace, tmp_path)
    lock = ControllerLock(workspace)  # a foreground `stctl rollout resume` drives it
    assert lock.acquire()
    try:
        assert drive_once(workspace, RolloutConfig(), print) is None
        out = cli(workspace, "rollout", "resume")  # and a second foreground controller is refused too
        assert out.exit_code == 1 and "fleet server" in out.output
    finally:
        lock.release()
    assert rollout_status(workspace, rollout_id)["devices"][0]["state"] == "pending"  # nobody asked cpc1


def test_a_pause_request_left_behind_is_obeyed_and_a_paused_rollout_waits_for_resume(workspace, tmp_path):
    rollout_id = detached(workspace, tmp_path)
    store = RolloutStore(workspace.fleet_db)
    try:
        store.set_rollout(rollout_id, requested="pause")  # asked of a server killed before it obeyed
    finally:
        store.close()
    assert drive_once(workspace, RolloutConfig(), print) == "paused"
    assert drive_once(workspace, RolloutConfig(), print) is None  # paused: left alone
    assert rollout_status(workspace, rollout_id)["state"] == "paused"
    out = cli(workspace, "rollout", "resume", "--detach", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["state"] == "running"
    assert rollout_status(workspace, rollout_id)["devices"][0]["state"] == "pending"
