"""Q4_0: the engine's codec is ggml's byte for byte, and every matrix kernel computes x @ W^T.

The codec is checked against `gguf.quants` (the ggml project's own Python port of the C
reference) on the kinds of blocks where a re-implementation typically goes wrong: heavy tails
(one huge weight sets the scale), all zeros (scale 0, inverse must be 0), ties between +max and
-max (the *first* largest magnitude sets the sign of d), exact half steps (ggml truncates
x/d + 8.5, it does not round half to even) and tiny scales (fp16 subnormal d).

Kernels are checked against a float64 product with the dequantized weights, with bounds derived
from what each backend rounds (see `_error_bound`).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from model.kernels import Q4Matrix
from model.quant import dequantize_q4_0, quantize_q4_0

Q4_0 = GGMLQuantizationType.Q4_0
SHAPES = [(1, 32), (4, 64), (3, 5, 96), (64, 1536), (7, 320)]


def _normal(rng, shape):
    return rng.standard_normal(shape)


def _student_t(rng, shape):
    return rng.standard_t(df=2, size=shape)


def _cauchy(rng, shape):
    return rng.standard_cauchy(shape)


def _zeros(rng, shape):
    return np.zeros(shape)


def _mixed_scales(rng, shape):
    """Rows whose magnitudes span 1e-6 .. 1e3 (fp16 subnormal scales at the small end)."""
    scales = 10.0 ** rng.uniform(-6, 3, size=shape[:-1] + (1,))
    return rng.standard_normal(shape) * scales


def _tied(rng, shape):
    """Every block holds +m and -m (and the sign of the first one varies), the rest smaller."""
    a = rng.uniform(-0.9, 0.9, size=shape).reshape(-1, 32)
    m = rng.uniform(0.5, 4.0, size=(a.shape[0], 1))
    i, j = rng.choice(32, size=2, replace=False)
    first = rng.choice([-1.0, 1.0], size=(a.shape[0], 1))
    a = a * m
    a[:, [min(i, j)]] = first * m
    a[:, [max(i, j)]] = -first * m
    return a.reshape(shape)


def _half_steps(rng, shape):
    """Blocks of exact multiples of d/2 (x/d + 8.5 lands on integers and half-integers)."""
    a = rng.integers(-16, 15, size=shape).astype(np.float64) / 2.0
    blocks = a.reshape(-1, 32)
    blocks[:, 0] = -8.0  # max magnitude, negative: d = 1 exactly
    d = 2.0 ** rng.integers(-6, 4, size=(blocks.shape[0], 1))
    return (blocks * d).reshape(shape)


DISTRIBUTIONS = {
    "normal": _normal, "student_t": _student_t, "cauchy": _cauchy, "all_zero": _zeros,
    "mixed_scales": _mixed_scales, "tied_max": _tied, "half_steps": _half_steps,
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_quantize_q4_0_bytes_equal_gguf(dist, shape):
    rng = np.random.default_rng(zlib.crc32(repr((dist, shape)).encode()))
    a = DISTRIBUTIONS[dist](rng, shape).astype(np.float32)
    expected = gguf_quantize(a, Q4_0)
    got = quantize_q4_0(torch.from_numpy(a))
    assert got.dtype == torch.uint8
    assert tuple(got.shape) == expected.shape == shape[:-1] + (shape[-1] // 32 * 18,)
    got_np = got.numpy()
    if not np.array_equal(got_np, expected):
        bad = np.argwhere(got_np.reshape(-1, 18) != expected.reshape(-1, 18))[0][0]
        pytest.fail(f"block {bad} differs: engine {got_np.reshape(-1, 18)[bad].tolist()} "
                    f"gguf {expected.reshape(-1, 18)[bad].tolist()}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_q4_0_of_half_precision_input_equals_gguf_of_its_float32_value(dtype):
    """Checkpoints come in fp16/bf16: quantizing one must equal ggml quantizing the exact widened values."""
    rng = np.random.default_rng(7)
    t = torch.from_numpy(rng.standard_t(3, size=(16, 128)).astype(np.float32)).to(dtype)
    expected = gguf_quantize(t.to(torch.float32).numpy(), Q4_0)
    assert np.array_equal(quantize_q4_0(t).numpy(), expected)


def test_tied_block_takes_the_sign_of_the_first_largest_magnitude():
    """ggml keeps the first element of largest magnitude: d = that element / -8."""
    block = np.zeros((1, 32), np.float32)
    block[0, 3], block[0, 10] = -2.0, 2.0
    got = quantize_q4_0(torch.from_numpy(block)).numpy()
    d = got[0, :2].copy().view(np.float16)[0]
    assert d == np.float16(0.25)  # -2 / -8
    assert np.array_equal(got, gguf_quantize(block, Q4_0))


@pytest.mark.parametrize("dist", ["normal", "cauchy", "all_zero", "tied_max", "half_steps", "mixed_scales"])
def test_dequantize_q4_0_equals_gguf(dist):
    rng = np.random.default_rng(3)
    blocks = gguf_quantize(DISTRIBUTIONS[dist](rng, (12, 256)).astype(np.float32), Q4_0)
    got = dequantize_q4_0(torch.from_numpy(blocks)).numpy()
    assert got.dtype == np.float32
    assert np.array_equal(got, gguf_dequantize(blocks, Q4_0))


def test_dequantize_q4_0_of_arbitrary_bytes_equals_gguf():
    """Any nibbles and any finite fp16 scale decode as ggml decodes them."""
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, size=(40, 4 * 18), dtype=np.uint8)
    scales = rng.uniform(-30, 30, size=(40, 4)).astype(np.float16).view(np.uint8).reshape(40, 4, 2)
    view = blocks.reshape(40, 4, 18)
    view[:, :, :2] = scales
    got = dequantize_q4_0(torch.from_numpy(blocks)).numpy()
    assert np.array_equal(got, gguf_dequantize(blocks, Q4_0))


def test_quantize_then_dequantize_error_is_within_one_step():
    """|w - deq(q(w))| <= |d| per block (half a step, or one step where +max clamps to 7)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    deq = dequantize_q4_0(quantize_q4_0(torch.from_numpy(w))).numpy()
    amax = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True)
    err = np.abs(w - deq).reshape(-1, 32)
    assert np.all(err <= amax / 8 * (1 + 1e-3) + 1e-7)


# ---- kernels ------------------------------------------------------------------------------------
def _q8_rounding(x: np.ndarray) -> np.ndarray:
    """Per element, the largest error of rounding x to int8 per block of 32 (scale amax/127): half a step."""
    blocks = np.abs(x).reshape(x.shape[0], -1, 32)
    step = blocks.max(axis=-1, keepdims=True) / 127.0
    return np.broadcast_to(step / 2, blocks.shape).reshape(x.shape)


def _error_bound(kernel: str, x: np.ndarray, w: np.ndarray, y_ref: np.ndarray) -> np.ndarray:
    """Worst-case |y - y_ref| per output for a backend, from what it rounds.

    With A = |x| @ |w|^T (the sum of absolute products each output accumulates):
    - reference: float32 products and sums of K terms: |err| <= K * 2^-23 * A (standard bound,
      doubled for the dot-product blocking).
    - c: activations become Q8_0 (per 32: scale amax/127, round to nearest), so each x_k moves by
      at most half a step e_k: |err| <= sum_k |w_k| e_k; the int8 dot products are exact and the
      float32 combination of per-block partial sums adds at most 1e-5 * A.
    - torch-int4: activations and scales are rounded to bf16 (relative 2^-9 each) and the output
      is bf16 (relative 2^-9 of |y|): |err| <= (2 * 2^-9 + 2^-17) * A + 2^-9 * |y| + 1e-5 * A,
      and the bound below doubles that for the kernel's internal float32 summation order.
    """
    a = np.abs(x) @ np.abs(w).T
    k = x.shape[1]
    if kernel == "reference":
        return k * 2.0 ** -23 * a + 1e-30
    if kernel == "c":
        return _q8_rounding(x) @ np.abs(w).T * (1 + 1e-4) + 1e-5 * a + 1e-30
    if kernel == "torch-int4":
        return 2 * ((2 * 2.0 ** -9 + 2.0 ** -17) * a + 2.0 ** -9 * np.abs(y_ref) + 1e-5 * a) + 1e-30
    raise AssertionError(kernel)


# relative (Frobenius) error bounds: c ~0.6% expected (Q8 noise rms = step/sqrt(12) ~ amax/440,
# amax of 32 normals ~2.5 sigma), torch-int4 ~0.3% (three bf16 roundings), reference ~1e-7.
NORM_BOUNDS = {"c": 2e-2, "torch-int4": 1e-2, "reference": 1e-5}


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("out_f,in_f", [(32, 64), (96, 256), (160, 1536)])
@pytest.mark.parametrize("kernel", ["c", "torch-int4", "reference"])
def test_q4_kernel_matches_float64_product_with_dequantized_weights(kernel, out_f, in_f, m):
    rng = np.random.default_rng(out_f * 1000 + in_f + m)
    w = (rng.standard_t(4, size=(out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)
    blocks = gguf_quantize(w, Q4_0)
    w_deq = gguf_dequantize(blocks, Q4_0).astype(np.float64)
    x = rng.standard_normal((m, in_f)).astype(np.float32)
    x[:, :32] *= 20.0  # one loud block: per-block activation scales must stay per block
    mat = Q4Matrix(torch.from_numpy(blocks.copy()), kernel)
    assert mat.out_features == out_f and mat.in_features == in_f
    y = mat(torch.from_numpy(x))
    assert y.dtype == torch.float32 and tuple(y.shape) == (m, out_f)
    y = y.numpy().astype(np.float64)
    y_ref = x.astype(np.float64) @ w_deq.T
    bound = _error_bound(kernel, x.astype(np.float64), w_deq, y_ref)
    err = np.abs(y - y_ref)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"{kernel}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} (y_ref {y_ref[worst]:.4g})")
    rel = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
    assert rel <= NORM_BOUNDS[kernel], f"{kernel}: relative error {rel:.3g}"


@pytest.mark.parametrize("kernel", ["c", "torch-int4", "reference"])
def test_q4_kernel_rows_do_not_depend_on_the_batch(kernel):
    """Row i of a batched product equals the product of row i alone (prefill vs decode consistency)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 256)).astype(np.float32) / 16
    mat = Q4Matrix(torch.from_numpy(gguf_quantize(w, Q4_0)), kernel)
    x = torch.from_numpy(rng.standard_normal((9, 256)).astype(np.float32))
    batched = mat(x)
    single = torch.cat([mat(x[i:i + 1]) for i in range(9)])
    scale = float(batched.abs().max())
    assert float((batched - single).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("kernel", ["c", "torch-int4", "reference"])
def test_q4_kernel_of_zero_weights_is_zero(kernel):
    mat = Q4Matrix(torch.from_numpy(gguf_quantize(np.zeros((32, 64), np.float32), Q4_0)), kernel)
    y = mat(torch.randn(3, 64))
    assert torch.equal(y, torch.zeros(3, 32))


@pytest.mark.parametrize("kernel", ["c", "torch-int4"])
def test_q4_kernel_result_does_not_depend_on_the_thread_count(kernel):
    """The suite runs on one thread (conftest); the product must be the same on two."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((96, 512)).astype(np.float32) / 20
    mat = Q4Matrix(torch.from_numpy(gguf_quantize(w, Q4_0)), kernel)
    x = torch.from_numpy(rng.standard_normal((17, 512)).astype(np.float32))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [mat(x), mat(x[:1])]
        torch.set_num_threads(2)
        two = [mat(x), mat(x[:1])]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())


@pytest.mark.parametrize("out_f", [1, 40, 300])
@pytest.mark.parametrize("kernel", ["c", "torch-int4", "reference"])
def test_q4_kernel_supports_row_counts_that_are_not_multiples_of_16(kernel, out_f):
    """Any [out, in] with in % 32 == 0 is a valid Q4_0 matrix (e.g. a vocabulary of 300 rows); every
    backend, including the torch-int4 fallback used on hosts without a C compiler, must run it."""
    rng = np.random.default_rng(out_f)
    w = rng.standard_normal((out_f, 64)).astype(np.float32) / 8
    blocks = gguf_quantize(w, Q4_0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = Q4Matrix(torch.from_numpy(blocks.copy()), kernel)(torch.from_numpy(x)).numpy().astype(np.float64)
    y_ref = x.astype(np.float64) @ gguf_dequantize(blocks, Q4_0).astype(np.float64).T
    bound = _error_bound(kernel, x.astype(np.float64), gguf_dequantize(blocks, Q4_0).astype(np.float64), y_ref)
    assert y.shape == (3, out_f) and np.all(np.abs(y - y_ref) <= bound)
