"""Malformed input at the device API's edge, against one real `st-agent serve` process (st-demo
1.0.0 active) over TLS on 127.0.0.1: every body the red team found crashing the agent (a lone
surrogate, a token id past int64, NaN and infinities, `"http://[::1"`) or slipping through
(`"3"` for an int, `"yes"` for a bool, `true` as a token id, a name with a trailing newline) gets
a 400 in the error envelope `{"error": {"message", "type", "param", "code"}}` naming the field,
never a plain-text 500; nothing is started or lost, and well-formed requests still work.
Completion bodies are sent as raw bytes, as the red team sent them (`json.dumps` refuses NaN)."""
from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from agent.api import create_app
from agent.config import load_config
from agent_helpers import PROMPT, Agent, set_limits
from model import Engine
from model.errors import InputError
from model.tokenizer import ByteTokenizer

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow

ENVELOPE_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def agent(fleet, v1_template, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("validated") / "device"
    shutil.copytree(v1_template, data_dir)
    set_limits(data_dir, max_tokens=4)
    agent = Agent(data_dir, fleet).start()
    yield agent
    agent.stop()


def assert_envelope(r, status: int, param: str | None, kind: str = "invalid_request") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert set(error) == ENVELOPE_KEYS, error
    assert (error["type"], error["param"]) == (kind, param), error
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"], error
    return error


def assert_nothing_crashed(agent: Agent) -> None:
    log = agent.log.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log and " failed: " not in log, log[-3000:]


COMPLETION_CASES = [
    pytest.param(b'{"prompt": "\\ud800abc"}', "prompt", "Unicode", id="lone-surrogate-prompt"),
    pytest.param(b'{"prompt": "x", "stop": ["\\udc00"]}', "stop", "stop[0]", id="lone-surrogate-stop"),
    pytest.param(b'{"prompt": [9223372036854775808]}', "prompt", "prompt[0]", id="token-id-2**63"),
    pytest.param(b'{"prompt": [1, -1]}', "prompt", "prompt[1]", id="negative-token-id"),
    pytest.param(b'{"prompt": [true]}', "prompt", "prompt[0]", id="true-as-token-id"),
    pytest.param(b'{"prompt": [1.5]}', "prompt", "prompt[0]", id="float-token-id"),
    pytest.param(b'{"prompt": "x", "max_tokens": "3"}', "max_tokens", "integer", id="max_tokens-string"),
    pytest.param(b'{"prompt": "x", "max_tokens": true}', "max_tokens", "integer", id="max_tokens-true"),
    pytest.param(b'{"prompt": "x", "stream": "yes"}', "stream", "boolean", id="stream-yes"),
    pytest.param(b'{"prompt": "x", "stream": 1}', "stream", "boolean", id="stream-1"),
    pytest.param(b'{"prompt": "x", "ignore_eos": "yes"}', "ignore_eos", "boolean", id="ignore_eos-yes"),
    pytest.param(b'{"prompt": "x", "temperature": true}', "temperature", "number", id="temperature-true"),
    pytest.param(b'{"prompt": "x", "seed": "7"}', "seed", "integer", id="seed-string"),
    *[pytest.param(f'{{"prompt": "x", "{field}": {value}}}'.encode(), field, "finite", id=f"{field}-{value}")
      for field in ("temperature", "top_p") for value in ("NaN", "Infinity", "-Infinity", "1e999")],
    pytest.param(b'{"prompt": "x", "temperature": 2.5}', "temperature", "less than or equal to 2",
                 id="temperature-2.5"),
    pytest.param(b'{"prompt": ', None, "not valid JSON", id="truncated-json"),
    pytest.param(b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None, "body", id="5000-digit-int"),
    pytest.param(b'["prompt"]', None, "body", id="not-an-object"),
]


@pytest.mark.parametrize("body, param, mention", COMPLETION_CASES)
def test_malformed_completion_gets_400_in_the_envelope(agent, body, param, mention):
    r = agent.client().post(agent.url("/v1/completions"), data=body, headers={"Content-Type": "application/json"},
                            timeout=30)
    error = assert_envelope(r, 400, param)
    assert mention in error["message"], error
    assert_nothing_crashed(agent)


CHAT_CASES = [
    pytest.param(b'{"messages": []}', "messages", "at least 1", id="no-messages"),
    pytest.param(b'{"messages": {"role": "user"}}', "messages", "list", id="messages-object"),
    pytest.param(b'{"messages": [{"role": "robot", "content": "x"}]}', "messages", "messages[0].role: Input should be", id="unknown-role"),
    pytest.param(b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages", "messages[0].content: not valid Unicode",
                 id="lone-surrogate-content"),
    pytest.param(b'{"messages": [{"role": "user", "content": 5}]}', "messages", "valid string", id="int-content"),
    pytest.param(b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
                 "messages", "messages[0].content[0].type: Input should be 'text'", id="image-part"),
    pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}',
                 "max_completion_tokens", "greater than or equal to 1", id="max_completion_tokens-0"),
    pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": "yes"}}',
                 "stream_options", "stream_options.include_usage: Input should be a valid boolean", id="include_usage-yes"),
]


@pytest.mark.parametrize("body, param, mention", CHAT_CASES)
def test_malformed_chat_gets_400_in_the_envelope(agent, body, param, mention):
    r = agent.client().post(agent.url("/v1/chat/completions"), data=body,
                            headers={"Content-Type": "application/json"}, timeout=30)
    error = assert_envelope(r, 400, param)
    assert mention in error["message"], error
    assert_nothing_crashed(agent)


def test_a_conversation_longer_than_the_prompt_limit_is_a_400(agent):
    r = agent.client().post(agent.url("/v1/chat/completions"), timeout=30,
                            json={"messages": [{"role": "user", "content": "Line 4 torque check " * 800}]})
    error = assert_envelope(r, 400, None)
    assert "prompt has" in error["message"], error


def test_token_id_inside_int64_but_outside_the_vocabulary_is_refused_by_the_engine(agent):
    r = agent.client().post(agent.url("/v1/completions"), json={"prompt": [2**63 - 1]}, timeout=30)
    error = assert_envelope(r, 400, None)
    assert "outside the vocabulary" in error["message"], error
    assert_nothing_crashed(agent)


UPDATE_CASES = [
    pytest.param({"model": "st-demo", "version": "2.0.0", "repository_url": "http://[::1"}, "repository_url",
                 id="repository-url-urllib-cannot-parse"),
    pytest.param({"model": "st-demo", "version": "2.0.0", "repository_url": "http://10.0.0.2:99999/"},
                 "repository_url", id="repository-url-bad-port"),
    pytest.param({"model": "st-demo", "version": "2.0.0", "repository_url": "http://10.0.0.2/\n"}, "repository_url",
                 id="repository-url-newline"),
    pytest.param({"model": "st-demo\n", "version": "2.0.0"}, "model", id="model-trailing-newline"),
    pytest.param({"model": "st-demo", "version": "2.0.0\n"}, "version", id="version-trailing-newline"),
    pytest.param({"model": "st-demo", "version": "2.0.0", "allow_downgrade": "yes"}, "allow_downgrade",
                 id="allow_downgrade-yes"),
    pytest.param({"model": "st-demo", "version": "2.0.0", "allow_downgrade": 1}, "allow_downgrade",
                 id="allow_downgrade-1"),
]


def update_rows(agent: Agent) -> int:
    r = agent.get("/v1/telemetry", params={"table": "updates", "limit": 1000})
    assert r.status_code == 200, r.text
    return len(r.json()["rows"])


@pytest.mark.parametrize("body, param", UPDATE_CASES)
def test_malformed_update_gets_400_in_the_envelope_and_starts_nothing(agent, body, param):
    before = update_rows(agent)
    assert_envelope(agent.post("/v1/updates", json=body), 400, param)
    assert agent.status()["update"] is None
    assert update_rows(agent) == before
    assert agent.status()["active"] == {"model": "st-demo", "version": "1.0.0"}
    assert_nothing_crashed(agent)


@pytest.mark.parametrize("method, path, status, param, kind", [
    ("GET", "/v1/telemetry?table=updates&since=nan", 400, "since", "invalid_request"),
    ("GET", "/v1/telemetry?table=updates&since=inf", 400, "since", "invalid_request"),
    ("GET", "/v1/telemetry?table=updates&limit=0", 400, "limit", "invalid_request"),
    ("GET", "/v1/telemetry", 400, "table", "invalid_request"),
    ("GET", "/v1/no-such-endpoint", 404, None, "not_found"),
    ("GET", "/v1/completions", 405, None, "method_not_allowed"),
])
def test_bad_queries_and_paths_get_the_envelope(agent, method, path, status, param, kind):
    assert_envelope(agent.session.request(method, agent.url(path), timeout=30), status, param, kind)
    assert_nothing_crashed(agent)


def test_well_formed_requests_still_work(agent):
    # a float field takes a JSON integer, as OpenAI's API does
    out = agent.complete(max_tokens=2, temperature=1, top_p=1, seed=7, stop=["\n\n"], stream=False)
    assert out["system_fingerprint"] == "st-demo@1.0.0" and out["usage"]["completion_tokens"] <= 2
    assert agent.complete(max_tokens=2, prompt=list(PROMPT.encode()))["usage"]["prompt_tokens"] == len(PROMPT)
    text, fingerprint, _ = agent.stream(max_tokens=2)
    assert fingerprint == "st-demo@1.0.0"
    # a well-formed update passes the edge and reaches the updater, which refuses a downgrade (409)
    r = agent.post("/v1/updates", json={"model": "st-demo", "version": "0.9.0", "repository_url": "http://[::1]:9/"})
    assert_envelope(r, 409, None, "refused")
    assert agent.status()["active"] == {"model": "st-demo", "version": "1.0.0"}
    assert_nothing_crashed(agent)


def test_an_unhandled_exception_is_a_500_envelope_and_one_log_line(device_dir, caplog):
    """The agent's own app (middleware and handlers), with one route that fails as no handler expects."""
    app = create_app(load_config(device_dir))

    async def broken():
        raise RuntimeError("disk on fire\nsecond line")

    app.add_api_route("/v1/broken", broken)
    app.state.started.set()  # no lifespan here: count the agent as started
    with caplog.at_level("ERROR", logger="st-agent.api"):
        r = TestClient(app).get("/v1/broken")  # raise_server_exceptions: nothing may reach the server
    assert_envelope(r, 500, None, "internal_error")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "st-agent.api"]
    assert len(lines) == 1 and "RuntimeError" in lines[0] and "\n" not in lines[0], lines


def test_engine_and_tokenizer_refuse_bad_input_with_their_own_error(demo_packages):
    with pytest.raises(InputError, match="not valid Unicode"):
        ByteTokenizer().encode("\ud800abc")
    engine = Engine.load(demo_packages[0])
    try:
        vocab = engine.config.vocab_size
        for bad in ([2**63], [vocab], [-1], [True], [1.5], [], "abc", [[1, 2]]):
            with pytest.raises(InputError):
                engine.logits(bad)
            with pytest.raises(InputError):
                engine.generate(bad, 2)
        assert engine.logits([1, vocab - 1]).shape == (2, vocab)
    finally:
        engine.close()
