"""Experts on a memory budget: the budget moves weights between disk and slots, never the result.

Every configuration of the store (budget from the smallest accepted to unlimited, prefetch on or
off, LRU or LFU eviction, sparse or dense ReGLU) must compute bit-identical logits and sampled
tokens, keep its slots inside the budget, and keep its counters consistent.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import error_within
from model import Engine
from model.build import build_demo
from model.errors import BudgetError, IntegrityError

CONTEXT = 96
PROMPT = list(range(60, 100))


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("store")
    build_demo(root / "dense")
    build_demo(root / "sparse", sparse_down=True)
    return {"dense": root / "dense", "sparse": root / "sparse"}


def smallest_budget(pkg: Path) -> int:
    """Dense weights + KV cache + one layer's active experts: accepted, and one byte less refused."""
    engine = Engine.load(pkg, max_context=CONTEXT)
    cfg = engine.config
    minimum = (engine.dense_bytes + engine.kv_cache_bytes(CONTEXT)
               + cfg.moe_num_active_primary_experts * engine.transformer.experts.slot_bytes)
    with pytest.raises(BudgetError, match="below the minimum"):
        Engine.load(pkg, memory_budget_bytes=minimum - 1, max_context=CONTEXT)
    return minimum


def run(engine: Engine) -> tuple[torch.Tensor, list[int], dict]:
    logits = engine.logits(PROMPT)
    tokens = list(engine.generate(PROMPT, 24, temperature=0.9, seed=3))
    return logits, tokens, dict(engine.last_stats)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_every_budget_prefetch_and_policy_gives_the_unlimited_result(packages, layout):
    pkg = packages[layout]
    ref_logits, ref_tokens, ref_stats = run(Engine.load(pkg))
    assert ref_stats["expert_cache_misses"] == 0 and ref_stats["bytes_read"] == 0
    lowest = smallest_budget(pkg)
    total = Engine.load(pkg).weight_bytes
    for budget in (lowest, lowest + (total - lowest) // 3, lowest + 2 * (total - lowest) // 3, None):
        for prefetch, lookahead in ((True, False), (True, True), (False, False)):
            for policy in ("lru", "lfu"):
                engine = Engine.load(pkg, memory_budget_bytes=budget, prefetch=prefetch, lookahead=lookahead,
                                     policy=policy, max_context=CONTEXT)
                logits, tokens, stats = run(engine)
                label = f"budget={budget} prefetch={prefetch} lookahead={lookahead} policy={policy}"
                assert torch.equal(logits, ref_logits), label
                assert tokens == ref_tokens, label
                if budget is not None:
                    store = engine.transformer.experts
                    assert engine.dense_bytes + store.nbytes + engine.kv_cache_bytes(CONTEXT) <= budget, label
                if budget == lowest:
                    assert stats["expert_cache_misses"] > 0, f"{label}: the smallest budget never missed"


@pytest.mark.parametrize("prefetch", [True, False])
def test_counters_add_up(packages, prefetch):
    """Without look-ahead every read is a miss (test_lookahead_reads_add_up counts its guesses)."""
    pkg = packages["dense"]
    unlimited = Engine.load(pkg)
    list(unlimited.generate(PROMPT, 16))
    lookups = unlimited.last_stats["expert_cache_hits"]
    engine = Engine.load(pkg, memory_budget_bytes=smallest_budget(pkg), prefetch=prefetch, lookahead=False,
                         max_context=CONTEXT)
    list(engine.generate(PROMPT, 16))
    s = engine.last_stats
    size = engine.transformer.experts.expert_bytes
    assert s["expert_cache_hits"] + s["expert_cache_misses"] == lookups
    assert s["bytes_read"] == s["expert_cache_misses"] * size  # every miss read exactly once
    assert 0 <= s["prefetch_hits"] <= s["expert_cache_misses"]
    if not prefetch:
        assert s["prefetch_hits"] == 0


BAD_SHARD_MESSAGES = {"missing": "missing from package", "corrupt": "sha256 mismatch",
                      "truncated": "manifest says", "fifo": "not a regular file"}


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("damage", list(BAD_SHARD_MESSAGES))
def test_bad_expert_shard_raises_a_clear_error_instead_of_hanging(packages, tmp_path, prefetch, damage):
    pkg = tmp_path / "pkg"
    shutil.copytree(packages["dense"], pkg)
    engine = Engine.load(pkg, memory_budget_bytes=smallest_budget(pkg), prefetch=prefetch, max_context=CONTEXT)
    for shard in sorted((pkg / "shards").glob("layer.*.expert.*.safetensors")):
        if damage == "missing":
            shard.unlink()
        elif damage == "truncated":
            os.truncate(shard, shard.stat().st_size // 2)
        elif damage == "fifo":  # a read would block forever: it must be refused, not opened for reading
            shard.unlink()
            os.mkfifo(shard)
        else:
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0xFF
            shard.write_bytes(bytes(data))
    error = error_within(120.0, lambda: list(engine.generate(PROMPT, 8)), "decode on a bad expert shard")
    assert isinstance(error, IntegrityError), repr(error)
    assert "layer." in str(error) and BAD_SHARD_MESSAGES[damage] in str(error), str(error)


def _cached_pages(path: Path) -> int:
    """Pages of `path` in the page cache (mincore on a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size, page = path.stat().st_size, mmap.PAGESIZE
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), "mmap failed"
    try:
        vec = (ctypes.c_ubyte * (-(-size // page)))()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        return sum(v & 1 for v in vec)
    finally:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT") or sys.platform != "linux", reason="O_DIRECT and mincore are Linux")
def test_expert_reads_bypass_the_page_cache(packages, tmp_path):
    """A memory budget is all the memory experts take: an expert file is read once, straight into
    its slot (O_DIRECT), and its layout parsed from those bytes, so none of it is left in the page
    cache (a buffered header read would leave its read-ahead there; a buffered file read, all of it)."""
    pkg = tmp_path / "pkg"
    shutil.copytree(packages["dense"], pkg)
    experts = sorted((pkg / "shards").glob("layer.*.expert.*.safetensors"))
    for shard in experts:
        with open(shard, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    engine = Engine.load(pkg, memory_budget_bytes=smallest_budget(pkg), max_context=CONTEXT)
    store = engine.transformer.experts
    list(engine.generate(PROMPT, 8))
    if not store.reader.direct:
        pytest.skip(f"the file system under {tmp_path} refuses O_DIRECT")
    assert store.bytes_read > 0
    pages = {shard.name: (_cached_pages(shard), -(-shard.stat().st_size // mmap.PAGESIZE)) for shard in experts}
    assert all(cached == 0 for cached, _ in pages.values()), pages


def test_lookahead_reads_add_up(packages):
    """Look-ahead reads the next layer's guessed experts: a right guess is that lookup's miss (read
    once, ahead of time), a wrong one an extra read; the tokens never change."""
    pkg = packages["dense"]
    unlimited = Engine.load(pkg)
    reference = list(unlimited.generate(PROMPT, 16))
    lookups = unlimited.last_stats["expert_cache_hits"]
    budget = smallest_budget(pkg) + 8 * unlimited.transformer.experts.slot_bytes
    engine = Engine.load(pkg, memory_budget_bytes=budget, lookahead=True, max_context=CONTEXT)
    assert list(engine.generate(PROMPT, 16)) == reference
    s, store = engine.last_stats, engine.transformer.experts
    assert s["expert_cache_hits"] + s["expert_cache_misses"] == lookups
    assert 0 < store.lookahead_hits <= store.lookahead_reads
    reads = s["expert_cache_misses"] - store.lookahead_hits + store.lookahead_reads
    assert s["bytes_read"] == reads * store.expert_bytes


def test_lookahead_stops_itself_when_its_guesses_miss(packages):
    """Guesses no lookup confirms cost reads and slots: after `lookahead_probation` of them with
    fewer than `lookahead_min_hit_rate` right, the store stops guessing (and the results stay)."""
    pkg = packages["dense"]
    reference = list(Engine.load(pkg).generate(PROMPT, 8))
    engine = Engine.load(pkg, memory_budget_bytes=smallest_budget(pkg) + 8 * 2**20, max_context=CONTEXT)
    store = engine.transformer.experts
    assert store.lookahead  # on by default under a budget
    store.lookahead_probation = 12
    cfg = engine.config
    for layer in range(cfg.num_hidden_layers):  # guesses for layers no forward pass will ask for
        store.prefetch_ahead(layer, list(range(cfg.moe_num_primary_experts)))
    store.settle()
    assert store.lookahead_reads >= 12 and store.lookahead_hits == 0
    assert store.lookahead_paused
    reads = store.lookahead_reads
    assert list(engine.generate(PROMPT, 8)) == reference
    assert store.lookahead_reads == reads and store.lookahead_paused


def test_lookahead_stops_for_one_layer_whose_guesses_miss(packages):
    """A layer whose router the previous residual does not predict (the trained demo's second
    layer: 31% right) stops being guessed after `lookahead_layer_probation` misses; the other
    layers go on."""
    pkg = packages["dense"]
    engine = Engine.load(pkg, memory_budget_bytes=smallest_budget(pkg) + 8 * 2**20, max_context=CONTEXT)
    store = engine.transformer.experts
    store.lookahead_layer_probation = 4
    experts = list(range(engine.config.moe_num_primary_experts))
    store.prefetch_ahead(1, experts[:6])  # never confirmed: 6 reads, 0 hits
    store.settle()
    reads = store.lookahead_reads
    assert reads >= 4 and store.lookahead_by_layer[1] == [reads, 0]
    store.prefetch_ahead(1, experts[6:8])
    assert store.lookahead_paused_layers == {1} and store.lookahead_reads == reads
    store.prefetch_ahead(2, experts[:1])
    assert store.lookahead_by_layer[2][0] == 1 and not store.lookahead_paused


def test_close_stops_the_readers_once_and_a_closed_engine_still_gives_the_same_result(packages):
    """Engine.close ends the store's reader threads (twice is fine); should the engine run again,
    its reads happen in the calling thread and the result does not change."""
    pkg = packages["dense"]
    ref_logits, ref_tokens, _ = run(Engine.load(pkg))
    engine = Engine.load(pkg, memory_budget_bytes=smallest_budget(pkg), max_context=CONTEXT)
    readers = list(engine.transformer.experts.readers)
    assert readers and all(r.is_alive() for r in readers)
    engine.close()
    engine.close()
    assert not any(r.is_alive() for r in readers)
    logits, tokens, stats = run(engine)
    assert torch.equal(logits, ref_logits) and tokens == ref_tokens
    assert stats["prefetch_hits"] == 0 and stats["expert_cache_misses"] > 0
