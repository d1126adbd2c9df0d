"""A real `st-agent serve` that calls home to the real fleet server (stctl.fleet_server in a
thread, over mTLS): its status and telemetry reach fleet.db exactly once, it updates itself to
the release assigned to it, ignores an assignment whose window is closed, and backs off while the
server is down and resumes when it is back, losing no row."""
from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app as agent_cli
from agent_helpers import JOB_TIMEOUT_S, enrolled_agent, set_limits, wait_for as _wait_for
from release_helpers import serve
from stctl.assignments import assign
from stctl.fleet_server import ServerConfig, bind, build_server
from stctl.fleetdb import open_fleet_db
from stctl.workspace import open_workspace

pytest_plugins = ["release_fixtures", "agent_fixtures"]

WAIT_S = 60.0  # bounds every wait below; none of them is a timing assert
TABLES = ("generations", "updates", "health_checks", "requests")


class FleetServer:
    """The fleet server of `ws` on 127.0.0.1:`port` in a thread; `stop` and `start` again on the same port."""

    def __init__(self, ws, port: int = 0):
        self.ws, self.port, self.server, self.thread, self.sock = ws, port, None, None, None

    def start(self) -> FleetServer:
        self.server = build_server(self.ws, "127.0.0.1", config=ServerConfig(poll_after_s=1.0))
        self.sock = bind("127.0.0.1", self.port)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the fleet server to start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def wait_for(condition, what: str, timeout: float = WAIT_S):
    return _wait_for(condition, what, timeout)


def rows(ws, sql: str, args=()) -> list[tuple]:
    db = open_fleet_db(ws.fleet_db)
    try:
        return list(db.execute(sql, args))
    finally:
        db.close()


def seq(ws, device: str) -> int:
    found = rows(ws, "SELECT seq FROM call_home WHERE device = ?", [device])
    return found[0][0] if found else 0


def device_ts(data_dir: Path, table: str) -> list[float]:
    conn = sqlite3.connect(data_dir / "telemetry.db")
    try:
        return [r[0] for r in conn.execute(f"SELECT ts FROM [{table}] ORDER BY ts")]
    finally:
        conn.close()


def fleet_ts(ws, device: str, table: str) -> list[float]:
    return [r[0] for r in rows(ws, f"SELECT ts FROM [{table}] WHERE device = ? ORDER BY ts", [device])]


def all_rows_arrived_once(ws, device: str, data_dir: Path) -> bool:
    return all(fleet_ts(ws, device, t) == device_ts(data_dir, t) for t in TABLES)


def polls(ws, device: str, count: int) -> None:
    """Wait until the server accepted `count` more reports from `device`."""
    seen = [seq(ws, device)]

    def more() -> bool:
        now = seq(ws, device)
        if now != seen[-1]:
            seen.append(now)
        return len(seen) > count

    wait_for(more, f"{count} polls of {device}")


@pytest.fixture
def call_home_device(published_template, v1_template, tmp_path):
    """A private workspace, its repository served, its fleet server running, and device cpc1
    (st-demo 1.0.0 active) set up by `st-agent init --call-home-server` (not started yet)."""
    shutil.copytree(published_template, tmp_path / "ws")
    ws = open_workspace(tmp_path / "ws")
    with serve(ws.repository) as url:
        server = FleetServer(ws).start()
        try:
            agent = enrolled_agent(ws, "cpc1", [], url, v1_template, tmp_path)
            result = CliRunner().invoke(agent_cli, [
                "init", "--enroll", str(agent.fleet.enrollment), "--data-dir", str(tmp_path / "cli-init"),
                "--call-home-server", f"https://127.0.0.1:{server.port}", "--call-home-poll-s", "0.5", "--json"])
            assert result.exit_code == 0, result.output
            assert json.loads(result.output)["call_home"] == f"https://127.0.0.1:{server.port}"
            config = json.loads((tmp_path / "cli-init" / "agent.json").read_text())
            config["call_home"]["max_backoff_s"] = 2.0
            (agent.data_dir / "agent.json").write_text(json.dumps(config))
            set_limits(agent.data_dir, threads=1)
            yield ws, server, agent
        finally:
            if agent.process is not None and agent.process.poll() is None:
                agent.kill()
            server.stop()


def test_device_calls_home_updates_itself_and_survives_a_server_outage(call_home_device):
    ws, server, agent = call_home_device
    agent.start()
    wait_for(lambda: rows(ws, "SELECT version FROM device_status WHERE name = 'cpc1'") == [("1.0.0",)],
             "cpc1's status in fleet.db")
    wait_for(lambda: all_rows_arrived_once(ws, "cpc1", agent.data_dir), "cpc1's telemetry in fleet.db")

    # a window that opens two hours from now (UTC) is closed: the device downloads now (the
    # default) and waits at staged, the old release active
    now = datetime.now(timezone.utc)
    start = (now.hour * 60 + now.minute + 120) % 1440
    later = assign(ws, "cpc1", {"model": "st-demo", "version": "2.0.0",
                                "window": {"start_minute": start, "end_minute": (start + 60) % 1440, "tz": "UTC"}})
    wait_for(lambda: rows(ws, "SELECT state FROM device_jobs WHERE device = 'cpc1' AND assignment_id = ?",
                          [later["id"]]) == [("staged",)], "cpc1's held job to be reported staged", JOB_TIMEOUT_S)
    polls(ws, "cpc1", 3)
    status = agent.status()
    assert status["active"]["version"] == "1.0.0" and status["update"]["state"] == "staged", status
    assert status["update"]["hold"], status

    # at once: the device updates itself (the held job of that release goes on), and its reports
    # show the job and the new release
    now_assignment = assign(ws, "cpc1", {"model": "st-demo", "version": "2.0.0"})
    wait_for(lambda: rows(ws, "SELECT state FROM device_jobs WHERE device = 'cpc1' AND assignment_id = ?",
                          [now_assignment["id"]]) == [("active",)], "cpc1's job to be reported active", JOB_TIMEOUT_S)
    assert rows(ws, "SELECT id FROM device_jobs WHERE device = 'cpc1'") == [(status["update"]["id"],)]
    wait_for(lambda: rows(ws, "SELECT version FROM device_status WHERE name = 'cpc1'") == [("2.0.0",)],
             "cpc1 reported on 2.0.0")
    assert agent.status()["active"]["version"] == "2.0.0"
    wait_for(lambda: all_rows_arrived_once(ws, "cpc1", agent.data_dir), "the update's telemetry in fleet.db")

    # the server goes away: the device backs off; rows made meanwhile arrive once it is back
    server.stop()
    before = seq(ws, "cpc1")
    agent.complete()
    wait_for(lambda: agent.log.read_text().count("calling home failed") >= 2, "cpc1 to back off")
    assert fleet_ts(ws, "cpc1", "generations") != device_ts(agent.data_dir, "generations")
    server.start()
    wait_for(lambda: all_rows_arrived_once(ws, "cpc1", agent.data_dir), "the rows made during the outage")
    assert seq(ws, "cpc1") > before
    assert len(device_ts(agent.data_dir, "generations")) == 1
    assert rows(ws, "SELECT COUNT(*) FROM device_jobs WHERE device = 'cpc1'") == [(1,)]  # one job: acted on once
    assert agent.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled
