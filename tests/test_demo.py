"""`stctl demo`, as `make demo` runs it: three real agents, an application key made for each, a
canary -> rest rollout of 2.0.0 with gates, completions on every device (with its key) that continue
held-out records in the corpus' words, the fleet table; every process it started is gone at the
end, also when interrupted with Ctrl-C."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model import demo_checkpoint

pytestmark = pytest.mark.slow

TIMEOUT_S = 600


def stctl_command() -> list[str]:
    script = Path(sys.executable).with_name("stctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "stctl.cli"]


def processes_under(folder: Path) -> list[str]:
    """Command lines of live processes that mention `folder` (the demo's agents run from it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in cmdline:
            found.append(cmdline)
    return found


def run(tmp_path: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "160"}
    return subprocess.Popen(stctl_command() + ["demo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def test_demo_rolls_out_canary_then_rest_and_cleans_up(tmp_path):
    demo = run(tmp_path, "--json", "--tokens", "8")
    out, err = demo.communicate(timeout=TIMEOUT_S)
    assert demo.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert [(d["name"], d["version"]) for d in result["devices"]] == \
        [("line4-pc1", "2.0.0"), ("line4-pc2", "2.0.0"), ("line5-pc1", "2.0.0")]
    assert all(d["decode_tokens_per_s"] > 0 and d["peak_rss_bytes"] > 0 for d in result["devices"])
    assert result["rollout"] == {"state": "completed", "waves": [
        {"name": "canary", "state": "passed", "devices": ["line4-pc1"]},
        {"name": "rest", "state": "passed", "devices": ["line4-pc2", "line5-pc1"]}]}
    assert 0 < result["bytes_shipped"] < result["bytes_full"] / 2  # deltas, not full packages
    completions = {(r["device"], r["version"]): r["completions"] for r in result["telemetry"]}
    assert all(completions[(name, v)] >= 3 for name in ("line4-pc1", "line4-pc2", "line5-pc1")
               for v in ("1.0.0", "2.0.0"))
    # every completion came with the device's application key (the demo made one per device);
    # the first device also answered the chat
    assert {(r["device"], r["key"], r["outcome"], r["requests"]) for r in result["requests_by_key"]} == \
        {(name, "demo-app", "completed", 6 + (name == "line4-pc1")) for name in ("line4-pc1", "line4-pc2", "line5-pc1")}
    # the chat went to 2.0.0, fine-tuned on line 7, and came back as a line 7 record that ended its turn
    chat = result["chat"]
    assert chat["release"] == "st-demo@2.0.0" and chat["text"].startswith("Line 7 "), chat
    assert chat["finish_reason"] == "stop", chat
    # the answers it printed continue held-out records in the corpus' words (the trained model)
    answers = result["answers"]
    assert len(answers) == 18 and {a["release"] for a in answers} == {"st-demo@1.0.0", "st-demo@2.0.0"}
    words = [w for a in answers for w in re.findall(r"[A-Za-z]+", a["text"])]
    corpus = {w for d in demo_checkpoint.corpus("plant")[0] for w in re.findall(r"[A-Za-z]+", d)}
    assert len(words) > 18 and sum(w in corpus for w in words) / len(words) > 0.8, words
    assert list(tmp_path.iterdir()) == [] and processes_under(tmp_path) == []


def test_demo_interrupted_stops_every_process(tmp_path):
    demo = run(tmp_path)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        serving = 0
        while serving < 3 and time.monotonic() < deadline:  # every agent is up
            line = demo.stdout.readline()
            assert line, demo.stderr.read()[-3000:]
            serving += "serving at" in line
        assert len(processes_under(tmp_path)) >= 3
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=120) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
    assert processes_under(tmp_path) == [] and list(tmp_path.iterdir()) == []
