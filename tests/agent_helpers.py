"""Helpers of the agent tests: the enrolled fleet's handle, a device data dir set up in-process,
and `Agent`, a real `st-agent serve` process driven over mTLS with python requests."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from agent.app_keys import AppKeys
from agent.config import load_config
from agent.enrollment import init_data_dir
from agent.telemetry import Telemetry
from agent.updater import Updater
from manifests.app_keys import key_digest, new_key
from stctl.agent_process import AgentProcessError, agent_command, free_ports, wait_ready
from stctl.enroll import enroll_device
from stctl.workspace import Workspace

# v1 continues it with line 6, v2 (fine-tuned on line 7) with line 7: a completion names its version
PROMPT = "Shift handover notes:"
TEST_APP_KEY = new_key()  # the application key test clients send ("tests" on every test device)
START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Fleet:
    workspace: Workspace
    repository_url: str
    enrollment: Path  # device "pc1", https://127.0.0.1:8443

    @property
    def pki(self) -> Path:
        return self.workspace.pki_dir


def new_device(fleet: Fleet, data_dir: Path) -> Path:
    """`st-agent init` from pc1's enrollment, with one torch thread (the test machine is small and
    shared: threads spinning against each other make every step several times slower)."""
    init_data_dir(fleet.enrollment, data_dir)
    set_limits(data_dir, threads=1)
    return data_dir


def install_with_library(data_dir: Path, version: str) -> dict:
    """Run one update job in-process (no daemon); returns the finished job."""
    config = load_config(data_dir)
    telemetry = Telemetry(config.telemetry_db, config.limits.telemetry_max_rows)
    try:
        updater = Updater(config, telemetry)
        return updater.run(updater.request("st-demo", version)).to_dict()
    finally:
        telemetry.close()


def set_limits(data_dir: Path, **limits) -> None:
    path = data_dir / "agent.json"
    config = json.loads(path.read_text())
    config["limits"].update(limits)
    path.write_text(json.dumps(config))


def free_port() -> int:
    return free_ports()[0]


def wait_for(condition, what: str, timeout: float = START_TIMEOUT_S, poll_s: float = 0.1):
    """`condition()`'s first true value, checked every `poll_s` (AssertionError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


class Agent:
    """A real `st-agent serve` process on 127.0.0.1; `session` is the operator's mTLS client."""

    def __init__(self, data_dir: Path, fleet: Fleet):
        self.data_dir, self.fleet = data_dir, fleet
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.session = self.client(fleet.pki / "operator.crt", fleet.pki / "operator.key")
        self.log = data_dir.parent / f"{data_dir.name}.agent.log"

    def client(self, cert: Path | None = None, key: Path | None = None, app_key: str | None = TEST_APP_KEY
               ) -> requests.Session:
        """A client of this agent: with `cert`/`key` a TLS client certificate, with `app_key` the
        application key for completions (the test key by default, None for none)."""
        s = requests.Session()
        s.trust_env = False  # $REQUESTS_CA_BUNDLE would otherwise replace `verify` (requests issue #3829)
        s.verify = str(self.fleet.pki / "ca.crt")
        if cert is not None:
            s.cert = (str(cert), str(key))
        if app_key is not None:
            s.headers["Authorization"] = f"Bearer {app_key}"
        return s

    def grant_test_key(self) -> None:
        """Register TEST_APP_KEY on the device (as `stctl device app-key create` does over the API)."""
        if (self.data_dir / "agent.json").exists():
            AppKeys(load_config(self.data_dir).app_keys_file).put("tests", key_digest(TEST_APP_KEY))

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def start(self, wait: bool = True) -> Agent:
        self.grant_test_key()
        self.port = free_port()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                agent_command() + ["serve", "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()
                raise
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        try:
            wait_ready(self.process, self.url(""), self.fleet.pki / "ca.crt", timeout, poll_s=0.1)
        except AgentProcessError as e:
            raise AssertionError(f"{e}:\n{self.log.read_text()[-3000:]}") from None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        """Graceful stop (SIGTERM); returns the exit code. Our idle keep-alive connections are
        closed first: the agent waits up to `shutdown_grace_s` for open connections."""
        self.session.close()
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("st-agent did not stop within 60s of SIGTERM")

    # ---- API helpers -------------------------------------------------------------------------
    def get(self, path: str, **kw) -> requests.Response:
        return self.session.get(self.url(path), timeout=60, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.session.post(self.url(path), timeout=120, **kw)

    def status(self) -> dict:
        r = self.get("/v1/status")
        assert r.status_code == 200, r.text
        return r.json()

    def update(self, version: str, **body) -> str:
        r = self.post("/v1/updates", json={"model": "st-demo", "version": version, **body})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def wait_job(self, job_id: str, timeout: float = JOB_TIMEOUT_S, poll_s: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/v1/updates/{job_id}").json()
            if job["state"] in ("active", "failed", "rolled_back"):
                return job
            time.sleep(poll_s)
        raise AssertionError(f"update {job_id} not finished within {timeout}s: {job}")

    def complete(self, max_tokens: int = 4, **body) -> dict:
        with self.client() as client:
            r = client.post(self.url("/v1/completions"), json={"prompt": PROMPT, "max_tokens": max_tokens, **body},
                            timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    def stream(self, max_tokens: int = 4, **body) -> tuple[str, str, str]:
        """A streamed completion: (text, system_fingerprint, finish_reason); fails on any error event."""
        with self.client() as client:
            return self._read_stream(client.post(self.url("/v1/completions"), stream=True, timeout=120,
                                                 json={"prompt": PROMPT, "max_tokens": max_tokens, "stream": True, **body}))

    @staticmethod
    def _read_stream(r: requests.Response) -> tuple[str, str, str]:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        text, fingerprint, finish, done = [], None, None, False
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith(b"data: "), line
            if line == b"data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            fingerprint = chunk["system_fingerprint"]
            text.append(chunk["choices"][0]["text"])
            finish = chunk["choices"][0]["finish_reason"] or finish
        assert done and finish in ("length", "stop")
        return "".join(text), fingerprint, finish


@contextmanager
def running_agents(published_template: Path, v1_template: Path, root: Path, devices: dict[str, list[str]]
                   ) -> Iterator[tuple[Workspace, str, dict[str, Agent]]]:
    """(workspace, repository url, agents): a private copy of the published workspace with its
    repository served, each of `devices` (name -> tags) enrolled and running as a real agent with
    st-demo 1.0.0 active and its address recorded in fleet.db; every agent killed at the end."""
    from release_helpers import serve
    from stctl.fleetdb import open_fleet_db
    from stctl.workspace import open_workspace

    shutil.copytree(published_template, root / "ws")
    ws = open_workspace(root / "ws")
    agents: dict[str, Agent] = {}
    with serve(ws.repository) as url:
        try:
            for name, tags in devices.items():
                agents[name] = enrolled_agent(ws, name, tags, url, v1_template, root).start(wait=False)
            db = open_fleet_db(ws.fleet_db)
            try:
                for name, agent in agents.items():
                    agent.wait_ready()
                    db["devices"].update(name, {"url": agent.url("").rstrip("/")})
            finally:
                db.close()
            yield ws, url, agents
        finally:
            for agent in agents.values():
                if agent.process is not None and agent.process.poll() is None:
                    agent.kill()


def enrolled_agent(workspace: Workspace, name: str, tags: list[str], repository_url: str, v1_template: Path,
                   root: Path, server_url: str | None = None) -> Agent:
    """Enroll `name` in `workspace` and give it a data dir with st-demo 1.0.0 installed (a copy of
    `v1_template` with this device's own identity and one thread); with `server_url` the device
    calls home to that fleet server (its agent.json has the call_home section). The Agent is not
    started yet."""
    enrollment = root / f"{name}.enroll"
    enroll_device(workspace, name, "https://127.0.0.1:1", enrollment, repository_url, tags, server_url=server_url)
    fresh = init_data_dir(enrollment, root / f"{name}-fresh")
    data_dir = root / name
    shutil.copytree(v1_template, data_dir)
    for rel in ("tls/device.crt", "tls/device.key", "agent.json"):
        shutil.copy2(fresh.data_dir / rel, data_dir / rel)
    set_limits(data_dir, threads=1)
    return Agent(data_dir, Fleet(workspace, repository_url, enrollment))
