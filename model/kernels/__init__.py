"""Matrix products on Q4_0 weights, with the fastest backend this host offers.

Rule: every backend computes `x @ dequantize(w).T` from the same GGML Q4_0 bytes; they differ
only in speed and in rounding (the C kernel rounds activations to int8 per 32 values, the torch
int4 kernel rounds them to bf16 and the scales from fp16 to bf16). Backends, fastest first:

- `c`: `q4_0.c`, compiled on first use with the host's flags into a per-host cache
  (`$ST_KERNEL_CACHE`, default `~/.cache/smallthinker-fleet/kernels`), keyed by the source,
  the compiler, the CPU flags and torch's version;
- `torch-int4`: `torch.ops.aten._weight_int4pack_mm_for_cpu` on a repacked copy;
- `reference`: dequantize to float32 and matmul (slow; for checks).

`ST_KERNEL=c|torch-int4|reference` forces one.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from model.errors import ModelError
from model.quant import QK4_0, Q4_0_BYTES, dequantize_q4_0, split_q4_0

BACKENDS = ("c", "torch-int4", "reference")
_SOURCE = Path(__file__).with_name("q4_0.c")
_Q8_BLOCK_BYTES = 4 + QK4_0
_ABI = 2


class KernelError(ModelError):
    """The native kernel could not be built or loaded."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("ST_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "smallthinker-fleet", "kernels")
    return Path(root)


def _compile(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", str(_SOURCE), "-o", tmp, "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise KernelError(f"compiling {_SOURCE.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def _native() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise KernelError("no C compiler found (gcc or $CC)")
    key = hashlib.sha256(
        b"\0".join([_SOURCE.read_bytes(), cc.encode(), _cpu_flags().encode(), torch.__version__.encode()])
    ).hexdigest()[:16]
    lib_path = _cache_dir() / f"q4_0-{key}.so"
    if not lib_path.exists():
        _compile(cc, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    if lib.st_kernel_abi() != _ABI:
        raise KernelError(f"{lib_path} has ABI {lib.st_kernel_abi()}, expected {_ABI}")
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.st_q4_0_matmul.argtypes = [vp, i64, i64, vp, i64, vp, vp]
    lib.st_q4_0_matmul.restype = None
    return lib


@lru_cache(maxsize=1)
def backend() -> str:
    """The backend in use: forced by `ST_KERNEL`, else `c` when it builds, else `torch-int4`."""
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
    except (KernelError, OSError, subprocess.SubprocessError):
        return "torch-int4"


class _Scratch:
    """One reusable buffer for the quantized activations (no allocation per call)."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        if self.buf.numel() < nbytes:
            self.buf = torch.empty(nbytes, dtype=torch.uint8)
        return self.buf


_scratch = _Scratch()


class Q4Matrix:
    """A Q4_0 weight matrix [out, in] ready for products with float32 activations."""

    def __init__(self, blocks: torch.Tensor, kernel: str | None = None):
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % Q4_0_BYTES:
            raise ModelError(f"Q4_0 matrix expected uint8 [out, in/32*18], got {blocks.dtype} {tuple(blocks.shape)}")
        self.kernel = kernel or backend()
        self.out_features = blocks.shape[0]
        self.in_features = blocks.shape[1] // Q4_0_BYTES * QK4_0
        self.blocks = blocks.contiguous()
        if self.kernel == "torch-int4":
            self._pack_int4()
        elif self.kernel == "c":
            self._lib = _native()

    @property
    def nbytes(self) -> int:
        if self.kernel == "torch-int4":
            return self.packed.numel() * self.packed.element_size() + self.scales.numel() * 2
        return self.blocks.numel()

    def _pack_int4(self) -> None:
        d, q = split_q4_0(self.blocks)  # [N, nb], [N, K]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        scale = d.t().contiguous()  # [nb, N]
        self.scales = torch.stack([scale, torch.zeros_like(scale)], dim=-1).to(torch.bfloat16).contiguous()
        del self.blocks

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] float32 -> [T, out] float32."""
        if self.kernel == "c":
            x = x.to(torch.float32).contiguous()
            t = x.shape[0]
            y = torch.empty(t, self.out_features, dtype=torch.float32)
            scratch = _scratch.get(t * (self.in_features // QK4_0) * _Q8_BLOCK_BYTES)
            self._lib.st_q4_0_matmul(
                self.blocks.data_ptr(), self.out_features, self.in_features,
                x.data_ptr(), t, y.data_ptr(), scratch.data_ptr(),
            )
            return y
        if self.kernel == "torch-int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, QK4_0, self.scales)
            return y.to(torch.float32)
        return x.to(torch.float32) @ dequantize_q4_0(self.blocks).t()
