"""The whole device story against a real repository server and a real `st-agent serve` process on
127.0.0.1 over mTLS: install v1, update to v2 fetching only the changed shards while completions
stream before, during and after the switch (none fails; one in flight at the switch finishes on
v1), roll back to v1, stop gracefully."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from agent_helpers import new_device
from model.package import read_manifest
from release_helpers import blobs_of
from stctl.delta import diff_manifests

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow


def test_install_update_under_load_and_roll_back(fleet, agent_factory, tmp_path, demo_packages, expected_text):
    agent = agent_factory(new_device(fleet, tmp_path / "device"), fleet).start()
    assert agent.status()["active"] is None
    assert agent.client().post(agent.url("/v1/completions"), json={"prompt": "x"}, timeout=30).status_code == 503

    # install v1 from nothing
    first = agent.wait_job(agent.update("1.0.0"))
    assert first["state"] == "active" and first["shards_downloaded"] == blobs_of(demo_packages[0]), first
    assert first["history"] == ["idle", "fetching", "verifying", "staged", "health-checking", "activating", "active"]
    text, fingerprint, _ = agent.stream()
    assert (text, fingerprint) == (expected_text["1.0.0"], "st-demo@1.0.0")

    # completions stream from two clients before, during and after the update to v2
    served, errors, stop = [], [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            started = time.time()
            try:
                text, fingerprint, _ = agent.stream(max_tokens=6)
                served.append((started, time.time(), fingerprint))
            except Exception as e:  # any failure is what this test looks for
                errors.append(repr(e))

    clients = [threading.Thread(target=client) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        _wait(lambda: len(served) >= 2, 120, "completions before the update")
        job_id = agent.update("2.0.0")
        _wait(lambda: agent.get(f"/v1/updates/{job_id}").json()["state"] == "health-checking", 120, "health-checking")
        in_flight = {}
        slow = threading.Thread(target=lambda: in_flight.update(zip(("text", "fingerprint", "finish"),
                                                                     agent.stream(max_tokens=48))))
        slow.start()
        second = agent.wait_job(job_id)
        switched_at = time.time()
        _wait(lambda: any(fp == "st-demo@2.0.0" and start > switched_at for start, _, fp in served), 120,
              "completions on v2 after the switch")
        slow.join(timeout=180)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=180)
    assert not errors, errors
    assert second["state"] == "active", second
    fingerprints = [fp for _, _, fp in served]
    assert "st-demo@1.0.0" in fingerprints and "st-demo@2.0.0" in fingerprints
    assert in_flight["fingerprint"] == "st-demo@1.0.0" and in_flight["finish"] in ("length", "stop")
    assert agent.stream()[:2] == (expected_text["2.0.0"], "st-demo@2.0.0")

    # only the changed shards were downloaded
    delta = diff_manifests(read_manifest(demo_packages[0]), read_manifest(demo_packages[1]))
    assert second["shards_downloaded"] == len(delta.changed_shards) == 32
    assert delta.bytes_to_ship <= second["bytes_downloaded"] <= 1.05 * delta.bytes_to_ship + 300_000

    status = agent.status()
    assert status["active"] == {"model": "st-demo", "version": "2.0.0"}
    assert status["previous"] == {"model": "st-demo", "version": "1.0.0"} and status["probation"] is True
    assert status["kernel"]["backend"] == "c" and status["kernel"]["isa"]  # a slow fallback is never silent

    # roll back on request
    r = agent.post("/v1/rollback")
    assert r.status_code == 200, r.text
    assert r.json()["active"] == {"model": "st-demo", "version": "1.0.0"}
    assert agent.stream()[:2] == (expected_text["1.0.0"], "st-demo@1.0.0")
    assert agent.get(f"/v1/updates/{job_id}").json()["state"] == "rolled_back"
    assert agent.status()["previous"] == {"model": "st-demo", "version": "2.0.0"}  # kept: GC spares previous

    # telemetry and metrics
    generations = agent.get("/v1/telemetry", params={"table": "generations", "limit": 1000}).json()["rows"]
    assert {row["version"] for row in generations} == {"1.0.0", "2.0.0"}
    assert all(row["completion_tokens"] > 0 and row["peak_rss_bytes"] > 0 for row in generations)
    updates = agent.get("/v1/telemetry", params={"table": "updates", "limit": 1000}).json()["rows"]
    assert [row["state"] for row in updates if row["job_id"] == job_id] == \
        ["idle", "fetching", "verifying", "staged", "health-checking", "activating", "active", "rolled_back"]
    health = agent.get("/v1/telemetry", params={"table": "health_checks"}).json()["rows"]
    assert [(row["version"], row["passed"]) for row in health] == [("1.0.0", 1), ("2.0.0", 1)]
    since = agent.get("/v1/telemetry", params={"table": "updates", "since": updates[-2]["ts"]}).json()["rows"]
    assert since == updates[-1:]
    metrics = agent.get("/metrics").text
    assert 'st_agent_active_release{model="st-demo",version="1.0.0"} 1' in metrics
    assert "# TYPE st_agent_completions_total counter" in metrics

    # graceful shutdown on SIGTERM (uvicorn re-raises the signal once shut down): the lifespan closed
    # the telemetry database, which checkpoints and removes its WAL
    assert agent.stop() in (0, -signal.SIGTERM)
    assert not (agent.data_dir / "telemetry.db-wal").exists()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
