"""Attacks on the device API and its update channel, against one real `st-agent serve` process
(st-demo 1.0.0 active) over TLS on 127.0.0.1. After each, the agent is still healthy and still
serves 1.0.0. The last two tests point the device at a tampered copy of the repository, so they
run last (the device has then seen that copy's newer metadata)."""
from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace

import pytest
import requests

from agent_helpers import Agent, set_limits
from manifests import ModelManifest
from model.package import read_manifest
from release_helpers import serve
from stctl.pki import create_pki
from stctl.repository import Repository
from stctl.workspace import open_workspace

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow

MANAGEMENT = [("GET", "/v1/status"), ("POST", "/v1/updates"), ("GET", "/v1/updates/" + "0" * 32),
              ("POST", "/v1/rollback"), ("POST", "/v1/health-checks"), ("GET", "/v1/telemetry?table=updates"),
              ("GET", "/metrics")]


@pytest.fixture(scope="module")
def agent(fleet, v1_template, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("secured") / "device"
    shutil.copytree(v1_template, data_dir)
    set_limits(data_dir, queue_size=1, max_body_bytes=4096, max_tokens=8)
    agent = Agent(data_dir, fleet).start()
    yield agent
    agent.stop()


def assert_healthy(agent: Agent) -> None:
    assert agent.client().get(agent.url("/healthz"), timeout=30).text == "ok"
    assert agent.complete()["system_fingerprint"] == "st-demo@1.0.0"
    assert agent.status()["active"] == {"model": "st-demo", "version": "1.0.0"}


def test_healthz_is_open_and_reveals_nothing(agent):
    r = agent.client().get(agent.url("/healthz"), timeout=30)
    assert r.status_code == 200 and r.text == "ok"
    assert "st-demo" not in str(r.headers) and "1.0.0" not in r.text


def test_management_without_client_certificate_is_refused(agent):
    anonymous = agent.client()
    for method, path in MANAGEMENT:
        r = anonymous.request(method, agent.url(path), json={"model": "st-demo", "version": "2.0.0"}, timeout=30)
        assert r.status_code == 401, (path, r.status_code)
        assert "st-demo@" not in r.text
    assert_healthy(agent)


def test_certificate_of_another_ca_is_refused(agent, tmp_path):
    create_pki(tmp_path / "evil", None, "evil")
    evil = agent.client(tmp_path / "evil" / "operator.crt", tmp_path / "evil" / "operator.key")
    for method, path in MANAGEMENT[:2]:
        with pytest.raises(requests.exceptions.RequestException):  # the TLS handshake fails
            evil.request(method, agent.url(path), json={"model": "st-demo", "version": "2.0.0"}, timeout=30)
    assert_healthy(agent)


def test_device_certificate_is_not_an_operator(agent):
    tls = agent.data_dir / "tls"
    device = agent.client(tls / "device.crt", tls / "device.key")
    for method, path in MANAGEMENT:
        r = device.request(method, agent.url(path), json={"model": "st-demo", "version": "2.0.0"}, timeout=30)
        assert r.status_code == 403, (path, r.status_code)
    assert_healthy(agent)


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/updates/..%2F..%2Fagent.json", None),
    ("GET", "/v1/updates/../../agent", None),
    ("GET", "/v1/updates/" + "a" * 31 + "%2e", None),
    ("GET", "/v1/telemetry?table=..%2Ftelemetry", None),
    ("GET", "/v1/telemetry?table=generations;DROP%20TABLE%20updates", None),
    ("POST", "/v1/updates", {"model": "../../etc", "version": "1.0.0"}),
    ("POST", "/v1/updates", {"model": "st-demo", "version": "../../1.0.0"}),
    ("POST", "/v1/updates", {"model": "st-demo", "version": "2.0.0", "repository_url": "file:///etc"}),
])
def test_path_traversal_in_names_gets_4xx(agent, method, path, body):
    r = agent.session.request(method, agent.url(path), json=body, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert (agent.data_dir / "agent.json").is_file()


def test_oversized_bodies_get_413(agent):
    big = json.dumps({"prompt": "x" * 10_000}).encode()
    client = agent.client()
    assert client.post(agent.url("/v1/completions"), data=big, headers={"Content-Type": "application/json"},
                       timeout=30).status_code == 413
    chunked = client.post(agent.url("/v1/completions"), data=iter([big[:3000], big[3000:]]),
                          headers={"Content-Type": "application/json"}, timeout=30)  # no Content-Length
    assert chunked.status_code == 413
    assert agent.session.post(agent.url("/v1/updates"), data=big, timeout=30).status_code == 413
    assert_healthy(agent)


@pytest.mark.parametrize("body", [
    b"{not json", b"[]", b'{"prompt": 5}', b'{"prompt": ["a", "b"]}', b'{"prompt": "x", "max_tokens": -1}',
    b'{"prompt": "x", "temperature": "hot"}', b'{"prompt": [1, -2]}', b'{"prompt": [1, 999999]}', b'{"prompt": ""}',
    b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', b'{"prompt": "x", "model": "other-model"}',
    b'{"prompt": "x", "n": 2}', b"\xff\xfe",
])
def test_malformed_completion_requests_get_4xx(agent, body):
    r = agent.client().post(agent.url("/v1/completions"), data=body, headers={"Content-Type": "application/json"},
                            timeout=30)
    assert 400 <= r.status_code < 500, (body, r.status_code, r.text)


def test_malformed_management_requests_get_4xx(agent):
    for body in (b"{", b'{"model": "st-demo"}', b'{"model": "st-demo", "version": "2.0.0", "evil": 1}',
                 b'{"model": 1, "version": []}'):
        r = agent.session.post(agent.url("/v1/updates"), data=body, headers={"Content-Type": "application/json"},
                               timeout=30)
        assert 400 <= r.status_code < 500, (body, r.status_code)
    assert agent.session.get(agent.url("/v1/telemetry"), params={"table": "updates", "limit": 0}, timeout=30).status_code == 400
    assert agent.session.get(agent.url("/v1/telemetry"), params={"table": "updates", "since": "x"},
                             timeout=30).status_code == 400
    assert agent.session.get(agent.url("/v1/updates/" + "0" * 32), timeout=30).status_code == 404
    assert_healthy(agent)


def test_max_tokens_is_capped_and_a_full_queue_answers_429(agent):
    assert agent.complete(max_tokens=100_000)["usage"]["completion_tokens"] <= 8
    codes, lock = [], threading.Lock()

    def call() -> None:
        r = agent.client().post(agent.url("/v1/completions"), json={"prompt": "Line 4", "max_tokens": 8}, timeout=120)
        with lock:
            codes.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert sorted(set(codes)) == [200, 429], codes  # queue_size=1: at most 2 admitted at once
    assert "st_agent_completions_rejected_total" in agent.get("/metrics").text
    assert_healthy(agent)


def test_tampered_shard_in_the_repository_fails_the_update_and_v1_keeps_serving(agent, fleet, tmp_path):
    shutil.copytree(fleet.workspace.root, tmp_path / "fleet")
    ws = open_workspace(tmp_path / "fleet")
    repo = Repository(ws)
    v1 = {s.sha256 for s in ModelManifest.from_bytes(repo.manifest_bytes("st-demo", "1.0.0")).shards}
    shard = next(s for s in ModelManifest.from_bytes(repo.manifest_bytes("st-demo", "2.0.0")).shards if s.sha256 not in v1)
    path = repo.target_file("blobs/" + shard.sha256)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with serve(ws.repository) as url:
        job = agent.wait_job(agent.update("2.0.0", repository_url=url))
    assert job["state"] == "failed" and "LengthOrHashMismatch" in job["detail"], job
    store = agent.data_dir / "store"
    assert all(not any((store / d).iterdir()) for d in ("tmp", "partial", "incoming"))
    assert shard.sha256 not in {p.name for p in (store / "blobs" / "sha256").iterdir()}
    assert not (agent.data_dir / "releases" / "st-demo" / "2.0.0").exists()
    assert_healthy(agent)


def test_release_failing_its_health_check_is_never_activated(agent, fleet, demo_v3, tmp_path):
    impossible = tmp_path / "v3"
    shutil.copytree(demo_v3, impossible)
    manifest = read_manifest(impossible)
    health = replace(manifest.health, min_decode_tokens_per_s=1e9)
    (impossible / "manifest.json").write_bytes(replace(manifest, health=health).to_bytes())
    shutil.copytree(fleet.workspace.root, tmp_path / "fleet")
    ws = open_workspace(tmp_path / "fleet")
    Repository(ws).publish(impossible)
    with serve(ws.repository) as url:
        job = agent.wait_job(agent.update("3.0.0", repository_url=url))
    assert job["state"] == "failed" and job["history"][-2:] == ["health-checking", "failed"], job
    assert "below the 1000000000.0 minimum" in job["detail"]
    assert not (agent.data_dir / "releases" / "st-demo" / "3.0.0").exists()  # collected
    rows = agent.get("/v1/telemetry", params={"table": "health_checks"}).json()["rows"]
    assert rows[-1]["version"] == "3.0.0" and rows[-1]["passed"] == 0
    assert_healthy(agent)
