"""Matrix products on Q4_0 weights, with the fastest backend this host offers.

Rule: every backend computes `x @ dequantize(w).T` from the same GGML Q4_0 bytes; they differ
only in speed and in rounding (the C kernel rounds activations to int8 per 32 values, the torch
int4 kernel rounds them to bf16 and the scales from fp16 to bf16). Backends, fastest first:

- `c`: `x4.c` (dense products on the interleaved layout), `q4_0.c` (GGML-order products, the
  sparse kernels), `layer.c` (the single-token decoder layer), `moe.c` (a layer's experts over
  a batch of tokens) and `pool.c` (their threads),
  compiled on first use for the best instruction set the CPU has (`isa.py`: AVX-512 VNNI,
  AVX-VNNI, AVX2 or portable C; `ST_KERNEL_ISA` picks another) into a per-host cache
  (`$ST_KERNEL_CACHE`, default `~/.cache/smallthinker-fleet/kernels`), keyed by the sources,
  the compiler, the flags, the CPU flags and torch's version;
- `torch-int4`: `torch.ops.aten._weight_int4pack_mm_for_cpu` on a repacked copy;
- `reference`: dequantize to float32 and matmul (slow; for checks).

`ST_KERNEL=c|torch-int4|reference` forces one. `ST_KERNEL_CFLAGS` appends compiler flags to the
`c` build; they are part of the cache key. When the `c` backend cannot be built, one warning line
says why and the torch-int4 fallback runs; `describe()` tells which path runs (for
`stctl model bench` and the agent's `/v1/status`).

Sparse ReGLU experts (`SparseReGLUExpert`, `transpose_q4_0`): see their docstrings.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import shlex
from functools import lru_cache
from pathlib import Path

import torch

from model.errors import ModelError
from model.kernels.isa import IsaError, chosen_isa, cpu_features, known_isas
from model.quant import QK4_0, Q4_0_BYTES, dequantize_q4_0, quantize_q4_0, split_q4_0

BACKENDS = ("c", "torch-int4", "reference")
_HERE = Path(__file__).parent
_SOURCES = (_HERE / "q4_0.c", _HERE / "x4.c", _HERE / "layer.c", _HERE / "moe.c", _HERE / "pool.c")
_HEADER = _HERE / "q4_0.h"
_Q8_BLOCK_BYTES = 4 + QK4_0
_ABI = 5


class KernelError(ModelError):
    """The native kernel could not be built or loaded."""


def _cache_dir() -> Path:
    root = os.environ.get("ST_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "smallthinker-fleet", "kernels")
    return Path(root)


def _compile(cc: str, out: Path, cflags: tuple[str, ...] = ()) -> None:
    """Build the library with exactly `cflags` (the ISA's flags, then any extra ones)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [cc, "-O3", "-fopenmp", "-fPIC", "-shared", *cflags, *map(str, _SOURCES), "-o", tmp, "-lm", "-lpthread"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no compiler output"])[-1]
            raise KernelError(f"compiling the native kernels failed: {last}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _native(cflags: str | None = None) -> ctypes.CDLL:
    """The compiled kernel library for the chosen ISA (`isa.chosen_isa`); `cflags` (default
    `$ST_KERNEL_CFLAGS`) are extra compiler flags."""
    return _build(chosen_isa().name, os.environ.get("ST_KERNEL_CFLAGS", "") if cflags is None else cflags)


@lru_cache(maxsize=8)
def _build(isa_name: str, cflags: str) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise KernelError("no C compiler found (gcc or $CC)")
    isa = next(i for i in known_isas() if i.name == isa_name)
    flags = (*isa.flags, *shlex.split(cflags))
    key = hashlib.sha256(
        b"\0".join([*(f.read_bytes() for f in (*_SOURCES, _HEADER)), cc.encode(), (" ".join(sorted(cpu_features())) or platform.processor()).encode(), torch.__version__.encode(),
                    " ".join(flags).encode()])
    ).hexdigest()[:16]
    lib_path = _cache_dir() / f"st-{isa.name}-{key}.so"
    if not lib_path.exists():
        _compile(cc, lib_path, flags)
    lib = ctypes.CDLL(str(lib_path))
    if lib.st_kernel_abi() != _ABI:
        raise KernelError(f"{lib_path} has ABI {lib.st_kernel_abi()}, expected {_ABI}")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.st_q4_0_matmul.argtypes = [vp, i64, i64, vp, i64, vp, vp]
    lib.st_q4_0_matmul.restype = None
    lib.st_q4_0_matvec_rows.argtypes = [vp, i64, i64, vp, i64, vp, vp, vp]
    lib.st_q4_0_matvec_rows.restype = None
    lib.st_q4_0_axpy_rows.argtypes = [vp, i64, i64, vp, vp, i64, vp]
    lib.st_q4_0_axpy_rows.restype = None
    lib.st_reglu_sparse.argtypes = [vp, vp, vp, i64, i64, i64, vp, vp, vp, vp, vp, ctypes.c_float, vp]
    lib.st_reglu_sparse.restype = i64
    lib.st_reglu_dense.argtypes = [vp, vp, i64, i64, i64, vp, ctypes.c_float, vp, vp]
    lib.st_reglu_dense.restype = None
    lib.st_reglu_dense_work_floats.argtypes = [i64, i64, i64]
    lib.st_reglu_dense_work_floats.restype = i64
    lib.st_moe_dense.argtypes = [vp, vp, vp, i64, i64, i64, i64, vp, vp, vp]
    lib.st_moe_dense.restype = None
    lib.st_moe_dense_work_floats.argtypes = [i64, i64, i64, i64]
    lib.st_moe_dense_work_floats.restype = i64
    lib.st_q4_0_x4_bytes.argtypes = [i64, i64]
    lib.st_q4_0_x4_bytes.restype = i64
    lib.st_q4_0_to_x4.argtypes = [vp, vp, i64, i64]
    lib.st_q4_0_to_x4.restype = None
    lib.st_q4_0_x4_rows.argtypes = [vp, i64, i64, vp, i64, vp]
    lib.st_q4_0_x4_rows.restype = None
    lib.st_q4_0_x4_matmul.argtypes = [vp, i64, i64, vp, i64, vp, vp, vp]
    lib.st_q4_0_x4_matmul.restype = None
    lib.st_isa.restype = ctypes.c_char_p
    lib.st_pool_spin_us.argtypes = [i64]
    lib.st_pool_spin_us.restype = i64
    lib.st_route.argtypes = [vp, vp, vp, vp, vp]
    lib.st_route.restype = None
    lib.st_attention_work_floats.argtypes = [vp, i64]
    lib.st_attention_work_floats.restype = i64
    lib.st_attention_decode.argtypes = [vp, vp, vp, vp, vp, i64, i64, vp, vp, vp]
    lib.st_attention_decode.restype = None
    lib.st_layer_decode.argtypes = [vp, vp, vp, i64, vp, vp, vp, vp, vp, i64, i64, vp, vp, vp, vp, vp, vp]
    lib.st_layer_decode.restype = None
    lib.st_moe_batch.argtypes = [vp, vp, i64, i64, i64, i64, i64, vp, vp, vp, vp, vp]
    lib.st_moe_batch.restype = None
    lib.st_moe_batch_work_bytes.argtypes = [i64, i64, i64, i64, i64]
    lib.st_moe_batch_work_bytes.restype = i64
    lib.st_has_avx2.restype = ctypes.c_int
    return lib


_fallback_reason: str | None = None


@lru_cache(maxsize=1)
def backend() -> str:
    """The backend in use: forced by `ST_KERNEL`, else `c` when it builds, else `torch-int4`
    (with one warning line saying why the native kernels did not build)."""
    global _fallback_reason
    forced = os.environ.get("ST_KERNEL")
    if forced:
        if forced not in BACKENDS:
            raise KernelError(f"ST_KERNEL={forced!r} is not one of {', '.join(BACKENDS)}")
        if forced == "c":
            _native()
        return forced
    try:
        _native()
        return "c"
    except IsaError:
        raise
    except (KernelError, OSError, subprocess.SubprocessError) as e:
        _fallback_reason = str(e)
        logging.getLogger("model.kernels").warning(
            "native Q4_0 kernels unavailable (%s): running the torch-int4 fallback, several times slower", e)
        return "torch-int4"


def describe() -> dict:
    """Which kernel path runs: backend, instruction set (for `c`), why it fell back (if it did)."""
    name = backend()
    isa = _native().st_isa().decode() if name == "c" else None
    return {"backend": name, "isa": isa, "fallback_reason": _fallback_reason}


class _Scratch(threading.local):
    """A reusable buffer per thread (no allocation per call; two engines in two threads never
    share one)."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        if self.buf.numel() < nbytes:
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
        return self.buf


_scratch = _Scratch()       # quantized activations
_scratch_corr = _Scratch()  # their per-block corrections (x4 products)
_scratch_h = _Scratch()     # sparse ReGLU: gate values, and the active rows' coefficients
_scratch_rows = _Scratch()  # sparse ReGLU: active row indices (int32)
_scratch_out = _Scratch()   # an expert's output before it is added into the residual


class Q4Matrix:
    """A Q4_0 weight matrix [out, in] ready for products with float32 activations.

    On the `c` backend the blocks are kept in the interleaved x4 layout (`x4.c`: the same bytes,
    4 rows per block group) unless `layout="rows"` keeps GGML's row order (the sparse kernels,
    which gather single rows, need it). `in_place=True` hands `blocks` over: the repack then
    writes into it (no second copy; the caller must not read it as GGML rows afterwards).
    """

    def __init__(self, blocks: torch.Tensor, kernel: str | None = None, *, layout: str = "x4",
                 in_place: bool = False):
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % Q4_0_BYTES:
            raise ModelError(f"Q4_0 matrix expected uint8 [out, in/32*18], got {blocks.dtype} {tuple(blocks.shape)}")
        self.kernel = kernel or backend()
        self.out_features = blocks.shape[0]
        self.in_features = blocks.shape[1] // Q4_0_BYTES * QK4_0
        self.layout = layout if self.kernel == "c" else "rows"
        self.blocks = blocks.contiguous()
        if self.kernel == "torch-int4":
            self._pack_int4()
        elif self.kernel == "c":
            self._lib = _native()
            if self.layout == "x4":
                self._to_x4(in_place and self.blocks.data_ptr() == blocks.data_ptr())

    def _to_x4(self, in_place: bool) -> None:
        n, k = self.out_features, self.in_features
        size = self._lib.st_q4_0_x4_bytes(n, k)
        if in_place and size == self.blocks.numel():
            out = self.blocks
        else:  # a copy (the caller keeps its GGML rows), padded to whole groups of 4 rows
            out = torch.empty(size // self.blocks.shape[1], self.blocks.shape[1], dtype=torch.uint8)
        self._lib.st_q4_0_to_x4(self.blocks.data_ptr(), out.data_ptr(), n, k)
        self.blocks = out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """GGML Q4_0 rows `ids` [T] -> uint8 [T, in/32*18] (a tied embedding's lookups)."""
        ids = ids.to(torch.int64).contiguous()
        if self.layout == "rows":
            return self.blocks[ids]
        out = torch.empty(ids.numel(), self.in_features // QK4_0 * Q4_0_BYTES, dtype=torch.uint8)
        self._lib.st_q4_0_x4_rows(self.blocks.data_ptr(), self.out_features, self.in_features, ids.data_ptr(),
                                  ids.numel(), out.data_ptr())
        return out

    @property
    def nbytes(self) -> int:
        if self.kernel == "torch-int4":
            return self.packed.numel() * self.packed.element_size() + self.scales.numel() * 2
        return self.blocks.numel()

    def _pack_int4(self) -> None:
        """Repack for torch's int4 kernel, whose rows come in multiples of 16: padding rows hold
        q = 8 with scale 0 (weight 0) and are sliced off the product."""
        d, q = split_q4_0(self.blocks)  # [N, nb], [N, K]
        pad = -self.out_features % 16
        if pad:
            q = torch.cat([q, torch.full((pad, q.shape[1]), 8, dtype=q.dtype)])
            d = torch.cat([d, torch.zeros(pad, d.shape[1], dtype=d.dtype)])
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        scale = d.t().contiguous()  # [nb, N + pad]
        self.scales = torch.stack([scale, torch.zeros_like(scale)], dim=-1).to(torch.bfloat16).contiguous()
        del self.blocks

    def int4_pack(self) -> dict[str, torch.Tensor]:
        """The torch-int4 kernel's packed weights and scales (`from_int4_pack` takes them back)."""
        if self.kernel != "torch-int4":
            raise ModelError(f"a {self.kernel} matrix has no int4 pack")
        return {"packed": self.packed, "scales": self.scales}

    @classmethod
    def from_int4_pack(cls, packed: torch.Tensor, scales: torch.Tensor, out_features: int,
                       in_features: int) -> "Q4Matrix":
        """A torch-int4 matrix over an existing pack (e.g. views of a packed cache file): no repacking."""
        m = cls.__new__(cls)
        m.kernel, m.out_features, m.in_features, m.layout = "torch-int4", out_features, in_features, "rows"
        m.packed, m.scales = packed, scales
        return m

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] float32 -> [T, out] float32."""
        if self.kernel == "c":
            x = x.to(torch.float32).contiguous()
            t = x.shape[0]
            y = torch.empty(t, self.out_features, dtype=torch.float32)
            nb = self.in_features // QK4_0
            scratch = _scratch.get(t * nb * _Q8_BLOCK_BYTES)
            if self.layout == "x4":
                corr = _scratch_corr.get(t * nb * 4)
                self._lib.st_q4_0_x4_matmul(self.blocks.data_ptr(), self.out_features, self.in_features,
                                            x.data_ptr(), t, y.data_ptr(), scratch.data_ptr(), corr.data_ptr())
            else:
                self._lib.st_q4_0_matmul(self.blocks.data_ptr(), self.out_features, self.in_features,
                                         x.data_ptr(), t, y.data_ptr(), scratch.data_ptr())
            return y
        if self.kernel == "torch-int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, QK4_0, self.scales)
            return y[:, : self.out_features].to(torch.float32)
        return x.to(torch.float32) @ dequantize_q4_0(self.blocks).t()


def transpose_q4_0(down_blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 down [D, F/32*18] -> Q4_0 downT [F, D/32*18], blocks along D.

    Dequantizes, transposes and requantizes with `model.quant.quantize_q4_0`: a second rounding,
    so downT is not bit-equal to down (each weight moves by at most half a new step); quantize
    the float weights transposed directly when they are at hand.
    """
    if down_blocks.dtype != torch.uint8 or down_blocks.dim() != 2 or down_blocks.shape[1] % Q4_0_BYTES:
        raise ModelError(f"Q4_0 matrix expected uint8 [out, in/32*18], got {down_blocks.dtype} {tuple(down_blocks.shape)}")
    if down_blocks.shape[0] % QK4_0:
        raise ModelError(f"transposing needs the output dim to be a multiple of {QK4_0}, got {down_blocks.shape[0]}")
    return quantize_q4_0(dequantize_q4_0(down_blocks).t().contiguous())


class SparseReGLUExpert:
    """A ReGLU expert out = down(relu(gate(y)) * up(y)) that skips the rows whose gate is <= 0.

    Weights: gate and up Q4_0 [F, D/32*18] (e.g. the halves of a fused gate_up), and down stored
    TRANSPOSED, downT Q4_0 [F, D_out/32*18] (see `transpose_q4_0`), so an active row j is one
    contiguous row and out = sum over active j of a_j * downT[j], a_j = relu(gate_j) * up_j.

    `__call__(y [T, D]) -> (out [T, D_out] float32, active)`, active = number of (token, row)
    pairs with gate > 0 (for T = 1: the active rows of the expert). Backends:

    - `c`, T = 1: one native call (`st_reglu_sparse`): gate GEMV on all F rows, up GEMV on the
      active rows only, then the downT axpy over the active rows. y is rounded to Q8_0 as in
      `Q4Matrix`; the axpy rounds a_j * scale(j, block) to int8 per 16 active rows and 32
      outputs (see q4_0.c), an error of the same size as the Q8_0 rounding of activations.
    - `c`, T > 1: gate and up as dense `Q4Matrix` products (the prefill GEMM), then per token
      the axpy kernel over that token's active rows (the same result as over all rows: a zero
      coefficient adds nothing, and it keeps the rounding of the T = 1 path).
    - `torch-int4`: gate and up through `Q4Matrix(kernel="torch-int4")` (dequantized when F is
      not a multiple of 16, which the int4 pack requires), down as a dense float32 copy of dequant(downT): out = a @ downT (zero rows of a add nothing).
    - `reference`: everything dequantized to float32 at each call (slow; for checks).

    All backends agree within rounding; a gate within rounding of 0 may count as active in one
    backend and not another (its a_j is then ~0 and so is its contribution).
    """

    def __init__(self, gate_blocks: torch.Tensor, up_blocks: torch.Tensor, down_t_blocks: torch.Tensor,
                 kernel: str | None = None):
        for name, b in (("gate", gate_blocks), ("up", up_blocks), ("downT", down_t_blocks)):
            if b.dtype != torch.uint8 or b.dim() != 2 or b.shape[1] % Q4_0_BYTES:
                raise ModelError(f"{name}: Q4_0 matrix expected uint8 [rows, in/32*18], got {b.dtype} {tuple(b.shape)}")
        if gate_blocks.shape != up_blocks.shape or down_t_blocks.shape[0] != gate_blocks.shape[0]:
            raise ModelError(f"sparse ReGLU shapes disagree: gate {tuple(gate_blocks.shape)}, up {tuple(up_blocks.shape)}, "
                             f"downT {tuple(down_t_blocks.shape)}")
        self.kernel = kernel or backend()
        self.ffn_features = gate_blocks.shape[0]
        self.in_features = gate_blocks.shape[1] // Q4_0_BYTES * QK4_0
        self.out_features = down_t_blocks.shape[1] // Q4_0_BYTES * QK4_0
        self.gate_blocks = gate_blocks.contiguous()
        self.up_blocks = up_blocks.contiguous()
        self.down_t_blocks = down_t_blocks.contiguous()
        if self.kernel == "c":
            self._lib = _native()
            self._gate = Q4Matrix(self.gate_blocks, "c", layout="rows")
            self._up = Q4Matrix(self.up_blocks, "c", layout="rows")
        elif self.kernel == "torch-int4":
            # the int4 pack needs F % 16 == 0; otherwise gate and up run dequantized
            packable = self.ffn_features % 16 == 0
            self._gate = Q4Matrix(self.gate_blocks, "torch-int4" if packable else "reference")
            self._up = Q4Matrix(self.up_blocks, "torch-int4" if packable else "reference")
            self._down_t = dequantize_q4_0(self.down_t_blocks)
            del self.gate_blocks, self.up_blocks, self.down_t_blocks

    @classmethod
    def from_gate_up(cls, gate_up_blocks: torch.Tensor, down_t_blocks: torch.Tensor,
                     kernel: str | None = None) -> "SparseReGLUExpert":
        """From a fused gate_up [2F, D/32*18] (gate rows, then up rows) and downT."""
        f = gate_up_blocks.shape[0] // 2
        return cls(gate_up_blocks[:f], gate_up_blocks[f:], down_t_blocks, kernel)

    @property
    def nbytes(self) -> int:
        if self.kernel == "torch-int4":
            return self._gate.nbytes + self._up.nbytes + self._down_t.numel() * 4
        return self.gate_blocks.numel() + self.up_blocks.numel() + self.down_t_blocks.numel()

    def _native_one(self, x: torch.Tensor, out: torch.Tensor, weight: float, acc: torch.Tensor | None) -> int:
        """`st_reglu_sparse` on one contiguous row x: out = expert(x); acc += weight * out if acc."""
        f = self.ffn_features
        xq = _scratch.get(self.in_features // QK4_0 * _Q8_BLOCK_BYTES)
        h, rows = _scratch_h.get(8 * f), _scratch_rows.get(4 * f)
        return int(self._lib.st_reglu_sparse(
            self.gate_blocks.data_ptr(), self.up_blocks.data_ptr(), self.down_t_blocks.data_ptr(),
            self.in_features, f, self.out_features, x.data_ptr(), out.data_ptr(),
            xq.data_ptr(), h.data_ptr(), rows.data_ptr(), weight, None if acc is None else acc.data_ptr(),
        ))

    def accumulate(self, y: torch.Tensor, weight: float, acc: torch.Tensor) -> int:
        """acc [1, D_out] += weight * self(y) for one contiguous float32 row y [1, D]; returns the
        active rows (one native call on the `c` backend)."""
        if self.kernel != "c" or y.shape[0] != 1:
            out, active = self(y)
            acc.add_(out, alpha=weight)
            return active
        out = _scratch_out.get(4 * self.out_features).view(torch.float32)
        return self._native_one(y, out, weight, acc)

    def __call__(self, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """y [T, D] float32 -> (out [T, D_out] float32, number of (token, row) pairs with gate > 0)."""
        if y.dim() != 2 or y.shape[1] != self.in_features:
            raise ModelError(f"expected activations [T, {self.in_features}], got {tuple(y.shape)}")
        x = y.to(torch.float32).contiguous()
        t = x.shape[0]
        if self.kernel == "c":
            out = torch.empty(t, self.out_features, dtype=torch.float32)
            if t == 1:
                return out, self._native_one(x, out, 0.0, None)
            g, u = self._gate(x), self._up(x)
            active = g > 0
            a = g.relu_().mul_(u)
            for i in range(t):
                rows = active[i].nonzero().flatten().to(torch.int32)
                coeffs = a[i, rows.long()].contiguous()
                self._lib.st_q4_0_axpy_rows(
                    self.down_t_blocks.data_ptr(), self.ffn_features, self.out_features,
                    rows.data_ptr(), coeffs.data_ptr(), rows.numel(), out[i].data_ptr(),
                )
            return out, int(active.sum())
        if self.kernel == "torch-int4":
            g, u = self._gate(x), self._up(x)
            down_t = self._down_t
        else:
            g = x @ dequantize_q4_0(self.gate_blocks).t()
            u = x @ dequantize_q4_0(self.up_blocks).t()
            down_t = dequantize_q4_0(self.down_t_blocks)
        active = int((g > 0).sum())
        return g.relu_().mul_(u) @ down_t, active


class DenseReGLUExpert:
    """The dense ReGLU expert down(relu(gate(y)) * up(y)) on the `c` backend: gate_up Q4_0
    [2F, D] (gate rows, then up rows), down Q4_0 [D_out, F] in HF order. `__call__` runs the two
    products as `Q4Matrix`es (any T); `accumulate` runs a whole single-token expert in one native
    call (`st_reglu_dense`) and adds its weighted output in place."""

    def __init__(self, gate_up_blocks: torch.Tensor, down_blocks: torch.Tensor, in_place: bool = False):
        self.gate_up = Q4Matrix(gate_up_blocks, "c", in_place=in_place)
        self.down = Q4Matrix(down_blocks, "c", in_place=in_place)
        self.ffn_features = self.gate_up.out_features // 2
        if self.down.in_features != self.ffn_features:
            raise ModelError(f"dense ReGLU shapes disagree: gate_up {tuple(gate_up_blocks.shape)}, "
                             f"down {tuple(down_blocks.shape)}")
        self._lib = _native()
        self._work_bytes = 4 * self._lib.st_reglu_dense_work_floats(
            self.gate_up.in_features, self.ffn_features, self.down.out_features)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def __call__(self, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        gate, up = self.gate_up(y).chunk(2, dim=-1)
        return self.down(gate.relu_().mul_(up)), None

    def accumulate(self, y: torch.Tensor, weight: float, acc: torch.Tensor) -> None:
        """acc [1, D_out] += weight * self(y) for one contiguous float32 row y [1, D]."""
        if y.shape[0] != 1:
            acc.add_(self(y)[0], alpha=weight)
            return
        self._lib.st_reglu_dense(self.gate_up.blocks.data_ptr(), self.down.blocks.data_ptr(),
                                 self.gate_up.in_features, self.ffn_features, self.down.out_features,
                                 y.data_ptr(), weight, acc.data_ptr(), _scratch_out.get(self._work_bytes).data_ptr())
