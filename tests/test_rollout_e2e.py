"""Staged rollouts against three real `st-agent serve` processes on 127.0.0.1 (st-demo 1.0.0 active,
the repository served by the embedded server): a healthy rollout completes wave by wave; a canary
that fails a gate (an unreachable tokens/s threshold; an unreachable device) halts, the canary
returns to 1.0.0 and no other device changes; devices that do not answer are named unreachable
(status and live output) with the time left until their timeout fails them, and one that comes
back in time is cleared and passes; abort mid-wave rolls back; stctl SIGKILLed mid-rollout and
resumed updates every device exactly once (each state it can die in: test_rollout_resume.py).
Then the fleet commands on the same agents: device list, health, telemetry pull (incremental,
idempotent) and show.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import agent_helpers
from rollout_helpers import DEVICES, V1, V2, WAIT_S, latest_unfinished
from stctl.cli import app
from stctl.fleetdb import open_fleet_db
from stctl.rollout import RolloutConfig, abort_rollout, rollout_events, rollout_status, start_rollout

pytest_plugins = ["release_fixtures", "agent_fixtures", "rollout_fixtures"]

pytestmark = pytest.mark.slow

CANARY_PLAN = """
max_concurrent = 2
device_timeout = "3m"
[gates]
min_decode_tokens_per_s = {min_tps}
health_check = true
[[waves]]
name = "canary"
tags = {{ ring = "canary" }}
count = 1
soak = "0.5s"
[[waves]]
name = "rest"
percent = 100
"""

ONE_WAVE_PLAN = """
max_concurrent = 1
device_timeout = "3m"
[gates]
health_check = false
[[waves]]
name = "all"
percent = 100
soak = "{soak}"
"""

# the canary passes on its own; the rest, if they do not answer, fail after `timeout` and halt the rollout
UNREACHABLE_PLAN = """
max_concurrent = 2
on_gate_failure = "halt"
[gates]
health_check = false
[[waves]]
name = "canary"
tags = {{ ring = "canary" }}
count = 1
device_timeout = "3m"
[[waves]]
name = "rest"
percent = 100
device_timeout = "{timeout}"
"""

CANARY_ONLY_PLAN = """
device_timeout = "2m"
[gates]
health_check = false
[[waves]]
name = "canary"
tags = { ring = "canary" }
count = 1
"""


def replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stctl(ws, *args: str) -> subprocess.Popen:
    script = Path(sys.executable).with_name("stctl")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "stctl.cli"]
    return subprocess.Popen(cmd + list(args) + ["--workspace", str(ws.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})


def device_states(ws, rollout_id: int) -> dict[str, str]:
    return {d["device"]: d["state"] for d in rollout_status(ws, rollout_id)["devices"]}


# ---- rollouts -------------------------------------------------------------------------------------
def test_healthy_rollout_completes_wave_by_wave(fleet3, on_v1, tmp_path):
    plan = fleet3.plan(tmp_path, CANARY_PLAN.format(min_tps=0.01))
    said: list[str] = []
    result = start_rollout(fleet3.ws, "st-demo", "2.0.0", plan, say=said.append)
    assert result["state"] == "completed", result
    assert [(w["name"], w["state"], w["devices"], w["done"]) for w in result["waves"]] == \
        [("canary", "passed", 1, 1), ("rest", "passed", 2, 2)]
    assert all(d["state"] == "passed" and d["decode_tokens_per_s"] > 0 and d["peak_rss_bytes"] > 0 and
               d["health"] == "passed" and d["requests"] == 1 for d in result["devices"]), result["devices"]
    assert fleet3.active() == {n: V2 for n in DEVICES}
    # wave by wave: the canary passed its gates before any other device was asked to update
    events = rollout_events(fleet3.ws, result["id"])
    canary_passed = next(i for i, e in enumerate(events) if e["device"] == "d1" and e["state"] == "passed")
    first_other = next(i for i, e in enumerate(events) if e["device"] in ("d2", "d3") and e["state"] == "requesting")
    assert canary_passed < first_other
    assert {n: len(j) for n, j in fleet3.jobs_since(on_v1).items()} == {"d1": 1, "d2": 1, "d3": 1}

    shown = CliRunner().invoke(app, ["rollout", "status", "--workspace", str(fleet3.ws.root), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["state"] == "completed"
    table = CliRunner().invoke(app, ["rollout", "status", "--workspace", str(fleet3.ws.root)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "canary" in table.output and "completed" in table.output


def test_canary_failing_tokens_per_s_gate_halts_and_rolls_back(fleet3, on_v1, tmp_path):
    plan = fleet3.plan(tmp_path, CANARY_PLAN.format(min_tps=1e9))
    result = start_rollout(fleet3.ws, "st-demo", "2.0.0", plan)
    assert result["state"] == "halted", result
    states = {d["device"]: d for d in result["devices"]}
    assert states["d1"]["state"] == "rolled_back" and "tokens/s < gate" in states["d1"]["failure"], brief(result)
    assert states["d2"]["state"] == states["d3"]["state"] == "pending"
    assert [w["state"] for w in result["waves"]] == ["failed", "pending"]
    assert fleet3.active() == {n: V1 for n in DEVICES}  # the canary is back on 1.0.0, nobody else moved
    assert {n: len(j) for n, j in fleet3.jobs_since(on_v1).items()} == {"d1": 1, "d2": 0, "d3": 0}

    # a halted rollout is over: resume refuses with one line
    out = CliRunner().invoke(app, ["rollout", "resume", "--workspace", str(fleet3.ws.root)])
    assert out.exit_code == 1 and "no unfinished rollout" in out.output


def test_canary_failing_its_health_check_halts_and_nobody_else_moves(fleet3, on_v1, tmp_path):
    """The canary installs 2.0.0, then (while soaking) one of its files goes bad: its health check
    fails, the device rolls itself back, the rollout halts before any other device."""
    import threading

    plan = fleet3.plan(tmp_path, CANARY_PLAN.format(min_tps=0.01).replace('soak = "0.5s"', 'soak = "5s"'))
    results: list[dict] = []
    runner = threading.Thread(target=lambda: results.append(start_rollout(fleet3.ws, "st-demo", "2.0.0", plan)))
    runner.start()
    try:
        rollout_id = wait_for(lambda: (r := latest_unfinished(fleet3.ws)) and r["id"], "the rollout to be recorded")
        wait_for(lambda: device_states(fleet3.ws, rollout_id)["d1"] == "updated", "the canary on 2.0.0")
        shard = fleet3.agents["d1"].data_dir / "releases" / "st-demo" / "2.0.0" / "shards" / "head.safetensors"
        good = shard.read_bytes()
        replace_file(shard, good[:-1] + b"\0")  # a new file: the blob it was linked to stays intact
        runner.join(timeout=WAIT_S)
    finally:
        runner.join(timeout=WAIT_S)
        if "good" in locals():
            replace_file(shard, good)  # the next tests install 2.0.0 on d1 again
    [result] = results
    assert result["state"] == "halted", brief(result)
    states = {d["device"]: d for d in result["devices"]}
    assert states["d1"]["state"] == "failed" and states["d1"]["health"] == "failed"
    assert "health check failed" in states["d1"]["failure"] and "the device rolled back" in states["d1"]["failure"]
    assert states["d2"]["state"] == states["d3"]["state"] == "pending"
    assert fleet3.active() == {n: V1 for n in DEVICES}
    assert {n: len(j) for n, j in fleet3.jobs_since(on_v1).items()} == {"d1": 1, "d2": 0, "d3": 0}


def test_unreachable_canary_fails_after_its_timeout(fleet3, on_v1, tmp_path):
    url = fleet3.agents["d1"].url("").rstrip("/")
    fleet3.set_url("d1", "https://127.0.0.1:9")  # nothing listens there
    try:
        plan = fleet3.plan(tmp_path, CANARY_PLAN.format(min_tps=0.01).replace('"3m"', '"2s"'))
        result = start_rollout(fleet3.ws, "st-demo", "2.0.0", plan)
    finally:
        fleet3.set_url("d1", url)
    assert result["state"] == "halted"
    d1 = next(d for d in result["devices"] if d["device"] == "d1")
    assert d1["state"] == "failed" and "no final update state within 2s" in d1["failure"] and "unreachable" in d1["failure"]
    assert fleet3.active() == {n: V1 for n in DEVICES}
    assert {n: len(j) for n, j in fleet3.jobs_since(on_v1).items()} == {"d1": 0, "d2": 0, "d3": 0}


def test_unreachable_devices_are_named_with_their_time_left_then_failed(fleet3, on_v1, tmp_path):
    """Two of three devices enrolled where nothing listens: while the controller retries them,
    `rollout status` names them unreachable with the last error and a time left that runs down; the
    live output of `rollout start` says so once per device (not once per poll); the device timeout
    then fails them with a failure that says since when they were unreachable and why."""
    ws = fleet3.ws
    urls = {name: fleet3.agents[name].url("").rstrip("/") for name in ("d2", "d3")}
    open_fleet_db(ws.fleet_db).close()  # migrated here, not raced by the two processes below
    plan = fleet3.plan(tmp_path, UNREACHABLE_PLAN.format(timeout="8s"))
    for name in urls:
        fleet3.set_url(name, "https://127.0.0.1:9")  # nothing listens there
    controller = stctl(ws, "rollout", "start", "--model", "st-demo", "--version", "2.0.0", "--plan", str(plan))
    try:
        def shown_unreachable() -> dict | None:
            out = cli(ws, "rollout", "status", "--json")
            devices = {d["device"]: d for d in json.loads(out.output)["devices"]} if out.exit_code == 0 else {}
            return devices if all(devices.get(name, {}).get("unreachable") for name in urls) else None

        first = wait_for(shown_unreachable, "d2 and d3 shown unreachable")
        time.sleep(1.0)
        later = shown_unreachable()
        assert later is not None, "d2 and d3 were failed before a second look: lengthen their device_timeout"
        for name in urls:
            seen, again = first[name]["unreachable"], later[name]["unreachable"]
            assert first[name]["state"] == "pending" and seen["last_error"] == "connection refused", first[name]
            assert seen["since"] and seen["attempts"] >= 1
            assert 0 < again["time_left_s"] < seen["time_left_s"] <= 8, (seen, again)  # the real countdown
        table = cli(ws, "rollout", "status")
        assert table.exit_code == 0 and "(unreachable)" in table.output and "refused" in table.output, table.output
        assert controller.wait(timeout=WAIT_S) == 1  # the failed devices fail the gate: halted
        output = controller.stdout.read().decode()
    finally:
        if controller.poll() is None:
            controller.kill()
        for name, url in urls.items():
            fleet3.set_url(name, url)

    result = rollout_status(ws)
    assert result["state"] == "halted", brief(result)
    devices = {d["device"]: d for d in result["devices"]}
    assert devices["d1"]["state"] == "passed" and devices["d1"]["unreachable"] is None
    for name in urls:
        said = [line.strip() for line in output.splitlines() if line.strip().startswith(f"{name}: unreachable")]
        assert len(said) == 1 and "connection refused" in said[0] and "failed in" in said[0], output
        d = devices[name]
        assert d["state"] == "failed" and d["unreachable"] is None, d
        assert "no final update state within 8s (in pending; unreachable since " in d["failure"], d["failure"]
        assert "last error: connection refused" in d["failure"]
        assert int(re.search(r"(\d+) failed attempts", d["failure"]).group(1)) > 1  # retried, yet said once
    outages = [(e["device"], e["state"]) for e in rollout_events(ws, result["id"])
               if e["state"] in ("unreachable", "reachable")]
    assert sorted(outages) == [("d2", "unreachable"), ("d3", "unreachable")]  # one event per outage
    assert {n: len(j) for n, j in fleet3.jobs_since(on_v1).items()} == {"d1": 1, "d2": 0, "d3": 0}


def test_device_down_then_back_before_its_timeout_is_cleared_and_passes(fleet3, on_v1, tmp_path, monkeypatch):
    ws = fleet3.ws
    agent = fleet3.agents["d1"]
    port = agent.port
    plan = fleet3.plan(tmp_path, CANARY_ONLY_PLAN)
    said: list[str] = []
    results: list[dict] = []
    agent.stop()
    runner = threading.Thread(target=lambda: results.append(
        start_rollout(ws, "st-demo", "2.0.0", plan, config=RolloutConfig(poll_s=0.2), say=said.append)))
    runner.start()
    try:
        rollout_id = wait_for(lambda: (r := latest_unfinished(ws)) and r["id"], "the rollout to be recorded")
        outage = wait_for(lambda: rollout_status(ws, rollout_id)["devices"][0]["unreachable"], "d1 shown unreachable")
        assert outage["last_error"] == "connection refused" and outage["time_left_s"] > 0
        monkeypatch.setattr(agent_helpers, "free_port", lambda: port)  # back at the address it is enrolled with
        agent.start()
        runner.join(timeout=WAIT_S)
    finally:
        runner.join(timeout=WAIT_S)
        if agent.process.poll() is not None:  # the restart failed: bring d1 back for the next tests
            monkeypatch.undo()
            agent.start()
            fleet3.set_url("d1", agent.url("").rstrip("/"))
    [result] = results
    assert result["state"] == "completed", brief(result)
    [d1] = result["devices"]
    assert (d1["state"], d1["unreachable"], d1["failure"], d1["requests"]) == ("passed", None, "", 1), d1
    events = [e["state"] for e in rollout_events(ws, result["id"]) if e["device"] == "d1"]
    assert events[:3] == ["unreachable", "reachable", "requesting"], events  # cleared by its first answer
    assert events.count("unreachable") == events.count("reachable") == 1
    assert len([m for m in said if m.strip().startswith("d1: unreachable")]) == 1, said
    assert len([m for m in said if m.strip().startswith("d1: answers again")]) == 1, said
    assert fleet3.active()["d1"] == V2


def test_abort_mid_wave_rolls_back(fleet3, on_v1, tmp_path):
    plan = fleet3.plan(tmp_path, ONE_WAVE_PLAN.format(soak="0s"))
    controller = stctl(fleet3.ws, "rollout", "start", "--model", "st-demo", "--version", "2.0.0", "--plan", str(plan))
    try:
        ws = fleet3.ws
        rollout_id = wait_for(lambda: (r := latest_unfinished(ws)) and r["id"], "the rollout to be recorded")
        wait_for(lambda: "updated" in device_states(ws, rollout_id).values(), "a first device on 2.0.0")
        result = abort_rollout(ws, rollout_id)  # the controller is alive: asks it, waits until aborted
        assert result["state"] == "aborted", result
        assert controller.wait(timeout=WAIT_S) == 1  # the controller's `rollout start` reports the abort
        assert "aborted" in controller.stdout.read().decode()
    finally:
        if controller.poll() is None:
            controller.kill()
    states = device_states(fleet3.ws, rollout_id)
    assert "rolled_back" in states.values() and "pending" in states.values(), states  # stopped mid-wave
    assert fleet3.active() == {n: V1 for n in DEVICES}


def test_pause_lets_the_update_in_flight_finish_and_resume_completes(fleet3, on_v1, tmp_path):
    plan = fleet3.plan(tmp_path, ONE_WAVE_PLAN.format(soak="0s"))
    controller = stctl(fleet3.ws, "rollout", "start", "--model", "st-demo", "--version", "2.0.0", "--plan", str(plan))
    ws = fleet3.ws
    try:
        rollout_id = wait_for(lambda: (r := latest_unfinished(ws)) and r["id"], "the rollout to be recorded")
        wait_for(lambda: device_states(ws, rollout_id)["d1"] != "pending", "d1 started")
        paused = cli(ws, "rollout", "pause", "--json")
        assert paused.exit_code == 0, paused.output
        assert controller.wait(timeout=WAIT_S) == 0  # the controller stops by itself after d1
    finally:
        if controller.poll() is None:
            controller.kill()
    status = rollout_status(ws, rollout_id)
    assert status["state"] == "paused", status
    states = device_states(ws, rollout_id)
    assert states["d1"] == "updated" and states["d3"] == "pending", states  # in flight finished, no new start
    out = cli(ws, "rollout", "resume", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["state"] == "completed"
    assert fleet3.active() == {n: V2 for n in DEVICES}
    assert {n: len(j) for n, j in fleet3.jobs_since(on_v1).items()} == {"d1": 1, "d2": 1, "d3": 1}


def test_killed_stctl_resumes_and_updates_every_device_exactly_once(fleet3, on_v1, tmp_path):
    plan = fleet3.plan(tmp_path, ONE_WAVE_PLAN.format(soak="0s"))
    controller = stctl(fleet3.ws, "rollout", "start", "--model", "st-demo", "--version", "2.0.0", "--plan", str(plan))
    ws = fleet3.ws
    try:
        rollout_id = wait_for(lambda: (r := latest_unfinished(ws)) and r["id"], "the rollout to be recorded")
        # kill while the second device's update is in flight (the first is done, the third pending)
        wait_for(lambda: device_states(ws, rollout_id).get("d2") == "updating", "d2 updating")
    finally:
        controller.send_signal(signal.SIGKILL)
        controller.wait(timeout=30)
    before = device_states(ws, rollout_id)
    assert before["d3"] in ("pending", "requesting", "updating"), before  # killed mid-wave
    assert rollout_status(ws, rollout_id)["state"] == "running"

    out = CliRunner().invoke(app, ["rollout", "resume", "--workspace", str(ws.root), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["state"] == "completed", result
    assert {d["device"]: (d["state"], d["requests"]) for d in result["devices"]} == \
        {n: ("passed", 1) for n in DEVICES}
    assert fleet3.active() == {n: V2 for n in DEVICES}
    assert {n: len(j) for n, j in fleet3.jobs_since(on_v1).items()} == {"d1": 1, "d2": 1, "d3": 1}


def brief(result: dict) -> list:
    return [(d["device"], d["state"], d["failure"], d["detail"]) for d in result["devices"]]



# ---- fleet commands on the same agents ------------------------------------------------------------
def cli(ws, *args: str):
    return CliRunner().invoke(app, [*args, "--workspace", str(ws.root)], env={"COLUMNS": "200"})


def test_fleet_device_list_shows_reachability_release_and_figures(fleet3):
    out = cli(fleet3.ws, "device", "list", "--json")
    assert out.exit_code == 0, out.output
    devices = {d["name"]: d for d in json.loads(out.output)}
    assert set(devices) == set(DEVICES)
    assert devices["d1"]["tags"] == {"ring": "canary", "line": "4"}
    for d in devices.values():
        assert d["reachable"] is True and d["model"] == "st-demo" and d["version"] in ("1.0.0", "2.0.0")
        assert d["last_decode_tokens_per_s"] > 0 and d["last_peak_rss_bytes"] > 0  # from the rollouts' pulls
    url = fleet3.agents["d3"].url("").rstrip("/")
    fleet3.set_url("d3", "https://127.0.0.1:9")
    try:
        out = cli(fleet3.ws, "device", "list")
    finally:
        fleet3.set_url("d3", url)
    assert out.exit_code == 0 and "d3" in out.output and "no" in out.output


def test_fleet_health_checks_devices_and_reports_failures(fleet3):
    out = cli(fleet3.ws, "health", "--device", "d1", "--json")
    assert out.exit_code == 0, out.output
    [d1] = json.loads(out.output)
    assert d1["device"] == "d1" and d1["passed"] is True and d1["decode_tokens_per_s"] > 0
    listed = {d["name"]: d for d in json.loads(cli(fleet3.ws, "device", "list", "--offline", "--json").output)}
    assert listed["d1"]["last_health"] == "passed"
    out = cli(fleet3.ws, "health", "--device", "nope")
    assert out.exit_code == 1 and "no enrolled device named 'nope'" in out.output and "Traceback" not in out.output


def test_fleet_telemetry_pull_is_incremental_and_idempotent(fleet3):
    ws = fleet3.ws
    assert cli(ws, "telemetry", "pull").exit_code == 0
    again = cli(ws, "telemetry", "pull", "--json")
    assert again.exit_code == 0, again.output
    assert all(r["generations"] == r["updates"] == r["health_checks"] == 0 for r in json.loads(again.output))
    agent = fleet3.agents["d2"]
    version = agent.status()["active"]["version"]
    agent.complete(max_tokens=3)
    pulled = json.loads(cli(ws, "telemetry", "pull", "--device", "d2", "--json").output)
    assert pulled == [{"device": "d2", "generations": 1, "updates": 0, "health_checks": 0, "requests": 1, "error": None}]
    db = open_fleet_db(ws.fleet_db)
    for table in ("generations", "updates", "health_checks"):  # fleet.db holds exactly the device's rows
        on_device = agent.get("/v1/telemetry", params={"table": table, "limit": 1000}).json()["rows"]
        assert db[table].count_where("device = ?", ["d2"]) == len(on_device)
    db.close()
    shown = {(r["device"], r["version"]): r for r in json.loads(cli(ws, "telemetry", "show", "--json").output)}
    d2 = shown[("d2", version)]
    assert d2["completions"] >= 1 and d2["median_decode_tokens_per_s"] > 0 and d2["p95_peak_rss_bytes"] > 0
    table = cli(ws, "telemetry", "show", "--device", "d2")
    assert table.exit_code == 0 and "d2" in table.output and "median" in table.output
