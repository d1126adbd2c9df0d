"""The native library as Python sees it: one ctypes signature per `st_*` function it calls.

Rule: every native function Python calls is declared here, once, as its C definition in the
sources (`q4_0.c`, `x4.c`, `layer.c`, `moe.c`, `pool.c`) says; a library whose `st_kernel_abi()`
is not `ABI` (q4_0.h's `ST_ABI`) is refused before any call, so a stale build is never called
with the wrong arguments. Change `ABI` here and in q4_0.h whenever a signature changes.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from model.errors import KernelError
from model.quant import QK4_0

ABI = 5
Q8_BLOCK_BYTES = 4 + QK4_0  # q4_0.h's block_q8: a float scale, then 32 int8 values

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float

# name -> (argument types, result type)
SIGNATURES: dict[str, tuple[list, object]] = {
    # q4_0.c: GGML-order products and the sparse ReGLU kernels
    "st_q4_0_matmul": ([_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR], None),
    "st_q4_0_matvec_rows": ([_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR], None),
    "st_q4_0_axpy_rows": ([_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR], None),
    "st_reglu_sparse": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _F32, _PTR], _I64),
    "st_has_avx2": ([], ctypes.c_int),
    # x4.c: the interleaved layout
    "st_q4_0_x4_bytes": ([_I64, _I64], _I64),
    "st_q4_0_to_x4": ([_PTR, _PTR, _I64, _I64], None),
    "st_q4_0_x4_rows": ([_PTR, _I64, _I64, _PTR, _I64, _PTR], None),
    "st_q4_0_x4_matmul": ([_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR], None),
    "st_isa": ([], ctypes.c_char_p),
    # layer.c: one decoder layer's single-token step and the dense experts
    "st_route": ([_PTR, _PTR, _PTR, _PTR, _PTR], None),
    "st_attention_work_floats": ([_PTR, _I64], _I64),
    "st_attention_decode": ([_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR], None),
    "st_reglu_dense": ([_PTR, _PTR, _I64, _I64, _I64, _PTR, _F32, _PTR, _PTR], None),
    "st_reglu_dense_work_floats": ([_I64, _I64, _I64], _I64),
    "st_moe_dense": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR], None),
    "st_moe_dense_work_floats": ([_I64, _I64, _I64, _I64], _I64),
    "st_layer_decode": ([_PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                         _PTR, _PTR], None),
    # moe.c: a layer's experts over a batch of tokens
    "st_moe_batch": ([_PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR], None),
    "st_moe_batch_work_bytes": ([_I64, _I64, _I64, _I64, _I64], _I64),
    # pool.c: the threads
    "st_pool_spin_us": ([_I64], _I64),
}


def bind(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL:
    """`lib` (loaded from `path`) with every signature declared; KernelError for another ABI."""
    abi = lib.st_kernel_abi()
    if abi != ABI:
        raise KernelError(f"{path} has ABI {abi}, expected {ABI}")
    for name, (args, result) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib
