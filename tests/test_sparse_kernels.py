"""Sparse ReGLU kernels (`st_q4_0_matvec_rows`, `st_q4_0_axpy_rows`, `st_reglu_sparse`) and
`model.kernels.SparseReGLUExpert` / `model.quant.transpose_q4_0`.

Two kinds of reference, both in float64 from the dequantized Q4_0 weights:
- an emulation of the kernel's own rounding (x -> Q8_0 per 32 values; axpy coefficients ->
  int8 per 16 list entries and output block), which the kernels must match to float32
  accumulation error (tight tolerances);
- the plain math on unrounded activations, which every backend must match within the
  activation rounding (loose tolerances).
Active rows: the kernel's gate is a float32 sum of exact integer dot products, so its sign can
only differ from the emulated float64 gate when |gate| is within float32 rounding of 0; the
test requires the active sets to be equal except for such rows (and there are none in
practice).
Each kernel test runs on the host build (AVX2 when present) and on a scalar build compiled with
`-mno-avx2` (the `ST_KERNEL_CFLAGS` mechanism, in-process via `native(cflags)`).
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from model.errors import KernelError
from model.kernels import SparseReGLUExpert, backend
from model.kernels.build import native
from model.quant import QK4_0, dequantize_q4_0, quantize_q4_0, split_q4_0, transpose_q4_0

SHAPES = [(64, 32), (256, 256), (768, 1536), (200, 96), (77, 160), (13, 224), (1, 32)]  # (F, D)
Q8_BYTES = 4 + QK4_0
GROUP = 16  # AXPY_GROUP in q4_0.c


@pytest.fixture(scope="module", params=["native", "scalar"])
def lib(request):
    try:
        lib = native() if request.param == "native" else native("-mno-avx2")
    except KernelError as exc:  # pragma: no cover - no compiler
        pytest.skip(f"no native kernel: {exc}")
    if request.param == "scalar":
        assert lib.st_has_avx2() == 0
    return lib


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


# ---------------------------------------------------------------- emulation of the rounding
def q8_emulate(x: torch.Tensor) -> torch.Tensor:
    """float32 [k] -> the Q8_0 values the kernel uses, dequantized, float64 [k]."""
    b = x.to(torch.float32).reshape(-1, QK4_0)
    d = b.abs().amax(dim=1, keepdim=True) / 127.0
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    return (torch.round(b * inv).double() * d.double()).reshape(-1)


def axpy_emulate(wt_blocks: torch.Tensor, rows: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """sum_i coeffs[i] * wT[rows[i]] with the kernel's int8 rounding of coeffs * scales."""
    d, q = split_q4_0(wt_blocks[rows.long()])  # [n, nb], [n, nb*32]
    n, nb = d.shape
    q = (q.to(torch.int64) - 8).reshape(n, nb, QK4_0)
    s = coeffs.to(torch.float32).reshape(-1, 1) * d  # float32 products, as in C
    out = torch.zeros(nb, QK4_0, dtype=torch.float64)
    for g in range(0, n, GROUP):
        sg = s[g:g + GROUP]
        scale = sg.abs().amax(dim=0) / 127.0  # [nb]
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
        q8 = torch.round(sg * inv).to(torch.int64)  # [G, nb]
        isum = (q8.unsqueeze(-1) * q[g:g + GROUP]).sum(0)  # [nb, 32] exact
        out += scale.double().unsqueeze(-1) * isum.double()
    return out.reshape(-1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(torch.linalg.vector_norm(b.double()))
    return float(torch.linalg.vector_norm(a.double() - b.double())) / (den if den else 1.0)


def weights(f: int, d: int, gen: torch.Generator, sign: int = 0) -> torch.Tensor:
    w = torch.randn(f, d, generator=gen) * 0.05
    if sign:
        w = sign * w.abs()
    return quantize_q4_0(w)


# ---------------------------------------------------------------- matvec_rows
@pytest.mark.parametrize("f,d", SHAPES)
def test_matvec_rows(lib, f, d):
    gen = torch.Generator().manual_seed(f * 1000 + d)
    w = weights(f, d, gen)
    x = torch.randn(d, generator=gen)
    rows = torch.randint(0, f, (max(1, 2 * f // 3) + 3,), generator=gen, dtype=torch.int32)  # any order, repeats
    y = torch.full((rows.numel(),), float("nan"))
    xq = torch.empty(d // QK4_0 * Q8_BYTES, dtype=torch.uint8)
    lib.st_q4_0_matvec_rows(ptr(w), f, d, ptr(rows), rows.numel(), ptr(x), ptr(y), ptr(xq))
    ref = dequantize_q4_0(w).double()[rows.long()] @ q8_emulate(x)
    scale = dequantize_q4_0(w).double().abs().sum(1)[rows.long()] * x.abs().max().double()
    assert torch.all((y.double() - ref).abs() <= 1e-5 * scale + 1e-30)
    # the same values as the dense kernel's rows
    dense = torch.empty(f)
    lib.st_q4_0_matmul(ptr(w), f, d, ptr(x), 1, ptr(dense), ptr(xq))
    assert torch.allclose(y, dense[rows.long()], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- axpy_rows
@pytest.mark.parametrize("f,d", SHAPES)
@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_axpy_rows(lib, f, d, frac):
    gen = torch.Generator().manual_seed(f * 7 + d + int(frac * 10))
    wt = weights(f, d, gen)  # downT [F, D]
    n = int(round(frac * f))
    rows = torch.randperm(f, generator=gen)[:n].to(torch.int32)
    coeffs = torch.randn(n, generator=gen) * torch.rand(n, generator=gen)
    if n > 4:
        coeffs[::5] = 0.0  # zero coefficients are fine
    y = torch.full((d,), float("nan"))  # overwritten, never accumulated
    lib.st_q4_0_axpy_rows(ptr(wt), f, d, ptr(rows), ptr(coeffs), n, ptr(y))
    if n == 0:
        assert torch.equal(y, torch.zeros(d))
        return
    emu = axpy_emulate(wt, rows, coeffs)
    exact = coeffs.double() @ dequantize_q4_0(wt).double()[rows.long()]
    assert rel(y, emu) < 2e-6
    assert rel(y, exact) < 1e-2  # the int8 rounding of the coefficients


def test_axpy_rows_repeats_and_order(lib):
    gen = torch.Generator().manual_seed(5)
    f, d = 50, 96
    wt = weights(f, d, gen)
    rows = torch.tensor([3, 3, 49, 0, 7, 3, 12, 40, 41, 2, 2, 9, 10, 11, 12, 13, 14, 1, 0], dtype=torch.int32)
    coeffs = torch.randn(rows.numel(), generator=gen)
    y = torch.empty(d)
    lib.st_q4_0_axpy_rows(ptr(wt), f, d, ptr(rows), ptr(coeffs), rows.numel(), ptr(y))
    assert rel(y, axpy_emulate(wt, rows, coeffs)) < 2e-6


# ---------------------------------------------------------------- fused expert
def expert_weights(f: int, d: int, gen: torch.Generator, frac: float):
    """gate, up, downT and x giving about `frac` active rows (0 and 1 exactly)."""
    sign = {0.0: -1, 1.0: 1}.get(frac, 0)
    gate = weights(f, d, gen, sign)
    up = weights(f, d, gen)
    down_t = weights(f, d, gen)
    x = torch.randn(1, d, generator=gen)
    if sign:
        x = x.abs() + 0.1  # positive x against all-negative / all-positive gate rows
    return gate, up, down_t, x


def run_fused(lib, gate, up, down_t, x, weight: float = 0.0, acc: torch.Tensor | None = None):
    f, d = gate.shape[0], x.shape[1]
    d_out = down_t.shape[1] // 18 * QK4_0
    out = torch.full((d_out,), float("nan"))
    xq = torch.empty(d // QK4_0 * Q8_BYTES, dtype=torch.uint8)
    h = torch.full((2 * f,), float("nan"))
    rows = torch.full((f,), -1, dtype=torch.int32)
    n = lib.st_reglu_sparse(ptr(gate), ptr(up), ptr(down_t), d, f, d_out, ptr(x), ptr(out), ptr(xq), ptr(h), ptr(rows),
                            weight, None if acc is None else ptr(acc))
    return out, int(n), rows[:n].clone(), h[f:f + n].clone()


@pytest.mark.parametrize("f,d", SHAPES)
@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_reglu_sparse(lib, f, d, frac):
    gen = torch.Generator().manual_seed(f * 31 + d * 3 + int(frac * 4))
    gate, up, down_t, x = expert_weights(f, d, gen, frac)
    out, n, rows, a = run_fused(lib, gate, up, down_t, x)

    xe = q8_emulate(x[0])
    g_emu = dequantize_q4_0(gate).double() @ xe
    u_emu = dequantize_q4_0(up).double() @ xe
    tol = 1e-5 * (dequantize_q4_0(gate).double().abs() @ xe.abs())  # float32 rounding of the gate sums
    emu_active = (g_emu > 0).nonzero().flatten()
    if frac == 0.0:
        assert n == 0 and torch.equal(out, torch.zeros_like(out))
    if frac == 1.0:
        assert n == f
    # active rows: increasing, and equal to the emulated set except rows with |gate| ~ 0
    assert torch.all(rows[1:] > rows[:-1])
    differ = set(rows.tolist()) ^ set(emu_active.tolist())
    assert all(abs(float(g_emu[j])) <= float(tol[j]) for j in differ)
    assert abs(n - emu_active.numel()) <= len(differ)
    if n:
        # coefficients a_j = gate_j * up_j of the active rows
        a_emu = (g_emu * u_emu)[rows.long()]
        assert torch.allclose(a.double(), a_emu, rtol=1e-4, atol=1e-6 * float(a_emu.abs().max()))
        # down: the axpy rounding applied to the kernel's own coefficients
        assert rel(out, axpy_emulate(down_t, rows, a)) < 2e-6
    # the plain math, unrounded activations
    g = dequantize_q4_0(gate).double() @ x[0].double()
    u = dequantize_q4_0(up).double() @ x[0].double()
    exact = (g.clamp(min=0) * u) @ dequantize_q4_0(down_t).double()
    if n:
        assert rel(out, exact) < 0.05
    # deterministic; with an accumulator, acc += weight * out (one fused multiply-add per value)
    acc = torch.randn(out.shape[0], generator=gen)
    expected = acc + 0.375 * out
    again = run_fused(lib, gate, up, down_t, x, 0.375, acc)
    assert torch.equal(again[0], out) and again[1] == n
    assert torch.allclose(acc, expected, rtol=1e-6, atol=1e-7)


def test_thread_count_does_not_change_results(lib):
    gen = torch.Generator().manual_seed(11)
    gate, up, down_t, x = expert_weights(768, 1536, gen, 0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_fused(lib, gate, up, down_t, x)
        torch.set_num_threads(max(2, threads))
        many = run_fused(lib, gate, up, down_t, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and one[1] == many[1]


def test_scalar_and_avx2_agree():
    host, scalar = native(), native("-mno-avx2")
    if host.st_has_avx2() == 0:
        pytest.skip("host build has no AVX2")
    gen = torch.Generator().manual_seed(3)
    gate, up, down_t, x = expert_weights(256, 256, gen, 0.5)
    a, b = run_fused(host, gate, up, down_t, x), run_fused(scalar, gate, up, down_t, x)
    assert a[1] == b[1] and torch.equal(a[2], b[2])
    assert rel(a[0], b[0]) < 1e-5


# ---------------------------------------------------------------- Python API
@pytest.mark.parametrize("f,d", [(64, 32), (256, 256), (768, 1536), (77, 160)])
def test_expert_backends_agree(f, d):
    gen = torch.Generator().manual_seed(f + d)
    gate, up, down_t, _ = expert_weights(f, d, gen, 0.5)
    xs = torch.randn(5, d, generator=gen)
    g = dequantize_q4_0(gate).double()
    u = dequantize_q4_0(up).double()
    wt = dequantize_q4_0(down_t).double()
    exact = ((xs.double() @ g.t()).clamp(min=0) * (xs.double() @ u.t())) @ wt
    exact_active = int(((xs.double() @ g.t()) > 0).sum())
    backends = ["reference", "torch-int4"] + (["c"] if backend() == "c" else [])
    for name in backends:
        ex = SparseReGLUExpert(gate, up, down_t, kernel=name)
        assert ex.nbytes > 0
        out, active = ex(xs)  # T > 1
        assert out.shape == (5, d) and out.dtype == torch.float32
        assert rel(out, exact) < 0.05, name
        assert abs(active - exact_active) <= max(2, exact_active // 50), name
        total = 0
        for i in range(5):  # T = 1
            o1, a1 = ex(xs[i:i + 1])
            total += a1
            assert rel(o1[0], exact[i]) < 0.05, name
            if name != "c":
                assert torch.allclose(o1[0], out[i], rtol=1e-4, atol=1e-5), name
            else:  # fused kernel vs prefill GEMM + axpy: same rounding rules, different float order
                assert rel(o1[0], out[i]) < 1e-3, name
        assert abs(total - active) <= 2, name


def test_expert_from_gate_up_and_zero_activity():
    gen = torch.Generator().manual_seed(9)
    f, d = 96, 64
    gate, up, down_t, x = expert_weights(f, d, gen, 0.0)
    ex = SparseReGLUExpert.from_gate_up(torch.cat([gate, up]), down_t)
    out, active = ex(x)
    assert active == 0 and torch.equal(out, torch.zeros(1, d))


def test_transpose_q4_0():
    gen = torch.Generator().manual_seed(4)
    d, f = 96, 160
    down = quantize_q4_0(torch.randn(d, f, generator=gen))
    down_t = transpose_q4_0(down)
    assert down_t.shape == (f, d // QK4_0 * 18) and down_t.dtype == torch.uint8
    w = dequantize_q4_0(down).t()
    wt = dequantize_q4_0(down_t)
    step = split_q4_0(down_t)[0].repeat_interleave(QK4_0, dim=1)  # the new block scales
    # Q4_0 rounds to half a step, except the clamped top code (q = 15 = 7 steps, not 8): one step
    assert torch.all((wt - w).abs() <= step.abs() * 1.0001 + 1e-6)
    assert rel(wt, w) < 0.15
