"""What the engine keeps resident: a memory budget bounds its RSS, not just its bookkeeping, and
the token-embedding table of an untied model stays on disk.

Each budgeted engine runs in a child process of its own (this file, run as a script), so its RSS
is its alone: the child measures its baseline after importing torch and the model package and
building the kernels, then loads a package whose experts total 57 MB under a budget that holds a
quarter of them, generates, and reports its peak RSS (VmHWM). No speed is measured or asserted.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import error_within
from model.build import build_package
from model.checkpoint import RandomWeights
from model.config import ModelConfig
from model.errors import IntegrityError
from model.kernels import backend

MiB = 1 << 20
BUDGET = 16 * MiB  # dense 1.9 MB + KV 0.1 MB + 14.2 MB of expert slots (16 of 64 experts)
# What a budgeted process holds beyond baseline + budget, measured on this 2-core AVX2 machine
# (torch 2.13 CPU, c kernels): 15.3 MB = 15.5 MB of file-backed pages (code of torch and of the
# kernel library first touched by the forward pass; the baseline is taken before any) + 0.2 MB of
# anonymous memory beyond the budget's own (activations, logits, Python objects). About twice
# that leaves room for other CPUs' code paths and stays well below what keeping every expert
# adds (the unlimited run below grows by 57 MB of experts + the same 15 MB over its baseline).
SLACK = 32 * MiB
# The budget promises anonymous memory (weights, slots, KV); file-backed code pages depend on the
# page cache (a fresh clone in CI measured 33.2 MiB of total RSS above baseline + budget where 15
# were usual). The tight checks use peak RssAnon (sampled every millisecond in the child), the
# total RSS keeps a looser bound.
ANON_SLACK = 8 * MiB
TOTAL_SLACK = 48 * MiB
# The torch-int4 kernels touch more of torch's code: +16 MiB of file-backed pages here when the
# library's pages come from disk, +28 MiB right after a fresh install (its pages all in the page
# cache, so each fault maps 16 of them), and ~3 MiB of anonymous memory beyond the budget. Without
# the packed expert cache the same run ends 82 MiB above baseline + budget.
SLACK_TORCH_INT4 = 48 * MiB
CONTEXT = 64
PROMPT = list(range(10, 22))
NEW_TOKENS = 16
CHILD_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """4 layers x 16 experts of 884 KB each (Q4_0, FFN 1024 over hidden 512): 57 MB of experts.
    Building costs ~0.05 s per MB of experts (random weights, then Q4_0), hence no bigger."""
    cfg = replace(ModelConfig.from_preset("st-demo"), hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, moe_num_primary_experts=16, moe_num_active_primary_experts=4,
                  moe_ffn_hidden_size=1024, vocab_size=512, rope_layout=(0, 1, 1, 1),
                  sliding_window_layout=(0, 1, 1, 1), tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("budget") / "pkg"
    build_package(RandomWeights(cfg, seed=7), out, name="memory-budget", version="1.0.0")
    return out


def run_children(package: Path, budgets: list[int | None], kernel: str | None = None) -> list[dict]:
    """One engine process per budget, run side by side (each uses one thread)."""
    procs = [subprocess.Popen([sys.executable, __file__, json.dumps({"package": str(package), "budget": b, "kernel": kernel})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in budgets]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
            assert proc.returncode == 0, err.strip().splitlines()[-1:]
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def test_peak_rss_stays_within_the_budget_and_the_counters_add_up(package):
    if backend() != "c":
        pytest.skip("the native kernels do not build here (the torch-int4 case is the next test)")
    budgeted, unlimited = run_children(package, [BUDGET, None])
    assert budgeted["dense_bytes"] + budgeted["expert_cache_bytes"] + budgeted["kv_cache_bytes"] <= BUDGET
    assert budgeted["expert_cache_bytes"] < unlimited["expert_cache_bytes"] / 2  # the cache matters here

    anon_over = budgeted["peak_anon_bytes"] - budgeted["baseline_anon_bytes"] - BUDGET
    assert anon_over <= ANON_SLACK, f"peak anonymous RSS {anon_over / MiB:.1f} MiB above baseline + budget"
    over_budget = budgeted["peak_rss_bytes"] - budgeted["baseline_rss_bytes"] - BUDGET
    assert over_budget <= TOTAL_SLACK, f"peak RSS {over_budget / MiB:.1f} MiB above baseline + budget"
    # the same measure catches an engine that keeps every expert resident
    unlimited_growth = unlimited["peak_anon_bytes"] - unlimited["baseline_anon_bytes"]
    assert unlimited_growth > BUDGET + ANON_SLACK

    # the budget moves weights between disk and slots, never the result
    assert budgeted["tokens"] == unlimited["tokens"]
    s, lookups = budgeted["stats"], unlimited["stats"]["expert_cache_hits"]
    assert unlimited["stats"]["expert_cache_misses"] == 0
    assert s["expert_cache_hits"] + s["expert_cache_misses"] == lookups
    assert s["expert_cache_misses"] > budgeted["expert_slots"]  # the cache filled and evicted
    # every miss is read once and every read is a miss (a layer's reads never evict the experts
    # it found resident: they stay pinned until used)
    assert s["bytes_read"] == s["expert_cache_misses"] * budgeted["expert_bytes"]
    assert 0 <= s["prefetch_hits"] <= s["expert_cache_misses"]


def test_the_torch_int4_fallback_stays_within_the_budget_once_its_experts_are_packed(package):
    """The torch-int4 kernel reads experts from the per-host packed cache into its slots (views,
    no repacking). Without that cache it repacks every read into new tensors, which on the 4B
    shape left a 1 GiB budget at 2.9 GB peak RSS (benchmarks/engine_decode.py, int4-cache)."""
    (warmup,) = run_children(package, [None], kernel="torch-int4")  # packs every expert once
    assert warmup["packs"] == 64 and warmup["packed_loads"] == 0
    budgeted, unlimited = run_children(package, [BUDGET, None], kernel="torch-int4")
    assert budgeted["packs"] == 0 and budgeted["packed_loads"] == budgeted["stats"]["expert_cache_misses"]
    over_budget = budgeted["peak_rss_bytes"] - budgeted["baseline_rss_bytes"] - BUDGET
    assert over_budget <= SLACK_TORCH_INT4, f"peak RSS {over_budget / MiB:.1f} MiB above baseline + budget"
    assert unlimited["peak_rss_bytes"] - unlimited["baseline_rss_bytes"] > BUDGET + SLACK_TORCH_INT4
    assert budgeted["tokens"] == unlimited["tokens"] == warmup["tokens"]


def test_untied_embedding_rows_come_from_the_shard_and_are_not_resident(package):
    import torch

    from model import Engine
    from model.package import EMBED_SHARD, EMBED_TENSOR, load_shard, read_manifest
    from model.quant import dequantize_q4_0

    # the reference kernel keeps every matrix as its stored blocks (torch-int4 would repack them)
    engine = Engine.load(package, memory_budget_bytes=BUDGET, max_context=CONTEXT, kernel="reference")
    manifest = read_manifest(package)
    stored = {e.name: load_shard(package, e) for e in manifest.shards if e.kind == "dense"}
    table = stored.pop(EMBED_SHARD)[EMBED_TENSOR]
    # every dense tensor stays resident as stored (Q4_0 blocks, fp32 norms and routers) but the table
    assert engine.dense_bytes == sum(t.numel() * t.element_size() for ts in stored.values() for t in ts.values())
    ids = torch.tensor([0, 511, 7, 7, 300])
    assert torch.equal(engine.transformer.embed_rows(ids), dequantize_q4_0(table[ids]))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "fifo"])
def test_a_bad_embed_shard_is_a_one_line_integrity_error_at_load(package, tmp_path, damage):
    pkg = tmp_path / "pkg"
    shutil.copytree(package, pkg)
    embed = pkg / "shards" / "embed.safetensors"
    data = bytearray(embed.read_bytes())
    embed.unlink()
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        embed.write_bytes(data)
    elif damage == "truncate":
        embed.write_bytes(data[:-18])
    elif damage == "fifo":
        os.mkfifo(embed)
    from model import Engine

    error = error_within(60, lambda: Engine.load(pkg, memory_budget_bytes=BUDGET, max_context=CONTEXT),
                         "loading a bad embed shard")
    assert isinstance(error, IntegrityError), repr(error)
    assert "shards/embed.safetensors" in str(error) and "\n" not in str(error)


def test_an_embed_shard_truncated_after_load_fails_the_forward_pass_cleanly(package, tmp_path):
    from model import Engine

    pkg = tmp_path / "pkg"
    shutil.copytree(package, pkg)
    engine = Engine.load(pkg, memory_budget_bytes=BUDGET, max_context=CONTEXT)
    os.truncate(pkg / "shards" / "embed.safetensors", 4096)  # the engine's open file shrinks too
    with pytest.raises(IntegrityError, match="embed.safetensors: truncated"):
        engine.logits([1, 500])


# ---- the child: everything below runs in its own process ---------------------------------------
def _child(request: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from model.engine import Engine
    from model.kernels import backend
    from model.memory import current_rss_bytes, peak_rss_bytes

    import threading

    backend()  # the native kernels built and loaded: part of the runtime, not of the budget

    def anon_bytes() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    peak_anon, done = [anon_bytes()], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak_anon[0] = max(peak_anon[0], anon_bytes())

    baseline_anon = anon_bytes()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    baseline = current_rss_bytes()
    # no look-ahead: every read is then a miss, which the parent checks
    engine = Engine.load(request["package"], memory_budget_bytes=request["budget"], max_context=CONTEXT,
                         kernel=request.get("kernel"), lookahead=False)
    load_peak = peak_rss_bytes()  # generate() starts a new peak window
    tokens = list(engine.generate(PROMPT, NEW_TOKENS))
    done.set()
    sampler.join()
    store = engine.transformer.experts
    return {"baseline_rss_bytes": baseline, "peak_rss_bytes": max(load_peak, peak_rss_bytes()),
            "baseline_anon_bytes": baseline_anon, "peak_anon_bytes": max(peak_anon[0], anon_bytes()),
            "dense_bytes": engine.dense_bytes, "expert_cache_bytes": store.nbytes,
            "kv_cache_bytes": engine.kv_cache_bytes(CONTEXT), "expert_slots": store.capacity,
            "expert_bytes": store.expert_bytes, "tokens": tokens,
            "packs": store.packed.packs if store.packed else None,
            "packed_loads": store.packed.loads if store.packed else None,
            "stats": {k: engine.last_stats[k] for k in
                      ("expert_cache_hits", "expert_cache_misses", "prefetch_hits", "bytes_read")}}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
