"""The peer benchmark runs llama.cpp with the user's environment: nothing this project sets leaks in.

Importing `model` sets OMP_WAIT_POLICY=PASSIVE for torch's OpenMP runtime; inherited by llama.cpp
it made the peer's threads sleep at every barrier (18.9-21.8 instead of 45.6 tok/s on the same
GGUF), which is how earlier README figures overstated the engine's lead. These tests start the
child exactly as `measure_llama_cpp` does and read its environment.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
sys.path.insert(0, {bench!r})
import model  # sets our default policy in this process
import os
from llama_cpp_peer import child_environment
print(json.dumps({{"here": os.environ.get("OMP_WAIT_POLICY"), "child": child_environment()}}))
"""


def probe(env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(bench=str(ROOT / "benchmarks"))], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(proc.stdout)


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **extra}


def test_the_peer_child_sees_no_wait_policy_of_ours():
    seen = probe(user_env())
    assert seen["here"] == "PASSIVE"  # the engine's process has it ...
    assert seen["child"]["OMP_WAIT_POLICY"] is None  # ... the peer does not


def test_a_policy_the_user_set_reaches_the_peer_unchanged():
    seen = probe(user_env(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="1000"))
    assert seen["here"] == "ACTIVE"
    assert seen["child"]["OMP_WAIT_POLICY"] == "ACTIVE"
    assert seen["child"]["GOMP_SPINCOUNT"] == "1000"


def test_foreign_env_drops_only_what_we_added_and_nobody_changed(monkeypatch):
    from model import runtime_env

    monkeypatch.setattr(runtime_env, "_added", {"OMP_WAIT_POLICY": "PASSIVE"})
    assert "OMP_WAIT_POLICY" not in runtime_env.foreign_env({"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/bin"})
    changed = runtime_env.foreign_env({"OMP_WAIT_POLICY": "ACTIVE", "PATH": "/bin"})
    assert changed == {"OMP_WAIT_POLICY": "ACTIVE", "PATH": "/bin"}
