"""Application keys, fair shares and cancellation, against real `st-agent serve` processes over
TLS on 127.0.0.1: completions need a key the operator put on the device; a flood under one key
(or without one, where keys are optional) leaves room and turns for another key; a client that
hangs up stops its generation and frees its slot, and the `requests` table says `cancelled`.
The long completions those tests hang up on ask `ignore_eos`: the trained demo model ends a record
after some 80 tokens, and they must still be running when their client goes.

(Before: six looping clients without a certificate got a normal application 0 of 38 answers in
20 s, and a non-streaming completion generated all its tokens after its client had gone.)"""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import requests
from fastapi.testclient import TestClient

from agent.api import create_app
from agent.config import load_config
from agent_helpers import PROMPT, TEST_APP_KEY, Agent, set_limits
from manifests.app_keys import key_digest, new_key

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow

MAX_TOKENS = 4096  # far more than a client waits for: every cancellation test hangs up long before
LONG = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}  # a completion that runs to MAX_TOKENS


def started_agent(fleet, v1_template, tmp_path_factory, name: str, **config) -> Agent:
    data_dir = tmp_path_factory.mktemp(name) / "device"
    shutil.copytree(v1_template, data_dir)
    set_limits(data_dir, max_tokens=MAX_TOKENS, queue_size=4, max_admitted_per_key=3, token_timeout_s=60)
    if config:
        path = data_dir / "agent.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return Agent(data_dir, fleet).start()


@pytest.fixture(scope="module")
def agent(fleet, v1_template, tmp_path_factory):
    agent = started_agent(fleet, v1_template, tmp_path_factory, "keyed")
    yield agent
    agent.stop()


def complete(agent: Agent, app_key: str | None, max_tokens: int = 2, timeout: float = 60,
             **body) -> requests.Response:
    with agent.client(app_key=app_key) as client:
        return client.post(agent.url("/v1/completions"), json={"prompt": PROMPT, "max_tokens": max_tokens, **body},
                           timeout=timeout)


def requests_rows(agent: Agent, since: float) -> list[dict]:
    rows = agent.get("/v1/telemetry", params={"table": "requests", "limit": 1000}).json()["rows"]
    return [r for r in rows if r["ts"] > since]


def in_progress(agent: Agent) -> int:
    text = agent.get("/metrics").text
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("st_agent_completions_in_progress "))))


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# ---- keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("app_key", [None, "", "stk_" + "x" * 43, "not-a-key"])
def test_completions_without_a_valid_key_are_401(agent, app_key):
    with agent.client(app_key=None) as client:
        headers = {} if app_key is None else {"Authorization": f"Bearer {app_key}"}
        r = client.post(agent.url("/v1/completions"), json={"prompt": PROMPT, "max_tokens": 2}, headers=headers,
                        timeout=30)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "unauthorized"
    assert complete(agent, TEST_APP_KEY).status_code == 200


def test_the_operator_adds_lists_and_revokes_keys(agent):
    key = new_key()
    assert complete(agent, key).status_code == 401
    r = agent.session.put(agent.url("/v1/app-keys/line4-hmi"), json={"sha256": key_digest(key)}, timeout=30)
    assert r.status_code == 200, r.text
    assert complete(agent, key).status_code == 200
    listed = agent.get("/v1/app-keys").json()
    assert {k["name"] for k in listed["keys"]} >= {"line4-hmi", "tests"} and listed["required"] is True
    assert key_digest(key) not in json.dumps(listed)
    assert agent.session.delete(agent.url("/v1/app-keys/line4-hmi"), timeout=30).json()["revoked"] is True
    assert complete(agent, key).status_code == 401
    assert agent.session.delete(agent.url("/v1/app-keys/line4-hmi"), timeout=30).status_code == 404


def test_keys_are_managed_by_the_operator_only(agent):
    with agent.client() as anonymous:  # an application key is no operator certificate
        assert anonymous.get(agent.url("/v1/app-keys"), timeout=30).status_code == 401
        r = anonymous.put(agent.url("/v1/app-keys/mine"), json={"sha256": key_digest(new_key())}, timeout=30)
        assert r.status_code == 401
    bad = agent.session.put(agent.url("/v1/app-keys/Bad%0A"), json={"sha256": "0" * 64}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"
    assert agent.session.put(agent.url("/v1/app-keys/k"), json={"sha256": "zz"}, timeout=30).status_code == 400


def test_requests_rows_name_the_key_never_the_secret(agent):
    since = time.time()
    assert complete(agent, TEST_APP_KEY).status_code == 200
    assert wait_until(lambda: requests_rows(agent, since))
    row = requests_rows(agent, since)[-1]
    assert row["key"] == "tests" and row["outcome"] == "completed" and row["completion_tokens"] >= 1
    assert TEST_APP_KEY not in json.dumps(requests_rows(agent, 0))


# ---- fair shares -----------------------------------------------------------------------------
def flood_while(agent: Agent, flood_key: str | None, keyed: str, seconds: float) -> tuple[int, int, dict]:
    """Six looping clients under `flood_key` (None: no key) for `seconds`, and one client under
    `keyed` asking one completion at a time, the operator's status after each (answered within
    2 s). Returns (keyed answers, keyed attempts, flood statuses)."""
    stop, statuses, lock = threading.Event(), {}, threading.Lock()

    def flood() -> None:
        with agent.client(app_key=flood_key) as client:
            while not stop.is_set():
                try:
                    code = client.post(agent.url("/v1/completions"), json={"prompt": PROMPT, "max_tokens": 16},
                                       timeout=60).status_code
                except requests.RequestException:
                    code = "error"
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the flood fills the queue first
    answers = attempts = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            attempts += 1
            answers += complete(agent, keyed, max_tokens=2).status_code == 200
            # management stays reachable while completions are saturated
            assert agent.session.get(agent.url("/v1/status"), timeout=2.0).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    return answers, attempts, statuses


def test_a_flood_under_one_key_leaves_room_and_turns_for_another(agent):
    flood_key = new_key()
    agent.session.put(agent.url("/v1/app-keys/flood"), json={"sha256": key_digest(flood_key)}, timeout=30)
    answers, attempts, statuses = flood_while(agent, flood_key, TEST_APP_KEY, 8.0)
    assert statuses.get(200, 0) > 0 and statuses.get(429, 0) > 0  # the flood was real, and capped
    assert answers >= 3 and answers == attempts  # the other key was never refused


def test_without_keys_required_a_keyless_flood_still_leaves_a_keyed_client_its_turns(
        fleet, v1_template, tmp_path_factory):
    open_agent = started_agent(fleet, v1_template, tmp_path_factory, "open", app_keys_required=False)
    try:
        assert complete(open_agent, None).status_code == 200  # open: no key needed
        answers, attempts, statuses = flood_while(open_agent, None, TEST_APP_KEY, 8.0)
        assert statuses.get(429, 0) > 0
        assert answers >= 3 and answers == attempts
    finally:
        open_agent.stop()


def test_models_lists_the_served_model_to_a_client_with_a_key(agent):
    with agent.client() as client:
        r = client.get(agent.url("/v1/models"), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == \
        [("st-demo", "model", "st-agent")]
    assert 0 < body["data"][0]["created"] <= time.time()
    with agent.client(app_key=None) as client:  # like completions: no key, no answer
        r = client.get(agent.url("/v1/models"), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", r.text
    # the id it lists is one a completion names its model with
    assert complete(agent, TEST_APP_KEY, model=body["data"][0]["id"]).status_code == 200


# ---- cancellation ----------------------------------------------------------------------------
def test_ignore_eos_generates_past_the_end_of_text(agent):
    ended = complete(agent, TEST_APP_KEY, max_tokens=400).json()  # greedy: the record ends, then end-of-text
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["usage"]["completion_tokens"] < 400, ended
    past = complete(agent, TEST_APP_KEY, max_tokens=400, ignore_eos=True).json()
    assert past["choices"][0]["finish_reason"] == "length" and past["usage"]["completion_tokens"] == 400, past
    assert past["choices"][0]["text"].startswith(ended["choices"][0]["text"])
    assert len(past["choices"][0]["text"]) > len(ended["choices"][0]["text"])


def test_a_client_that_hangs_up_stops_its_generation_and_frees_its_slot(agent):
    since = time.time()
    with pytest.raises(requests.ReadTimeout):  # the client gives up and closes its connection
        complete(agent, TEST_APP_KEY, MAX_TOKENS, timeout=0.1, ignore_eos=True)
    assert wait_until(lambda: in_progress(agent) == 0, timeout=5.0)
    assert wait_until(lambda: requests_rows(agent, since))
    row = requests_rows(agent, since)[-1]
    assert row["outcome"] == "cancelled" and row["completion_tokens"] < MAX_TOKENS // 2, row
    assert complete(agent, TEST_APP_KEY).status_code == 200


def test_a_streaming_client_that_hangs_up_is_cancelled_too(agent):
    since = time.time()
    with agent.client() as client:
        r = client.post(agent.url("/v1/completions"), stream=True, timeout=60,
                        json={**LONG, "stream": True})
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
        r.close()
    assert wait_until(lambda: in_progress(agent) == 0, timeout=5.0)
    assert wait_until(lambda: requests_rows(agent, since))
    row = requests_rows(agent, since)[-1]
    assert row["outcome"] == "cancelled" and row["completion_tokens"] < MAX_TOKENS // 2, row


def test_a_waiting_completion_whose_client_hangs_up_leaves_the_queue(agent):
    since = time.time()
    with agent.client() as long_client:
        running = long_client.post(agent.url("/v1/completions"), stream=True, timeout=60,
                                   json={**LONG, "stream": True})
        lines = running.iter_lines()  # kept: a dropped iterator would close the stream
        next(line for line in lines if line)  # it holds the engine
        with pytest.raises(requests.ReadTimeout):
            complete(agent, TEST_APP_KEY, max_tokens=4, timeout=0.5)  # queued behind it, then gone
        assert wait_until(lambda: in_progress(agent) == 1, timeout=5.0)  # only the running one is left
        running.close()
    assert wait_until(lambda: in_progress(agent) == 0, timeout=5.0)
    outcomes = [r["outcome"] for r in requests_rows(agent, since)]
    assert outcomes.count("cancelled") == 2, outcomes


# ---- starting --------------------------------------------------------------------------------
def test_until_it_has_started_healthz_says_loading_and_the_api_starting(device_dir):
    with TestClient(create_app(load_config(device_dir))) as started:  # the lifespan loads the release
        assert wait_until(lambda: started.get("/healthz").status_code == 200, timeout=60)
    loading = TestClient(create_app(load_config(device_dir)))  # no lifespan: never started
    r = loading.get("/healthz")
    assert (r.status_code, r.text) == (503, "loading")
    r = loading.post("/v1/completions", json={"prompt": PROMPT})
    assert r.status_code == 503 and r.json()["error"]["type"] == "starting"
