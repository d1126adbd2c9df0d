"""`SparseReGLUExpert`: the Python side of the sparse ReGLU kernels (`st_reglu_sparse`,
`st_q4_0_axpy_rows` in q4_0.c), for packages that store each expert's down matrix transposed.

Rule: the same expert as the dense one, down(relu(gate(y)) * up(y)), computed over only the
rows whose gate is > 0 (a zero coefficient adds nothing, so skipping it changes no sum); every
backend agrees within rounding, and a gate within rounding of 0 may count as active in one
backend and not in another (its contribution is then ~0 either way).
"""
from __future__ import annotations

import torch

from model.errors import ModelError
from model.kernels import scratch
from model.kernels.backends import backend
from model.kernels.bindings import Q8_BLOCK_BYTES
from model.kernels.build import native
from model.kernels.matrix import Q4Matrix
from model.quant import QK4_0, Q4_0_BYTES, check_q4_0_matrix, dequantize_q4_0


class SparseReGLUExpert:
    """A ReGLU expert out = down(relu(gate(y)) * up(y)) that skips the rows whose gate is <= 0.

    Weights: gate and up Q4_0 [F, D/32*18] (e.g. the halves of a fused gate_up), and down stored
    TRANSPOSED, downT Q4_0 [F, D_out/32*18] (see `model.quant.transpose_q4_0`), so an active row
    j is one contiguous row and out = sum over active j of a_j * downT[j], a_j = relu(gate_j) * up_j.

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
      not a multiple of 16, which the int4 pack requires), down as a dense float32 copy of
      dequant(downT): out = a @ downT (zero rows of a add nothing).
    - `reference`: everything dequantized to float32 at each call (slow; for checks).
    """

    def __init__(self, gate_blocks: torch.Tensor, up_blocks: torch.Tensor, down_t_blocks: torch.Tensor,
                 kernel: str | None = None):
        for name, b in (("gate", gate_blocks), ("up", up_blocks), ("downT", down_t_blocks)):
            check_q4_0_matrix(b, name)
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
            self._lib = native()
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
        xq = scratch.q8_activations.get(self.in_features // QK4_0 * Q8_BLOCK_BYTES)
        h, rows = scratch.gate_values.get(8 * f), scratch.active_rows.get(4 * f)
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
        out = scratch.expert_out.get(4 * self.out_features).view(torch.float32)
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
