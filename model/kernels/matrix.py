"""`Q4Matrix`: a Q4_0 weight matrix [out, in] multiplied with float32 activations by the backend
this process runs (`backends.backend()`).

Rule: every backend computes `x @ dequantize(w).T` from the same GGML Q4_0 bytes; they differ
only in speed and in rounding (the `c` kernels round activations to int8 per 32 values, the
torch int4 kernel rounds them to bf16 and the scales from fp16 to bf16; `reference`
dequantizes to float32 at each call). Whatever layout a matrix keeps its blocks in, `rows`
gives GGML's rows back byte for byte.
"""
from __future__ import annotations

import torch

from model.errors import ModelError
from model.kernels import scratch
from model.kernels.backends import backend
from model.kernels.bindings import Q8_BLOCK_BYTES
from model.kernels.build import native
from model.quant import QK4_0, Q4_0_BYTES, check_q4_0_matrix, dequantize_q4_0, split_q4_0


class Q4Matrix:
    """A Q4_0 weight matrix [out, in] ready for products with float32 activations.

    On the `c` backend the blocks are kept in the interleaved x4 layout (`x4.c`: the same bytes,
    4 rows per block group) unless `layout="rows"` keeps GGML's row order (the sparse kernels,
    which gather single rows, need it). `in_place=True` hands `blocks` over: the repack then
    writes into it (no second copy; the caller must not read it as GGML rows afterwards).
    """

    def __init__(self, blocks: torch.Tensor, kernel: str | None = None, *, layout: str = "x4",
                 in_place: bool = False):
        check_q4_0_matrix(blocks)
        self.kernel = kernel or backend()
        self.out_features = blocks.shape[0]
        self.in_features = blocks.shape[1] // Q4_0_BYTES * QK4_0
        self.layout = layout if self.kernel == "c" else "rows"
        self.blocks = blocks.contiguous()
        if self.kernel == "torch-int4":
            self._pack_int4()
        elif self.kernel == "c":
            self._lib = native()
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
            xq = scratch.q8_activations.get(t * nb * Q8_BLOCK_BYTES)
            if self.layout == "x4":
                corr = scratch.x4_corrections.get(t * nb * 4)
                self._lib.st_q4_0_x4_matmul(self.blocks.data_ptr(), self.out_features, self.in_features,
                                            x.data_ptr(), t, y.data_ptr(), xq.data_ptr(), corr.data_ptr())
            else:
                self._lib.st_q4_0_matmul(self.blocks.data_ptr(), self.out_features, self.in_features,
                                         x.data_ptr(), t, y.data_ptr(), xq.data_ptr())
            return y
        if self.kernel == "torch-int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, QK4_0, self.scales)
            return y[:, : self.out_features].to(torch.float32)
        return x.to(torch.float32) @ dequantize_q4_0(self.blocks).t()
