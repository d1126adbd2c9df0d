"""Matrix products on Q4_0 weights, with the fastest backend this host offers.

Rule: every backend computes `x @ dequantize(w).T` from the same GGML Q4_0 bytes; they differ
only in speed and in rounding. Backends, fastest first:

- `c`: `x4.c` (dense products on the interleaved layout), `q4_0.c` (GGML-order products, the
  sparse kernels), `layer.c` (the single-token decoder layer and the dense experts), `moe.c`
  (a layer's experts over a batch of tokens) and `pool.c` (their threads), compiled on first
  use for the best instruction set the CPU has (`isa.py`: AVX-512 VNNI, AVX-VNNI, AVX2 or
  portable C on x86; NEON with SDOT, NEON or portable C on ARM; `ST_KERNEL_ISA` picks another);
- `torch-int4`: `torch.ops.aten._weight_int4pack_mm_for_cpu` on a repacked copy;
- `reference`: dequantize to float32 and matmul (slow; for checks).

`ST_KERNEL=c|torch-int4|reference` forces one; `ST_KERNEL_CFLAGS` appends compiler flags to the
`c` build (part of its cache key).

One module each: `isa.py` (which instruction set), `build.py` (compiling and caching the
library), `bindings.py` (its ctypes signatures), `backends.py` (which backend runs, `describe`),
`scratch.py` (per-thread work memory), `matrix.py` (`Q4Matrix`), `experts.py` (the dense ReGLU
expert), `sparse.py` (the sparse ReGLU expert), `layer.py` (a decoder layer's native step).
"""
from __future__ import annotations

from model.errors import KernelError
from model.kernels.backends import BACKENDS, backend, describe
from model.kernels.experts import DenseReGLUExpert
from model.kernels.matrix import Q4Matrix
from model.kernels.sparse import SparseReGLUExpert

__all__ = ["BACKENDS", "DenseReGLUExpert", "KernelError", "Q4Matrix", "SparseReGLUExpert", "backend", "describe"]
