"""KV cache and generation: decoding token by token gives a fresh prefill's logits at every position.

The models have window 8 on their SWA layers (global NoPE layers every 4th), and the sequences run
to 60 positions: far past the window, so a sliding-window ring buffer wraps several times.

Tolerances: a bf16 package computes in float32 on both paths (~1e-7 observed; bound 1e-3). A
q4_0 package may run decode (one row) and prefill (many rows) through different kernel code and,
on the C kernel, rounds activations to int8 per row: observed up to ~7e-3 per position; bound
2e-2 per position (a window off by one moves positions past the window by ~10%, a wrong ring slot
by more). Decoded logits are also held to the issue's 2e-2 against the float64 reference.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from conftest import SPECS
from model.errors import ModelError
from reference_forward import reference_forward, relative_error

KV_SPEC = "conditioned-sigmoid-tied"      # hybrid layout, window 8
GEN_SPEC = "conditioned-softmax-lmhead"   # separate head: logits spread enough to sample from
SEQ_LEN = 60
PER_POSITION_BOUND = {"q4_0": 2e-2, "bf16": 1e-3}


def _row_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def _sequence(cfg: dict, seed: int, n: int = SEQ_LEN) -> list[int]:
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], n).tolist()


def _decode(engine, ids: list[int], prefill: int = 0) -> np.ndarray:
    """Logits of each position, fed through the KV cache: an optional multi-token first chunk, then one token a call."""
    tf = engine.transformer
    tf.setup_caches(len(ids))
    rows = []
    if prefill:
        out = tf.forward(torch.tensor(ids[:prefill]), all_logits=True)
        rows.extend(out.to(torch.float32).numpy())
    for t in ids[prefill:]:
        out = tf.forward(torch.tensor([t]))
        assert tuple(out.shape) == (1, engine.config.vocab_size)
        rows.append(out[-1].to(torch.float32).numpy())
    return np.stack(rows).astype(np.float64)


def test_kv_spec_runs_far_past_the_sliding_window():
    cfg = SPECS[KV_SPEC].hf_config()
    assert any(cfg["sliding_window_layout"]) and not all(cfg["sliding_window_layout"])
    assert SEQ_LEN >= 6 * cfg["sliding_window_size"]


@pytest.mark.parametrize("quant", ["q4_0", "bf16"])
def test_token_by_token_decode_equals_fresh_prefill_at_every_position(zoo, quant):
    _, cfg, _ = zoo.checkpoint(KV_SPEC)
    engine = zoo.engine(KV_SPEC, quant)
    ids = _sequence(cfg, 1)
    prefill = engine.logits(ids).numpy().astype(np.float64)
    decoded = _decode(engine, ids)
    assert np.isfinite(decoded).all()
    errs = _row_errors(decoded, prefill)
    worst = int(errs.argmax())
    assert errs.max() <= PER_POSITION_BOUND[quant], f"position {worst}: decode vs prefill {errs[worst]:.3g}"
    # literally a fresh prefill of each prefix, at the window's edges and far past it
    w = cfg["sliding_window_size"]
    for n in (1, w, w + 1, 2 * w + 3, SEQ_LEN):
        fresh = engine.logits(ids[:n]).numpy().astype(np.float64)[-1]
        e = _row_errors(decoded[n - 1], fresh)
        assert e <= PER_POSITION_BOUND[quant], f"prefix of {n}: decode vs fresh prefill {e:.3g}"


def test_decode_after_a_prefill_longer_than_the_window_equals_fresh_prefill(zoo):
    """Prefill 20 tokens in one call (the ring is written from a batch), then decode 40 one by one."""
    _, cfg, _ = zoo.checkpoint(KV_SPEC)
    engine = zoo.engine(KV_SPEC, "q4_0")
    ids = _sequence(cfg, 2)
    assert 20 > cfg["sliding_window_size"]
    decoded = _decode(engine, ids, prefill=20)
    prefill = engine.logits(ids).numpy().astype(np.float64)
    errs = _row_errors(decoded, prefill)
    worst = int(errs.argmax())
    assert errs.max() <= PER_POSITION_BOUND["q4_0"], f"position {worst}: {errs[worst]:.3g}"


def test_decoded_logits_match_the_float64_reference(zoo):
    _, cfg, _ = zoo.checkpoint(KV_SPEC)
    engine = zoo.engine(KV_SPEC, "q4_0")
    ids = _sequence(cfg, 3)
    ref = reference_forward(cfg, zoo.package_weights(KV_SPEC, "q4_0"), ids).logits
    err = relative_error(_decode(engine, ids), ref)
    assert err <= 2e-2, f"decoded logits vs reference: {err:.3g}"


def test_greedy_generate_follows_the_prefill_argmax_through_the_cache(zoo):
    """generate() (prefill + cached decode) picks, at each step, the best token of a fresh prefill."""
    _, cfg, _ = zoo.checkpoint(GEN_SPEC)
    engine = zoo.engine(GEN_SPEC, "q4_0")
    prompt = _sequence(cfg, 4, 12)  # longer than the window of 8
    out = list(engine.generate(prompt, 40))
    assert len(out) == 40 and all(0 <= t < cfg["vocab_size"] for t in out)
    logits = engine.logits(prompt + out[:-1]).numpy()[len(prompt) - 1:]  # [40, V]
    for step, (row, token) in enumerate(zip(logits, out)):
        best = float(row.max())
        # the chosen token is the argmax, up to kernel rounding (2e-2 of the logit scale)
        assert best - float(row[token]) <= 2e-2 * (np.abs(row).max() + 1), f"step {step}: token {token} not the argmax"


# ---- KV cache size -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [KV_SPEC, "rope-softmax-lmhead"])
def test_kv_cache_bytes_grow_linearly_for_global_layers_and_cap_for_window_layers(zoo, spec):
    _, cfg, _ = zoo.checkpoint(spec)
    engine = zoo.engine(spec, "q4_0")
    L, W = cfg["num_hidden_layers"], cfg["sliding_window_size"]
    swa = sum(cfg["sliding_window_layout"])
    per_token_per_layer = 2 * cfg["num_key_value_heads"] * cfg["head_dim"]  # K and V elements
    elem = engine.kv_cache_bytes(1) / (per_token_per_layer * L)
    assert elem in (2, 4), f"kv_cache_bytes(1) implies {elem} bytes per element"
    for n in (1, 2, W - 1, W, W + 1, 3 * W, 1000, 100_000):
        expected = elem * per_token_per_layer * ((L - swa) * n + swa * min(n, W))
        assert engine.kv_cache_bytes(n) == expected, f"context {n}"
    growth = engine.kv_cache_bytes(10 * W + 1) - engine.kv_cache_bytes(10 * W)
    assert growth == elem * per_token_per_layer * (L - swa)


# ---- generation --------------------------------------------------------------------------------------
def test_greedy_generation_is_deterministic(zoo):
    engine = zoo.engine(GEN_SPEC, "q4_0")
    prompt = [10, 20, 30, 40, 50]
    first = list(engine.generate(prompt, 16))
    assert first == list(engine.generate(prompt, 16)) == list(engine.generate(prompt, 16, temperature=0.0, seed=99))


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed(zoo):
    engine = zoo.engine(GEN_SPEC, "q4_0")
    prompt = [10, 20, 30, 40, 50]
    runs = {seed: list(engine.generate(prompt, 16, temperature=1.0, seed=seed)) for seed in (1, 2, 3, 4)}
    assert runs[1] == list(engine.generate(prompt, 16, temperature=1.0, seed=1))
    assert len({tuple(r) for r in runs.values()}) > 1, "different seeds gave identical samples"
    greedy = list(engine.generate(prompt, 16))
    assert any(r != greedy for r in runs.values()), "temperature 1.0 sampling never left the greedy path"


def test_top_p_that_keeps_only_the_best_token_equals_greedy(zoo):
    engine = zoo.engine(GEN_SPEC, "q4_0")
    prompt = [7, 8, 9]
    greedy = list(engine.generate(prompt, 10))
    nucleus = list(engine.generate(prompt, 10, temperature=1.0, seed=5, top_p=1e-9))
    assert nucleus == greedy


def test_generation_stops_after_yielding_a_stop_id(zoo):
    engine = zoo.engine(GEN_SPEC, "q4_0")
    prompt = [3, 1, 4, 1, 5]
    free = list(engine.generate(prompt, 12))
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # first appearance at index k
    stopped = list(engine.generate(prompt, 12, stop_ids=[free[k]]))
    assert stopped == free[:k + 1]
    assert engine.last_stats["completion_tokens"] == k + 1
    assert list(engine.generate(prompt, 12, stop_ids=[free[0]])) == free[:1]


def test_generate_is_a_lazy_stream(zoo):
    engine = zoo.engine(GEN_SPEC, "q4_0")
    it = engine.generate([1, 2, 3], 1000)
    assert iter(it) is it
    first_two = [next(it), next(it)]
    assert first_two == list(engine.generate([1, 2, 3], 2))
    assert list(engine.generate([1, 2, 3], 0)) == []


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_last_stats_report_sane_figures(zoo):
    engine = zoo.engine(GEN_SPEC, "q4_0")
    prompt = list(range(40, 57))
    out = list(engine.generate(prompt, 9))
    s = engine.last_stats
    for key in ("prefill_ms", "decode_tokens_per_s", "peak_rss_bytes", "prompt_tokens", "completion_tokens"):
        assert key in s, f"last_stats lacks {key}"
    assert s["prompt_tokens"] == len(prompt)
    assert s["completion_tokens"] == len(out) == 9
    assert math.isfinite(s["prefill_ms"]) and s["prefill_ms"] > 0
    assert math.isfinite(s["decode_tokens_per_s"]) and s["decode_tokens_per_s"] > 0
    assert isinstance(s["peak_rss_bytes"], int)
    assert 10 * 2**20 < s["peak_rss_bytes"] <= _physical_memory()
    if "decode_ms" in s:  # 8 decode steps in decode_ms
        assert s["decode_ms"] > 0
        # units: tokens per second from milliseconds (a ms/s mix-up is off by 1000x)
        assert s["decode_tokens_per_s"] == pytest.approx(8 / (s["decode_ms"] / 1e3), rel=0.3)


def test_engine_rejects_token_ids_outside_the_vocabulary(zoo):
    engine = zoo.engine(GEN_SPEC, "q4_0")
    V = engine.config.vocab_size
    for bad in ([V], [-1], []):
        with pytest.raises(ModelError):
            engine.logits(bad)
        with pytest.raises(ModelError):
            list(engine.generate(bad, 3))


def _cache_state(tf) -> tuple:
    return tf.pos, [(c.k.clone(), c.v.clone(), c.length) for c in tf.caches]


def _restore_cache_state(tf, state: tuple) -> None:
    tf.pos, caches = state
    for c, (k, v, length) in zip(tf.caches, caches):
        c.k.copy_(k)
        c.v.copy_(v)
        c.length = length


@pytest.mark.parametrize("spec", [KV_SPEC, GEN_SPEC])
def test_native_decode_layer_equals_the_torch_layer(zoo, spec):
    """Each decode step through the native single-token layer (layer.c: router, attention,
    experts summed in place) and through Block's torch ops, from the same KV cache (the native
    step's cache is carried on). Both round activations to Q8_0 the same way, so they differ by
    float32 summation order (observed ~3e-7), except where an activation sits within that
    difference of a rounding boundary and one int8 flips (a Q8_0 step: ~1e-3 in the logits,
    seen at a few positions depending on the sequence). So: nearly every position within 1e-5,
    none beyond a few Q8_0 steps; a wrong RoPE half, ring slot or router weight moves most
    positions by far more."""
    _, cfg, _ = zoo.checkpoint(spec)
    engine = zoo.engine(spec, "q4_0")
    tf, blocks = engine.transformer, engine.transformer.blocks
    if engine.kernel != "c":
        pytest.skip("the native layer needs the c kernel backend")
    assert all(b.fast is not None for b in blocks)
    ids = _sequence(cfg, 4, 3 * cfg["sliding_window_size"] + 5)
    fast = [b.fast for b in blocks]
    tf.setup_caches(len(ids))
    native, torch_ops = [], []
    for t in ids:
        before = _cache_state(tf)
        native.append(tf.forward(torch.tensor([t]))[-1].to(torch.float64).numpy())
        after = _cache_state(tf)
        _restore_cache_state(tf, before)
        try:
            for b in blocks:
                b.fast = None
            torch_ops.append(tf.forward(torch.tensor([t]))[-1].to(torch.float64).numpy())
        finally:
            for b, f in zip(blocks, fast):
                b.fast = f
        _restore_cache_state(tf, after)
    errs = _row_errors(np.stack(native), np.stack(torch_ops))
    close = errs <= 1e-5
    assert close.mean() >= 0.9, f"only {close.sum()} of {len(errs)} positions agree: {np.round(errs, 6).tolist()}"
    assert errs.max() <= 2e-2, f"position {int(errs.argmax())}: native vs torch layer {errs.max():.3g}"
