"""Weight matrices as the forward pass sees them: callables [T, in] -> [T, out] in float32.

Rule: the manifest's `quant` decides the representation, never a file name or a dtype guess:
`q4_0` tensors are GGML blocks run by `model.kernels.Q4Matrix`; `bf16` tensors are widened to
float32 once at load.
"""
from __future__ import annotations

import torch

from model.errors import PackageError
from model.kernels import Q4Matrix
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


def make_matrix(tensor: torch.Tensor, quant: str, name: str = "", kernel: str | None = None):
    if quant == "q4_0":
        if tensor.dtype != torch.uint8:
            raise PackageError(f"{name}: q4_0 package holds {tensor.dtype}, expected uint8 blocks")
        return Q4Matrix(tensor, kernel)
    if tensor.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise PackageError(f"{name}: {quant} package holds {tensor.dtype}")
    return DenseMatrix(tensor)


class EmbeddingRows:
    """Token id -> embedding row in float32, from Q4_0 blocks or a dense table."""

    def __init__(self, table: torch.Tensor, quant: str):
        self.table, self.quant = table, quant

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table[ids]
        return dequantize_q4_0(rows) if self.quant == "q4_0" else rows.to(torch.float32)
