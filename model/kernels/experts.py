"""`DenseReGLUExpert`: the dense ReGLU expert, down(relu(gate(y)) * up(y)), over any two matrices.

Rule: this is the one definition of the dense expert, for every quant and backend. `__call__`
is its math on whatever matrices it holds (`Q4Matrix` on any backend, or float32 copies of a
bf16 package's weights); when both are Q4_0 in the x4 layout on the `c` backend (`fused`), a
single token's expert runs as one native call (`st_reglu_dense`, layer.c) and a layer's native
calls (`model.kernels.layer`) read its blocks directly: the same products, rounded the same way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from model.errors import ModelError
from model.kernels import scratch
from model.kernels.build import native
from model.kernels.matrix import Q4Matrix

if TYPE_CHECKING:
    from model.model import Matrix


class DenseReGLUExpert:
    """gate_up [2F, D] (gate rows, then up rows: one product per expert) and down [D_out, F] in
    HF order. `__call__(y [T, D]) -> (out [T, D_out], None)`; `accumulate` adds a weighted
    single-token output in place."""

    def __init__(self, gate_up: Matrix, down: Matrix):
        self.gate_up, self.down = gate_up, down
        self.ffn_features = gate_up.out_features // 2
        if down.in_features != self.ffn_features:
            raise ModelError(f"dense ReGLU shapes disagree: gate_up [{gate_up.out_features}, {gate_up.in_features}], "
                             f"down [{down.out_features}, {down.in_features}]")
        self.fused = all(isinstance(m, Q4Matrix) and m.kernel == "c" and m.layout == "x4" for m in (gate_up, down))
        if self.fused:
            self._lib = native()
            self._work_bytes = 4 * self._lib.st_reglu_dense_work_floats(
                gate_up.in_features, self.ffn_features, down.out_features)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def __call__(self, y: torch.Tensor) -> tuple[torch.Tensor, None]:
        gate, up = self.gate_up(y).chunk(2, dim=-1)  # [T, F] each
        return self.down(gate.relu_().mul_(up)), None

    def accumulate(self, y: torch.Tensor, weight: float, acc: torch.Tensor) -> None:
        """acc [1, D_out] += weight * self(y) for one contiguous float32 row y [1, D]."""
        if not self.fused or y.shape[0] != 1:
            acc.add_(self(y)[0], alpha=weight)
            return
        self._lib.st_reglu_dense(self.gate_up.blocks.data_ptr(), self.down.blocks.data_ptr(),
                                 self.gate_up.in_features, self.ffn_features, self.down.out_features,
                                 y.data_ptr(), weight, acc.data_ptr(), scratch.expert_out.get(self._work_bytes).data_ptr())
