"""`stctl server serve|assign|assignments|unassign`: the real commands (CliRunner, and `serve` as a
real process stopped by SIGTERM), with good and bad input."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from typer.testing import CliRunner

from cli_helpers import assert_one_error_line
from stctl.cli import app
from stctl.enroll import enroll_device

pytest_plugins = ["release_fixtures"]
runner = CliRunner()


@pytest.fixture
def ws(workspace, tmp_path):
    enroll_device(workspace, "pc1", "https://127.0.0.1:8443", tmp_path / "pc1.enroll", "http://127.0.0.1:8080")
    return workspace


def stctl(ws, *args):
    return runner.invoke(app, ["server", *args, "--workspace", str(ws.root)])


def test_assign_list_unassign(ws):
    r = stctl(ws, "assign", "pc1", "--version", "2.0.0", "--window", "22:00-04:00", "--tz", "Europe/Berlin",
              "--install-later", "--max-bytes-per-s", "1048576")
    assert r.exit_code == 0, r.output
    assert "pc1: update st-demo 2.0.0 in 22:00-04:00 Europe/Berlin" in r.stdout  # the model: the only one published
    listed = json.loads(stctl(ws, "assignments", "--json").stdout)
    assert [(a["device"], a["window"], a["download_now"], a["max_bytes_per_s"]) for a in listed] == [
        ("pc1", {"start_minute": 1320, "end_minute": 240, "tz": "Europe/Berlin"}, False, 1048576)]
    assert "pc1" in stctl(ws, "assignments").stdout
    removed = stctl(ws, "unassign", "pc1", "--json")
    assert removed.exit_code == 0 and json.loads(removed.stdout)["id"] == listed[0]["id"]
    assert json.loads(stctl(ws, "assignments", "--json").stdout) == []


@pytest.mark.parametrize("args, mentions", [
    (["assign", "ghost", "--version", "2.0.0"], ["ghost"]),
    (["assign", "pc1", "--version", "9.9.9"], ["9.9.9", "not published"]),
    (["assign", "pc1", "--version", "2.0.0", "--window", "22:00-04:00"], ["--tz"]),
    (["assign", "pc1", "--version", "2.0.0", "--window", "25:00-04:00", "--tz", "UTC"], ["--window"]),
    (["assign", "pc1", "--version", "2.0.0", "--window", "22:00-04:00", "--tz", "Mars/Olympus"], ["Mars/Olympus"]),
    (["assign", "pc1", "--version", "2.0.0", "--action", "explode"], ["action"]),
    (["assign", "pc1", "--version", "2.0.0", "--max-bytes-per-s", "5"], ["max_bytes_per_s"]),
    (["unassign", "pc1"], ["no assignment"]),
    (["serve", "--listen", "nowhere"], ["--listen"]),
    (["serve", "--listen", "127.0.0.1:0", "--poll-interval", "0"], ["poll interval"]),
])
def test_bad_input_is_one_error_line(ws, args, mentions):
    assert_one_error_line(stctl(ws, *args), *mentions)
    assert json.loads(stctl(ws, "assignments", "--json").stdout) == []


def test_serve_runs_until_sigterm(ws):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "STCTL_WORKSPACE"}
    proc = subprocess.Popen([sys.executable, "-m", "stctl.cli", "server", "serve", "--listen", f"127.0.0.1:{port}",
                             "--shutdown-grace", "1", "--workspace", str(ws.root)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        session = requests.Session()
        session.trust_env = False
        for _ in range(300):  # bounded wait for the server to listen
            try:
                r = session.get(f"https://127.0.0.1:{port}/healthz", verify=str(ws.pki_dir / "ca.crt"), timeout=5)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
        assert r.json() == {"status": "ok"}
        assert (ws.pki_dir / "server.crt").is_file()
        session.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the SIGTERM it handled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
