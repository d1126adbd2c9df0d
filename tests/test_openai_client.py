"""The official `openai` Python client against a real `st-agent serve` on 127.0.0.1 over TLS.

What the client parses is the contract: `models.list()`, chat and text completions, streaming and
not, usage, and OpenAI's error classes for the agent's error answers. Expected texts come from the
engine in-process on the same package, with the ChatML prompt written out by hand (not rendered by
the agent's template code), greedy, stopping at any of the model's end-of-text ids.
"""
from __future__ import annotations

import shutil
import ssl
from collections.abc import Iterator

import httpx
import openai
import pytest

from agent_helpers import TEST_APP_KEY, Agent

pytest_plugins = ["release_fixtures", "agent_fixtures"]
pytestmark = pytest.mark.slow

REQUEST = "Write the torque check record for Line 4, station S3 press."
SYSTEM = "You are the shift assistant of the plant. Answer with the record asked for."
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def agent(fleet, v1_template, tmp_path_factory) -> Iterator[Agent]:
    data_dir = tmp_path_factory.mktemp("openai") / "device"
    shutil.copytree(v1_template, data_dir)
    agent = Agent(data_dir, fleet).start()
    yield agent
    agent.stop()


def client_of(agent: Agent, api_key: str = TEST_APP_KEY) -> openai.OpenAI:
    http = httpx.Client(verify=ssl.create_default_context(cafile=str(agent.fleet.pki / "ca.crt")), trust_env=False,
                        timeout=120)
    return openai.OpenAI(base_url=agent.url("/v1"), api_key=api_key, http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def client(agent) -> openai.OpenAI:
    return client_of(agent)


@pytest.fixture(scope="module")
def expected(demo_packages) -> dict:
    """The engine's own greedy answers on st-demo 1.0.0: the chat answer and a text continuation."""
    from model import Engine

    engine = Engine.load(demo_packages[0])
    tok = engine.tokenizer
    out = {}
    try:
        for name, prompt in (("chat", f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{REQUEST}<|im_end|>\n"
                                      "<|im_start|>assistant\n"), ("text", "Line 4 torque check:")):
            ids = tok.encode(prompt)
            tokens = list(engine.generate(ids, MAX_TOKENS, stop_ids=tok.stop_ids))
            stopped = tokens[-1] in tok.stop_ids
            out[name] = {"text": tok.decode(tokens[:-1] if stopped else tokens), "prompt_tokens": len(ids),
                         "completion_tokens": len(tokens), "finish_reason": "stop" if stopped else "length"}
    finally:
        engine.close()
    return out


def chat_messages() -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": REQUEST}]


def test_models_list_names_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["st-demo"]
    assert models.data[0].owned_by == "st-agent" and models.data[0].created > 0


def test_chat_completion_answers_as_the_engine_does(client, expected):
    reply = client.chat.completions.create(model="st-demo", messages=chat_messages(), max_tokens=MAX_TOKENS)
    want = expected["chat"]
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want["text"]
    assert choice.finish_reason == want["finish_reason"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want["prompt_tokens"], want["completion_tokens"])
    assert reply.usage.total_tokens == want["prompt_tokens"] + want["completion_tokens"]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.system_fingerprint == "st-demo@1.0.0" and reply.model == "st-demo"


def test_the_trained_model_answers_a_chat_with_a_record_and_ends_its_turn(expected):
    want = expected["chat"]
    # a record of the kind asked for, on the line asked for (the tiny model often invents the station)
    assert want["text"].startswith("Line 4 torque check: station S"), want
    assert "Result: " in want["text"] and want["finish_reason"] == "stop", want  # it ended at <|im_end|>


def test_streamed_chat_is_the_same_text_in_deltas_with_usage_last(client, expected):
    chunks = list(client.chat.completions.create(model="st-demo", messages=chat_messages(), max_tokens=MAX_TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == expected["chat"]["text"] and finishes == [expected["chat"]["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected["chat"]["completion_tokens"]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_streamed_chat_without_include_usage_sends_no_usage(client):
    chunks = list(client.chat.completions.create(model="st-demo", messages=chat_messages(), max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_text_completion_streamed_and_not(client, expected):
    want = expected["text"]
    reply = client.completions.create(model="st-demo", prompt="Line 4 torque check:", max_tokens=MAX_TOKENS)
    assert reply.choices[0].text == want["text"] and reply.choices[0].finish_reason == want["finish_reason"]
    assert reply.usage.completion_tokens == want["completion_tokens"]
    chunks = list(client.completions.create(model="st-demo", prompt="Line 4 torque check:", max_tokens=MAX_TOKENS,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want["text"]


def test_chat_with_text_parts_and_a_stop_string(client, expected):
    parts = [{"type": "text", "text": REQUEST[:20]}, {"type": "text", "text": REQUEST[20:]}]
    reply = client.chat.completions.create(model="st-demo", max_tokens=MAX_TOKENS, stop=["Nm"],
                                           messages=[{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": parts}])
    full = expected["chat"]["text"]
    assert "Nm" in full
    assert reply.choices[0].message.content == full[:full.index("Nm")] and reply.choices[0].finish_reason == "stop"


def test_errors_arrive_as_the_clients_error_classes(agent, client):
    with pytest.raises(openai.AuthenticationError) as e:
        client_of(agent, "stk_not-a-key").chat.completions.create(model="st-demo", messages=chat_messages())
    assert e.value.status_code == 401 and e.value.body["type"] == "unauthorized"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=chat_messages())
    assert e.value.code is None and e.value.body["type"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="st-demo", messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="st-demo", messages=[{"role": "robot", "content": "hi"}])
    assert "role" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="st-demo", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}])
    assert e.value.body["param"].startswith("messages")
