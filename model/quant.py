"""Q4_0, the GGML 4-bit block format, as a small torch codec.

Rule: bytes are GGML's, byte for byte (checked against `gguf.quants` in the tests). Each block
of 32 weights is 18 bytes: fp16 scale `d`, then 16 bytes whose low nibble is element j and high
nibble element j+16; a weight is d * (q - 8). A matrix [out, in] becomes uint8 [out, in/32*18].
"""
from __future__ import annotations

import torch

from model.errors import ModelError

# quant name -> (weights per block, bytes per block)
BLOCK_SIZES: dict[str, tuple[int, int]] = {"q4_0": (32, 2 + 16)}
QK4_0, Q4_0_BYTES = BLOCK_SIZES["q4_0"]


def q4_0_row_bytes(in_features: int) -> int:
    if in_features % QK4_0:
        raise ModelError(f"q4_0 needs the input dim to be a multiple of {QK4_0}, got {in_features}")
    return in_features // QK4_0 * Q4_0_BYTES


def check_q4_0_matrix(blocks: torch.Tensor, name: str = "") -> None:
    """ModelError unless `blocks` is a Q4_0 matrix: uint8 [rows, in/32*18]."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % Q4_0_BYTES:
        raise ModelError(f"{name + ': ' if name else ''}Q4_0 matrix expected uint8 [rows, in/32*18], "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")


def quantize_q4_0(weight: torch.Tensor) -> torch.Tensor:
    """[..., K] float -> [..., K/32*18] uint8 GGML Q4_0 blocks (same rounding as ggml/gguf)."""
    *lead, k = weight.shape
    q4_0_row_bytes(k)
    blocks = weight.detach().to(torch.float32).reshape(-1, QK4_0)  # [B, 32]
    imax = blocks.abs().argmax(dim=-1, keepdim=True)
    signed_max = torch.gather(blocks, -1, imax)  # [B, 1]
    d = signed_max / -8
    inv_d = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc(blocks * inv_d + 8.5).to(torch.uint8).clamp_(0, 15)  # [B, 32]
    packed = q[:, :16] | (q[:, 16:] << 4)  # [B, 16]
    scale_bytes = d.to(torch.float16).view(torch.uint8)  # [B, 2]
    out = torch.cat([scale_bytes, packed], dim=-1)  # [B, 18]
    return out.reshape(*lead, k // QK4_0 * Q4_0_BYTES)


def split_q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [..., nb*18] -> (scales float32 [..., nb], nibbles uint8 [..., nb*32] in element order)."""
    *lead, nbytes = blocks.shape
    if blocks.dtype != torch.uint8 or nbytes % Q4_0_BYTES:
        raise ModelError(f"not Q4_0 data: dtype {blocks.dtype}, last dim {nbytes}")
    b = blocks.reshape(-1, Q4_0_BYTES)
    d = b[:, :2].contiguous().view(torch.float16).to(torch.float32)  # [B, 1]
    qs = b[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # [B, 32]
    nb = nbytes // Q4_0_BYTES
    return d.reshape(*lead, nb), q.reshape(*lead, nb * QK4_0)


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [..., nb*18] -> float32 [..., nb*32]."""
    d, q = split_q4_0(blocks)
    *lead, k = q.shape
    w = (q.to(torch.float32) - 8).reshape(*lead, k // QK4_0, QK4_0) * d.unsqueeze(-1)
    return w.reshape(*lead, k)


def transpose_q4_0(down_blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 down [D, F/32*18] -> Q4_0 downT [F, D/32*18], blocks along D (the sparse ReGLU layout).

    Dequantizes, transposes and requantizes: a second rounding, so downT is not bit-equal to
    down (each weight moves by at most half a new step); quantize the float weights transposed
    directly when they are at hand.
    """
    check_q4_0_matrix(down_blocks, "down")
    if down_blocks.shape[0] % QK4_0:
        raise ModelError(f"transposing needs the output dim to be a multiple of {QK4_0}, got {down_blocks.shape[0]}")
    return quantize_q4_0(dequantize_q4_0(down_blocks).t().contiguous())
