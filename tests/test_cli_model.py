"""`stctl model build` and `stctl model run`: the CLI is a thin layer over the library.

Good input: the package the CLI builds is what the library builds, and `run --json` reports the
engine's own greedy tokens plus the figures. Bad input: non-zero exit, a one-line `error: ...`
naming the problem as the last line on stderr (a progress bar may precede it), no traceback,
nothing written. Most cases run in-process (typer's CliRunner); a few run the real `stctl`
console script in a subprocess, as an operator would.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hf_fixtures import random_weights, tiny_config, write_checkpoint
from model import Engine
from stctl.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = tiny_config(softmax=True, tie=False, window=8)
    root = tmp_path_factory.mktemp("cli")
    return write_checkpoint(root / "ckpt", cfg, random_weights(cfg, seed=21, gain=0.3), shards=2)


@pytest.fixture(scope="module")
def package(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clipkg") / "pkg"
    result = runner.invoke(app, ["model", "build", "--from-hf", str(checkpoint), "--out", str(out),
                                 "--name", "cli-test", "--version", "1.2.3", "--json"])
    assert result.exit_code == 0, result.output
    return out


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click: stderr mixed into output
        return result.output


def assert_clean_error(exit_code: int, stderr: str, stdout: str, *mentions: str) -> str:
    assert exit_code not in (0, None), "bad input exited 0"
    assert "Traceback" not in stderr + stdout, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no error message on stderr"
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one final 'error:' line, got {lines}"
    for m in mentions:
        assert m in errors[0], f"{errors[0]!r} does not mention {m!r}"
    return errors[0]


def invoke_error(args: list[str], *mentions: str) -> str:
    result = runner.invoke(app, args)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}")
    return assert_clean_error(result.exit_code, _stderr(result), result.stdout, *mentions)


def _broken_checkpoint(checkpoint: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    dst = tmp_path / f"ckpt-{how}"
    shutil.copytree(checkpoint, dst)
    if how == "missing-key":
        cfg = json.loads((dst / "config.json").read_text())
        del cfg["moe_ffn_hidden_size"]
        (dst / "config.json").write_text(json.dumps(cfg))
        return dst, "moe_ffn_hidden_size"
    if how == "truncated":
        victim = sorted(dst.glob("*.safetensors"))[-1]
        victim.write_bytes(victim.read_bytes()[:1000])
        return dst, victim.name
    cfg = tiny_config(softmax=True, tie=False, window=8)
    weights = random_weights(cfg, seed=21)
    name = "model.layers.4.block_sparse_moe.experts.1.down.weight"
    import torch
    if how == "int32":
        weights[name] = weights[name].to(torch.int32)
    elif how == "shape":
        weights[name] = weights[name][:, :32].contiguous()
    shutil.rmtree(dst)
    write_checkpoint(dst, cfg, weights, shards=2)
    return dst, name


# ---- good input -----------------------------------------------------------------------------------
def test_model_build_from_hf_writes_a_package_and_reports_it(package):
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["name"] == "cli-test" and manifest["version"] == "1.2.3" and manifest["quant"] == "q4_0"
    assert manifest["config"]["tie_word_embeddings"] is False


def test_model_build_json_summary_names_the_package(checkpoint, tmp_path):
    out = tmp_path / "pkg"
    result = runner.invoke(app, ["model", "build", "--from-hf", str(checkpoint), "--out", str(out),
                                 "--quant", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["quant"] == manifest["quant"] == "bf16"
    assert summary["version"] == manifest["version"] and summary["name"] == manifest["name"]


def test_model_run_json_reports_the_engines_greedy_tokens_and_figures(package):
    result = runner.invoke(app, ["model", "run", str(package), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6",
                                 "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in ("tokens", "text", "prefill_ms", "decode_tokens_per_s", "peak_rss_bytes"):
        assert key in out, key
    engine = Engine.load(package)
    assert out["tokens"] == list(engine.generate([5, 6, 7, 8], 6, stop_ids=engine.tokenizer.stop_ids))
    assert out["text"] == engine.tokenizer.decode(out["tokens"])
    assert out["prefill_ms"] > 0 and out["peak_rss_bytes"] > 0
    assert out["decode_tokens_per_s"] > 0 or len(out["tokens"]) < 2


def test_model_run_with_text_prompt_prints_text_and_figures(package):
    result = runner.invoke(app, ["model", "run", str(package), "--prompt", "Torque check", "-n", "3"])
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.output


# ---- bad input: build ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["missing-key", "truncated", "int32", "shape"])
def test_model_build_with_bad_checkpoint_fails_with_one_error_line_and_writes_nothing(checkpoint, tmp_path, how):
    ckpt, mention = _broken_checkpoint(checkpoint, tmp_path, how)
    parent = tmp_path / "outs"
    parent.mkdir()
    invoke_error(["model", "build", "--from-hf", str(ckpt), "--out", str(parent / "pkg")], mention)
    assert list(parent.iterdir()) == []


def test_model_build_refuses_to_overwrite(checkpoint, package):
    before = sorted(p.name for p in package.rglob("*"))
    invoke_error(["model", "build", "--from-hf", str(checkpoint), "--out", str(package)], str(package.name))
    assert sorted(p.name for p in package.rglob("*")) == before


@pytest.mark.parametrize("args,mention", [
    (["--quant", "q3_k"], "q3_k"),
    (["--version", "one"], "one"),
])
def test_model_build_with_bad_options_fails_cleanly(checkpoint, tmp_path, args, mention):
    invoke_error(["model", "build", "--from-hf", str(checkpoint), "--out", str(tmp_path / "pkg"), *args], mention)
    assert not (tmp_path / "pkg").exists()


def test_model_build_of_a_missing_directory_fails_cleanly(tmp_path):
    invoke_error(["model", "build", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "pkg")], "nope")
    assert not (tmp_path / "pkg").exists()


# ---- bad input: run -----------------------------------------------------------------------------------
def _tampered(package: Path, tmp_path: Path) -> tuple[Path, str]:
    dst = tmp_path / "tampered"
    shutil.copytree(package, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["name"] == "layer.2")
    data = bytearray((dst / entry["file"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dst / entry["file"]).write_bytes(bytes(data))
    return dst, entry["file"]


def test_model_run_on_a_tampered_package_names_the_shard(package, tmp_path):
    pkg, shard_file = _tampered(package, tmp_path)
    invoke_error(["model", "run", str(pkg), "--prompt-ids", "1,2,3", "-n", "2"], shard_file)


@pytest.mark.parametrize("args,mention", [
    (["--prompt-ids", "1,x,3"], "prompt-ids"),
    (["--prompt-ids", "1,99999"], "99999"),
    ([], "prompt"),
])
def test_model_run_with_bad_prompt_fails_cleanly(package, args, mention):
    msg = invoke_error(["model", "run", str(package), "-n", "2", *args])
    assert mention in msg or mention == "99999" and ("vocab" in msg or "[0," in msg), msg


def test_model_run_on_a_directory_that_is_not_a_package_fails_cleanly(tmp_path):
    (tmp_path / "empty").mkdir()
    invoke_error(["model", "run", str(tmp_path / "empty"), "--prompt-ids", "1"], "empty")
    invoke_error(["model", "run", str(tmp_path / "absent"), "--prompt-ids", "1"], "absent")


# ---- the real console script ----------------------------------------------------------------------------
def _stctl() -> str:
    candidate = Path(sys.executable).parent / "stctl"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("stctl")
    if not found:
        pytest.fail("the stctl console script is not installed next to this python or on PATH")
    return found


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([_stctl(), *args], capture_output=True, text=True, timeout=300, env=env)


def test_stctl_script_reports_a_bad_checkpoint_in_one_line(checkpoint, tmp_path):
    ckpt, mention = _broken_checkpoint(checkpoint, tmp_path, "missing-key")
    proc = _run(["model", "build", "--from-hf", str(ckpt), "--out", str(tmp_path / "pkg")])
    assert_clean_error(proc.returncode, proc.stderr, proc.stdout, mention)
    assert not (tmp_path / "pkg").exists()


def test_stctl_script_refuses_a_tampered_package_in_one_line(package, tmp_path):
    pkg, shard_file = _tampered(package, tmp_path)
    proc = _run(["model", "run", str(pkg), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--json"])
    assert_clean_error(proc.returncode, proc.stderr, proc.stdout, shard_file)
    assert proc.stdout.strip() == "", "a failed run printed results"


def test_stctl_script_runs_a_package(package):
    proc = _run(["model", "run", str(package), "--prompt-ids", "9,8,7", "--max-new-tokens", "3", "--json"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 1 <= len(out["tokens"]) <= 3
