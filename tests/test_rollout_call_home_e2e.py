"""Rollouts the fleet server drives to devices that call home: a real `stctl server serve` process
(its rollout thread is the controller) and real `st-agent serve` processes that poll it; the
rollout is started with `stctl rollout start --detach`, and no operator process drives it.

A gated canary -> rest rollout completes; a canary that fails its gate halts the rollout and is
rolled back through a rollback assignment, nobody else moving; the server killed (SIGKILL) in the
middle of the rest wave and started again finishes the rollout. In every case each device ran one
update job for the release (its own telemetry says so) and was asked once (`requests`)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from agent_helpers import JOB_TIMEOUT_S, enrolled_agent, free_port, wait_for
from release_helpers import serve
from stctl.cli import app
from stctl.fleetdb import open_fleet_db
from stctl.rollout import rollout_events, rollout_status
from stctl.rollout_call_home import assignment_id
from stctl.workspace import open_workspace

pytest_plugins = ["release_fixtures", "agent_fixtures"]

DEVICES = ("cpc1", "cpc2")
EXAMPLE_PLAN = Path(__file__).parents[1] / "manifests" / "examples" / "canary-then-rest.toml"


def plan_text(min_tps: float, rest_soak: str) -> str:
    """The shipped canary-then-rest plan with this test's gate and short soaks."""
    text = EXAMPLE_PLAN.read_text()
    assert text.count('soak = "5s"') == 2 and "min_decode_tokens_per_s = 1.0" in text
    text = text.replace("min_decode_tokens_per_s = 1.0", f"min_decode_tokens_per_s = {min_tps}")
    return text.replace('soak = "5s"', 'soak = "0.5s"', 1).replace('soak = "5s"', f'soak = "{rest_soak}"')


class ServerProcess:
    """`stctl server serve` of `ws` on 127.0.0.1:`port` as a process of its own."""

    def __init__(self, ws, port: int, log: Path):
        self.ws, self.port, self.log, self.process = ws, port, log, None

    def start(self) -> ServerProcess:
        stctl = Path(sys.executable).with_name("stctl")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(stctl), "server", "serve", "--listen", f"127.0.0.1:{self.port}", "--poll-interval", "1",
                 "--rollout-interval", "0.5", "--workspace", str(self.ws.root)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(self._up, "the fleet server to listen")
        return self

    def _up(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            return requests.get(f"https://127.0.0.1:{self.port}/healthz", verify=str(self.ws.pki_dir / "ca.crt"),
                                timeout=5).ok
        except requests.RequestException:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)


@pytest.fixture
def call_home_fleet(published_template, v1_template, tmp_path):
    """A private workspace, its repository served, its fleet server process running, and cpc1
    (ring=canary) and cpc2 calling home to it, both on st-demo 1.0.0."""
    shutil.copytree(published_template, tmp_path / "ws")
    ws = open_workspace(tmp_path / "ws")
    port = free_port()
    with serve(ws.repository) as url:
        server = ServerProcess(ws, port, tmp_path / "server.log")
        agents = {}
        try:
            for name in DEVICES:
                agent = enrolled_agent(ws, name, ["ring=canary"] if name == "cpc1" else [], url, v1_template,
                                       tmp_path, server_url=f"https://127.0.0.1:{port}")
                config = json.loads((agent.data_dir / "agent.json").read_text())
                config["call_home"].update(poll_s=0.5, max_backoff_s=1.0)
                (agent.data_dir / "agent.json").write_text(json.dumps(config))
                agents[name] = agent
            server.start()
            for agent in agents.values():
                agent.start()
            wait_for(lambda: reported(ws) == {n: "1.0.0" for n in DEVICES}, "both devices' first reports")
            yield ws, server, agents
        finally:
            for agent in agents.values():
                if agent.process is not None and agent.process.poll() is None:
                    agent.kill()
            server.kill()


def reported(ws) -> dict[str, str]:
    db = open_fleet_db(ws.fleet_db)
    try:
        return {r[0]: r[1] for r in db.execute("SELECT name, version FROM device_status")}
    finally:
        db.close()


def start_detached(ws, tmp_path: Path, min_tps: float, rest_soak: str = "0.5s") -> int:
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text(min_tps, rest_soak))
    out = CliRunner().invoke(app, ["rollout", "start", "--model", "st-demo", "--version", "2.0.0", "--plan", str(plan),
                                   "--detach", "--json", "--workspace", str(ws.root)])
    assert out.exit_code == 0, out.output
    status = json.loads(out.output)
    assert status["state"] == "running" and all(d["state"] == "pending" for d in status["devices"]), status
    return status["id"]


def finished(ws, rollout_id: int) -> dict | None:
    status = rollout_status(ws, rollout_id)
    return status if status["state"] in ("completed", "halted", "aborted") else None


def update_jobs(agent, version: str = "2.0.0") -> set[str]:
    """The update jobs to `version` the device itself recorded (its telemetry.db)."""
    conn = sqlite3.connect(agent.data_dir / "telemetry.db")
    try:
        return {r[0] for r in conn.execute("SELECT DISTINCT job_id FROM updates WHERE to_version = ?", [version])}
    finally:
        conn.close()


def assert_asked_once(ws, status: dict, agents: dict, names: tuple[str, ...]) -> None:
    """Each of `names` was asked once (one request, its job the rollout's assignment) and ran one job."""
    db = open_fleet_db(ws.fleet_db)
    try:
        jobs = {r[0]: r[1:] for r in db.execute("SELECT device, assignment_id, state FROM device_jobs")}
    finally:
        db.close()
    row = {"id": status["id"], "created_at": status["created_at"]}
    for d in status["devices"]:
        if d["device"] in names:
            ours = assignment_id(row, d["device"], "update")
            assert d["requests"] == 1 and d["job_id"] == ours, d
            assert jobs[d["device"]] == (ours, "active"), jobs
            assert len(update_jobs(agents[d["device"]])) == 1, d["device"]


def test_server_drives_a_gated_canary_then_rest_rollout_to_completion(call_home_fleet, tmp_path):
    ws, server, agents = call_home_fleet
    rollout_id = start_detached(ws, tmp_path, min_tps=0.01)
    status = wait_for(lambda: finished(ws, rollout_id), "the server to finish the rollout", 2 * JOB_TIMEOUT_S)
    assert status["state"] == "completed", status
    assert [(w["name"], w["state"]) for w in status["waves"]] == [("canary", "passed"), ("rest", "passed")]
    assert all(d["state"] == "passed" and d["health"] == "passed" and d["decode_tokens_per_s"] > 0 and
               d["peak_rss_bytes"] > 0 for d in status["devices"]), status["devices"]
    assert {n: a.status()["active"]["version"] for n, a in agents.items()} == {n: "2.0.0" for n in DEVICES}
    assert_asked_once(ws, status, agents, DEVICES)
    # the canary passed its gates before the rest was asked
    events = [(e["device"], e["state"]) for e in rollout_events(ws, rollout_id)]
    assert events.index(("cpc1", "passed")) < events.index(("cpc2", "requesting"))


def test_a_canary_failing_its_gate_halts_and_is_rolled_back_through_an_assignment(call_home_fleet, tmp_path):
    ws, server, agents = call_home_fleet
    rollout_id = start_detached(ws, tmp_path, min_tps=1e9)
    status = wait_for(lambda: finished(ws, rollout_id), "the server to halt the rollout", 2 * JOB_TIMEOUT_S)
    assert status["state"] == "halted", status
    devices = {d["device"]: d for d in status["devices"]}
    assert devices["cpc1"]["state"] == "rolled_back" and "tokens/s < gate" in devices["cpc1"]["failure"], devices
    assert devices["cpc2"]["state"] == "pending"
    assert {n: a.status()["active"]["version"] for n, a in agents.items()} == {n: "1.0.0" for n in DEVICES}
    row = {"id": rollout_id, "created_at": status["created_at"]}
    db = open_fleet_db(ws.fleet_db)
    try:
        assigned = {r[0]: r[1:] for r in db.execute("SELECT device, id, action FROM assignments")}
    finally:
        db.close()
    assert assigned == {"cpc1": (assignment_id(row, "cpc1", "rollback"), "rollback")}  # cpc2 was never asked
    assert (len(update_jobs(agents["cpc1"])), len(update_jobs(agents["cpc2"]))) == (1, 0)


def test_server_killed_mid_rollout_and_restarted_finishes_it_updating_each_device_once(call_home_fleet, tmp_path):
    ws, server, agents = call_home_fleet
    rollout_id = start_detached(ws, tmp_path, min_tps=0.01, rest_soak="3s")
    wait_for(lambda: {d["device"]: d["state"] for d in rollout_status(ws, rollout_id)["devices"]}["cpc2"]
             in ("requesting", "updating", "updated"), "the rest wave to ask cpc2", 2 * JOB_TIMEOUT_S)
    server.kill()  # the rest wave is in flight (its soak alone outlasts this): the rollout is not over
    assert rollout_status(ws, rollout_id)["state"] == "running"
    server.start()
    status = wait_for(lambda: finished(ws, rollout_id), "the restarted server to finish the rollout",
                      2 * JOB_TIMEOUT_S)
    assert status["state"] == "completed", status
    assert {n: a.status()["active"]["version"] for n, a in agents.items()} == {n: "2.0.0" for n in DEVICES}
    assert_asked_once(ws, status, agents, DEVICES)
    said = server.log.read_text()
    assert said.count(f"rollout {rollout_id}: driven by the fleet server") >= 2  # the second server took over
