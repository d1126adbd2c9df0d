"""Every instruction-set path of the native kernels computes the same products.

The CPU decides which paths can run here (`model.kernels.isa.available_isas`: AVX-512 VNNI,
AVX-VNNI, AVX2, portable C); each one it supports is built (`ST_KERNEL_ISA`) and checked against
the float64 product of the dequantized weights within the Q8_0 rounding bound of test_quant,
and against the portable path: the vector paths differ from it only in the order of float
additions within a block (4 partial sums), so by <= 1e-5 of the output's scale.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from model.kernels import DenseReGLUExpert, Q4Matrix, describe
from model.kernels.build import native
from model.kernels.isa import IsaError, available_isas, chosen_isa
from test_quant import _error_bound

Q4_0 = GGMLQuantizationType.Q4_0
ISAS = available_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch) -> str:
    monkeypatch.setenv("ST_KERNEL_ISA", request.param)
    assert native().st_isa().decode() == request.param
    return request.param


def _weights(out_f: int, in_f: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return gguf_quantize((rng.standard_t(4, size=(out_f, in_f)) / np.sqrt(in_f)).astype(np.float32), Q4_0)


@pytest.mark.parametrize("m", [1, 2, 3, 6, 17])  # every pass: 4 rows, the last 1, 2 or 3
@pytest.mark.parametrize("out_f,in_f", [(4, 32), (6, 64), (160, 1536), (301, 256)])
def test_every_isa_matches_the_float64_product(isa, out_f, in_f, m):
    blocks = _weights(out_f, in_f, out_f + in_f + m)
    w = gguf_dequantize(blocks, Q4_0).astype(np.float64)
    x = np.random.default_rng(m).standard_normal((m, in_f)).astype(np.float32)
    x[:, :32] *= 20.0
    y = Q4Matrix(torch.from_numpy(blocks.copy()), "c")(torch.from_numpy(x)).numpy().astype(np.float64)
    y_ref = x.astype(np.float64) @ w.T
    bound = _error_bound("c", x.astype(np.float64), w, y_ref)
    assert np.all(np.abs(y - y_ref) <= bound), f"{isa}: worst {np.max(np.abs(y - y_ref) / bound):.3g} x bound"


def test_vector_paths_equal_the_portable_path(monkeypatch):
    blocks = torch.from_numpy(_weights(300, 1536, 5))
    x = torch.randn(5, 1536, generator=torch.Generator().manual_seed(1))
    results = {}
    for name in ISAS:
        monkeypatch.setenv("ST_KERNEL_ISA", name)
        results[name] = (Q4Matrix(blocks.clone(), "c")(x), Q4Matrix(blocks.clone(), "c")(x[:1]))
    batch, single = results["portable"]
    for name, (b, s) in results.items():
        assert float((b - batch).abs().max()) <= 1e-5 * float(batch.abs().max()), name
        assert float((s - single).abs().max()) <= 1e-5 * float(single.abs().max()), name


def test_fused_experts_equal_separate_products(isa):
    """st_moe_dense (a layer's experts in one call) = sum of weight * down(relu(gate) * up)."""
    gen = torch.Generator().manual_seed(3)
    d, f = 256, 96
    experts, parts = [], []
    for e in range(3):
        gu, dn = torch.from_numpy(_weights(2 * f, d, 10 + e)), torch.from_numpy(_weights(d, f, 20 + e))
        experts.append(DenseReGLUExpert(Q4Matrix(gu.clone(), "c"), Q4Matrix(dn.clone(), "c")))
        parts.append((Q4Matrix(gu, "c", layout="rows"), Q4Matrix(dn, "c", layout="rows")))
    y = torch.randn(1, d, generator=gen)
    weights = [0.5, 0.3, 0.2]
    acc = torch.zeros(1, d)
    for e, w in zip(experts, weights):
        e.accumulate(y, w, acc)
    expected = torch.zeros(1, d)
    for (gu, dn), w in zip(parts, weights):
        g, u = gu(y).chunk(2, dim=-1)
        expected += w * dn(g.relu() * u)
    assert float((acc - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


def _moe_batch(experts: list, ids: torch.Tensor, weights: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """st_moe_batch (moe.c) over `experts` (DenseReGLUExpert) for y [T, D]: the added outputs."""
    lib = native()
    t, d = y.shape
    f, k = experts[0].ffn_features, ids.shape[1]
    gate_up = (ctypes.c_void_p * len(experts))(*(e.gate_up.blocks.data_ptr() for e in experts))
    down = (ctypes.c_void_p * len(experts))(*(e.down.blocks.data_ptr() for e in experts))
    work = torch.empty(lib.st_moe_batch_work_bytes(t, d, f, len(experts), k), dtype=torch.uint8)
    out = torch.zeros(t, d)
    ids32, w32 = ids.to(torch.int32).contiguous(), weights.to(torch.float32).contiguous()
    lib.st_moe_batch(gate_up, down, len(experts), k, d, f, t, ids32.data_ptr(), w32.data_ptr(), y.data_ptr(),
                     out.data_ptr(), work.data_ptr())
    return out


@pytest.mark.parametrize("tokens", [1, 5, 19])
def test_batch_experts_equal_separate_products(isa, tokens):
    """st_moe_batch (prefill: every token's experts, each expert over its tokens at once) = the
    sum over each token's experts of weight * down(relu(gate) * up), as Q4Matrix products; and
    the same bits on one thread as on two."""
    gen = torch.Generator().manual_seed(tokens)
    d, f, n_experts, k = 128, 64, 6, 2
    experts = [DenseReGLUExpert(Q4Matrix(torch.from_numpy(_weights(2 * f, d, 30 + e)), "c"),
                                Q4Matrix(torch.from_numpy(_weights(d, f, 40 + e)), "c")) for e in range(n_experts)]
    y = torch.randn(tokens, d, generator=gen)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    expected = torch.zeros(tokens, d)
    for t in range(tokens):
        for e, w in zip(ids[t].tolist(), weights[t].tolist()):
            expected[t] += w * experts[e](y[t:t + 1])[0][0]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = _moe_batch(experts, ids, weights, y)
        torch.set_num_threads(1)
        one = _moe_batch(experts, ids, weights, y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert float((two - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


@pytest.mark.parametrize("out_f", [4, 7, 64])
def test_x4_repack_is_a_permutation_and_rows_come_back_exact(out_f):
    blocks = torch.from_numpy(_weights(out_f, 96, out_f))
    mat = Q4Matrix(blocks.clone(), "c")
    ids = torch.arange(out_f)
    assert torch.equal(mat.rows(ids), blocks)
    assert torch.equal(mat.rows(torch.tensor([out_f - 1, 0])), blocks[[out_f - 1, 0]])
    if out_f % 4 == 0:  # in place: the same memory, the same bytes in another order
        handed = blocks.clone()
        inplace = Q4Matrix(handed, "c", in_place=True)
        assert inplace.blocks.data_ptr() == handed.data_ptr()
        assert not torch.equal(handed, blocks)  # reordered
        assert torch.equal(handed.flatten().sort().values, blocks.flatten().sort().values)


def test_the_pool_gives_the_same_bits_when_its_threads_sleep_at_once():
    """ST_POOL_SPIN_US=0: every wait goes to the futex (the busy-neighbour path)."""
    lib = native()
    blocks = torch.from_numpy(_weights(512, 512, 8))
    mat = Q4Matrix(blocks, "c")
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(2))
    before_threads, before_spin = torch.get_num_threads(), lib.st_pool_spin_us(-1)
    try:
        torch.set_num_threads(1)
        one = mat(x), mat(x[:1])
        torch.set_num_threads(2)
        lib.st_pool_spin_us(0)
        sleeping = [(mat(x), mat(x[:1])) for _ in range(20)]
    finally:
        lib.st_pool_spin_us(before_spin)
        torch.set_num_threads(before_threads)
    for b, s in sleeping:
        assert torch.equal(b, one[0]) and torch.equal(s, one[1])


def test_an_isa_the_cpu_lacks_or_nobody_builds_is_refused(monkeypatch):
    monkeypatch.setenv("ST_KERNEL_ISA", "sse9")
    with pytest.raises(IsaError, match="not one of"):
        chosen_isa()
    missing = [name for name in ("avx512-vnni", "avx-vnni", "avx2") if name not in ISAS]
    if missing:
        monkeypatch.setenv("ST_KERNEL_ISA", missing[0])
        with pytest.raises(IsaError, match="lacks"):
            chosen_isa()


def test_describe_names_the_path_that_runs():
    info = describe()
    assert info["backend"] == "c" and info["isa"] == chosen_isa().name and info["fallback_reason"] is None


def test_a_failed_native_build_warns_once_and_names_the_reason(tmp_path):
    """No compiler: the torch-int4 fallback runs, one warning line says why, describe() says so."""
    import subprocess
    import sys

    code = ("from model.kernels import backend, describe; b = backend(); backend(); import json; "
            "print(json.dumps(describe()))")
    env = {"PATH": "/nonexistent", "CC": str(tmp_path / "no-such-cc"), "ST_KERNEL_CACHE": str(tmp_path / "kc"),
           "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    info = json.loads(proc.stdout)
    assert info["backend"] == "torch-int4" and info["isa"] is None and info["fallback_reason"]
    warnings = [line for line in proc.stderr.splitlines() if "torch-int4 fallback" in line]
    assert len(warnings) == 1 and info["fallback_reason"] in warnings[0]
