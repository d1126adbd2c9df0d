"""`stctl model run --chat`: one message, or a conversation on stdin, through the package's chat template.

Expected answers come from the engine in-process with the ChatML prompt written out by hand.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stctl.cli import app

pytest_plugins = ["release_fixtures"]

runner = CliRunner()
REQUEST = "Write the torque check record for Line 4, station S3 press."
FOLLOW_UP = "Give me the status report of conveyor B on Line 2."


def json_objects(text: str) -> list[dict]:
    decoder, out, at = json.JSONDecoder(), [], 0
    while at < len(text.rstrip()):
        obj, at = decoder.raw_decode(text, at)
        out.append(obj)
        while at < len(text) and text[at].isspace():
            at += 1
    return out


def greedy(package, prompt: str, steps: int) -> tuple[str, int]:
    """(text, prompt tokens) of the engine's greedy answer to a hand-written prompt."""
    from model import Engine

    engine = Engine.load(package)
    try:
        tok = engine.tokenizer
        ids = tok.encode(prompt)
        tokens = [t for t in engine.generate(ids, steps, stop_ids=tok.stop_ids) if t not in tok.stop_ids]
        return tok.decode(tokens), len(ids)
    finally:
        engine.close()


def turn(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def test_chat_prompt_is_one_user_message(demo_packages):
    result = runner.invoke(app, ["model", "run", str(demo_packages[0]), "--chat", "--prompt", REQUEST, "-n", "64",
                                 "--json"])
    assert result.exit_code == 0, result.output
    out = json_objects(result.stdout)[0]
    text, prompt_tokens = greedy(demo_packages[0], turn("user", REQUEST) + "<|im_start|>assistant\n", 64)
    assert (out["text"], out["prompt_tokens"]) == (text, prompt_tokens)


def test_chat_on_stdin_is_one_conversation(demo_packages):
    result = runner.invoke(app, ["model", "run", str(demo_packages[0]), "--chat", "--system", "Be exact.",
                                 "-n", "48", "--json"], input=f"{REQUEST}\n\n{FOLLOW_UP}\n")
    assert result.exit_code == 0, result.output
    first, second = json_objects(result.stdout)
    history = turn("system", "Be exact.") + turn("user", REQUEST)
    text, _ = greedy(demo_packages[0], history + "<|im_start|>assistant\n", 48)
    assert first["text"] == text
    history += turn("assistant", text) + turn("user", FOLLOW_UP) + "<|im_start|>assistant\n"
    text, prompt_tokens = greedy(demo_packages[0], history, 48)
    assert (second["text"], second["prompt_tokens"]) == (text, prompt_tokens)


def test_chat_prints_the_answer_as_text(demo_packages):
    result = runner.invoke(app, ["model", "run", str(demo_packages[0]), "--chat", "--prompt", REQUEST, "-n", "64"])
    assert result.exit_code == 0, result.output
    text, _ = greedy(demo_packages[0], turn("user", REQUEST) + "<|im_start|>assistant\n", 64)
    assert text in result.stdout and "tok/s" in result.stdout


@pytest.mark.parametrize("args,mention", [
    (["--chat", "--prompt-ids", "1,2"], "--prompt-ids"), (["--system", "x", "--prompt", "y"], "--system needs --chat"),
])
def test_bad_chat_options_fail_in_one_line(demo_packages, args, mention):
    result = runner.invoke(app, ["model", "run", str(demo_packages[0]), *args])
    assert result.exit_code != 0 and mention in result.output.strip().splitlines()[-1]


def test_a_model_without_a_chat_template_refuses_chat(tmp_path):
    from model.build import build_random

    build_random("st-demo", tmp_path / "pkg")
    result = runner.invoke(app, ["model", "run", str(tmp_path / "pkg"), "--chat", "--prompt", "hi"])
    assert result.exit_code != 0 and "no chat template" in result.output.strip().splitlines()[-1]
