"""Weight matrices, experts and embedding rows as the forward pass sees them, in float32.

Rules:
- the manifest's `quant` decides the representation, never a file name or a dtype guess:
  `q4_0` tensors are GGML blocks run by `model.kernels.Q4Matrix`; `bf16` tensors are widened to
  float32 once at load;
- an expert is made in one place (`make_expert`): the dense ReGLU expert over two such
  matrices, or the sparse one when the package stores down transposed;
- the token-embedding table stays on disk unless the head multiplies with that very table
  (`head_keeps_stored_table`): a forward pass reads its tokens' rows with one `pread` each from
  the embed shard, verified at load and held open. That is done always, not only under a memory
  budget: on the 4B shape (Q4_0 rows of 864 bytes, page cache warm) it adds ~50 us to a decode
  step (~2 us per row in a prefill) against 85-150 ms per token, and saves the table, 131 MB.
"""
from __future__ import annotations

import torch

from model.errors import ConfigError, PackageError
from model.kernels import DenseReGLUExpert, Q4Matrix, SparseReGLUExpert, backend
from model.package import ShardFile, tensor_buffer, torch_dtype
from model.quant import dequantize_q4_0


class DenseMatrix:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight.to(torch.float32).contiguous()  # [out, in]
        self.out_features, self.in_features = self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def make_matrix(tensor: torch.Tensor, quant: str, name: str = "", kernel: str | None = None,
                in_place: bool = False):
    """`in_place`: the caller hands `tensor` over, so a Q4_0 repack may reuse its memory."""
    if quant == "q4_0":
        if tensor.dtype != torch.uint8:
            raise PackageError(f"{name}: q4_0 package holds {tensor.dtype}, expected uint8 blocks")
        return Q4Matrix(tensor, kernel, in_place=in_place)
    if tensor.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise PackageError(f"{name}: {quant} package holds {tensor.dtype}")
    return DenseMatrix(tensor)


def make_expert(gate_up: torch.Tensor, down: torch.Tensor, quant: str, kernel: str | None = None, *,
                sparse: bool = False, in_place: bool = False) -> DenseReGLUExpert | SparseReGLUExpert:
    """The expert over its stored gate_up [2F, .] (gate rows, then up rows) and down [D, .], or
    downT [F, .] when `sparse` (Q4_0 only). `in_place`: the caller hands the tensors over (an
    expert store's slot), so a Q4_0 repack reuses their memory."""
    if sparse:
        return SparseReGLUExpert.from_gate_up(gate_up, down, kernel)
    return DenseReGLUExpert(make_matrix(gate_up, quant, "gate_up", kernel, in_place),
                            make_matrix(down, quant, "down", kernel, in_place))


def head_keeps_stored_table(quant: str, kernel: str | None) -> bool:
    """Whether `make_matrix` runs on the stored tensor itself (Q4_0 blocks with the `c` or
    `reference` kernel) rather than on a repacked (torch-int4) or widened (bf16) copy of it."""
    return quant == "q4_0" and (kernel or backend()) in ("c", "reference")


def _rows_to_float(rows: torch.Tensor, quant: str) -> torch.Tensor:
    return dequantize_q4_0(rows) if quant == "q4_0" else rows.to(torch.float32)


class EmbeddingRows:
    """Token id -> embedding row in float32, from the resident table the tied head multiplies
    with (`head`: its rows come back in GGML order whatever layout the head keeps them in)."""

    def __init__(self, head, quant: str):
        self.head, self.quant = head, quant

    @property
    def nbytes(self) -> int:
        return self.head.nbytes

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return _rows_to_float(self.head.rows(ids), self.quant)


class EmbeddingRowsOnDisk:
    """Token id -> embedding row in float32, each row read with `pread` from the embed shard.

    The shard must have passed its sha256 check when it was opened; later reads trust the open
    file (as the expert store does; the agent re-verifies files at install and in health checks).
    """

    nbytes = 0  # nothing resident but an open file and the rows of the current call

    def __init__(self, shard: ShardFile, tensor: str, quant: str):
        stored = shard.tensors[tensor]
        self.shard, self.quant, self.offset = shard, quant, stored.offset
        self.dtype = torch_dtype(shard, tensor)
        self.vocab, self.row_shape = stored.shape[0], stored.shape[1:]
        self.row_bytes = stored.length // self.vocab

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = ids.tolist()
        if tokens and not 0 <= min(tokens) <= max(tokens) < self.vocab:
            raise ConfigError(f"token ids must lie in [0, {self.vocab})")
        raw = torch.empty(len(tokens), self.row_bytes, dtype=torch.uint8)  # [T, row bytes]
        buf = tensor_buffer(raw)
        for i, token in enumerate(tokens):
            self.shard.pread(self.offset + token * self.row_bytes, buf[i * self.row_bytes:(i + 1) * self.row_bytes])
        rows = raw.view(self.dtype).view(len(tokens), *self.row_shape)  # [T, D/32*18] blocks or [T, D]
        return _rows_to_float(rows, self.quant)
