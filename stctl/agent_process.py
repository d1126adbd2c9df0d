"""`st-agent` processes on this machine: what `stctl demo`, the tests and the benchmarks start.

Rules: the operator side never imports the agent; it runs its command (`agent_command`), the
installed console script beside this Python, else `python -m agent.cli`. Every wait is bounded:
`wait_ready` polls `/healthz` over TLS (trusting only the fleet CA, never the environment's CA
bundle) until it answers 200, the process exits, or the deadline passes; `AgentProcesses.stop_all`
sends SIGTERM, then SIGKILL after its grace.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from stctl.errors import StctlError


class AgentProcessError(StctlError):
    """An agent process exited early or did not become ready in time."""


def agent_command() -> list[str]:
    script = Path(sys.executable).with_name("st-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 now (all held while choosing, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_ready(process: subprocess.Popen, url: str, ca: Path, timeout_s: float, log: Path | None = None,
               poll_s: float = 0.2) -> None:
    """Return once the agent at `url` answers `/healthz` with 200 (AgentProcessError if `process`
    exits first or `timeout_s` passes; the end of `log`, when given, says why)."""
    deadline = time.monotonic() + timeout_s
    tail = (lambda: ": " + log.read_text(errors="replace")[-500:]) if log is not None else (lambda: "")
    with requests.Session() as session:
        session.trust_env = False  # $REQUESTS_CA_BUNDLE would otherwise replace `verify`
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AgentProcessError(f"st-agent exited with {process.returncode}{tail()}")
            try:
                if session.get(f"{url}/healthz", verify=str(ca), timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(poll_s)
    raise AgentProcessError(f"st-agent at {url} not ready within {timeout_s:.0f}s{tail()}")


class AgentProcesses:
    """Agent processes started here; `stop_all` ends each (SIGTERM, then SIGKILL after `grace_s`)."""

    def __init__(self, grace_s: float = 30.0, env: dict[str, str] | None = None) -> None:
        self.grace_s = grace_s
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.running: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        """`st-agent ARGS...` with its output appended to `log`, in a session of its own."""
        with open(log, "ab") as f:
            process = subprocess.Popen(agent_command() + args, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True)
        self.running.append(process)
        return process

    def stop_all(self) -> None:
        for p in self.running:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for p in self.running:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=self.grace_s)
