"""The SmallThinker forward pass on CPU, in one file.

Rules this file keeps (DESIGN.md, "SmallThinker forward pass"):
- the router reads the layer's residual *before* `input_layernorm`, so the experts a layer
  needs are known (and handed to the expert store to fetch) before its attention runs;
- top-k of the router logits; weights = softmax over the top-k logits, or sigmoid of them
  normalized to sum 1, as `moe_primary_router_apply_softmax` says;
- attention is GQA without biases or QK-norm; RoPE (NeoX rotate-half, full head dim) only on
  layers whose `rope_layout` entry is 1; layers whose `sliding_window_layout` entry is 1 see only
  keys with 0 <= i - j < sliding_window_size, and cache only that many;
- experts are ReGLU: down(relu(gate(y)) * up(y)), weighted and summed;
- final RMSNorm, then lm_head, or the tied embedding.

Shape letters: T tokens in this call, S key positions visible, D hidden, H query heads,
G key/value heads, Hd head dim, E experts, K active experts, F expert FFN dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import torch
import torch.nn.functional as F

from model.config import ModelConfig


class Matrix(Protocol):
    """A weight matrix [out, in] that multiplies float32 activations: [T, in] -> [T, out]."""

    out_features: int
    in_features: int
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Expert(Protocol):
    """A ReGLU expert, down(relu(gate(y)) * up(y)) (`model.kernels.DenseReGLUExpert`, or the
    sparse one): y [T, D] -> (out [T, D], active (token, row) pairs, or None if not counted)."""

    nbytes: int

    def __call__(self, y: torch.Tensor) -> tuple[torch.Tensor, int | None]: ...

    def accumulate(self, y: torch.Tensor, weight: float, acc: torch.Tensor) -> int | None:
        """acc += weight * out for one contiguous row y [1, D]; returns what `__call__` counts."""


class FastDecode(Protocol):
    """A layer's single-token step in native code (`model.kernels.layer.NativeLayer`), the same
    math as `Block.router` (its weights, plus `bias` when one is given) and `Block.attention`
    followed by the post-attention norm."""

    def route(self, h: torch.Tensor, bias: torch.Tensor | None) -> tuple[list[int], list[float]]: ...

    def attend(self, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, n_keys: int,
               rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor: ...

    def moe(self, experts: list[Expert], weights: list[float], h: torch.Tensor) -> bool:
        """h += the weighted experts of the attended row in one native call; False (nothing
        done) when the experts are not of the kind it runs."""

    has_experts: bool  # whether `decode` runs (the layer's experts are bound, resident for good)

    def bind_experts(self, experts: list[Expert]) -> bool:
        """Hold all the layer's experts (resident for good) for `decode`; False if it cannot."""

    def decode(self, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, n_keys: int,
               rope: tuple[torch.Tensor, torch.Tensor] | None, bias: torch.Tensor | None) -> list[int]:
        """route + attend + moe of the bound experts in one native call; the chosen ids."""

    def moe_batch(self, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The bound experts of each token (ids, weights [T, K]) of y [T, D], weighted and summed
        [T, D], in one call (the same bits as `Block.moe` without a budget)."""


class ExpertSource(Protocol):
    """Where a layer gets its experts: `prefetch` is told the router's choice before attention and
    returns the same experts in the order they will be ready (resident ones first, then reads in
    queue order), the order the layer then computes them in; `use` yields an expert's weights
    (waiting for its read) and keeps them resident meanwhile."""

    lookahead: bool  # whether `prefetch_ahead` wants the next layer's guessed experts

    def prefetch(self, layer: int, expert_ids: list[int]) -> list[int]: ...

    def prefetch_ahead(self, layer: int, expert_ids: list[int]) -> None: ...

    def use(self, layer: int, expert: int) -> ContextManager[Expert]: ...

    def resident_experts(self, layer: int, expert_ids: list[int]) -> list[Expert] | None: ...

    def settle(self) -> None: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def route_weights(logits: torch.Tensor, k: int, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [..., E] -> the top-k expert ids and their weights [..., K]: softmax over the
    top-k logits, or their sigmoids normalized to sum 1."""
    top, ids = logits.topk(k, dim=-1)  # [..., K]
    if softmax:
        return ids, top.softmax(dim=-1)
    weights = top.sigmoid()
    return ids, weights / weights.sum(dim=-1, keepdim=True)


class Router:
    """Top-k experts and their weights [T, K] from the pre-norm residual h [T, D]. `bias` [E],
    None here, is what a wrapper adds to the logits (`model.instrument.BiasedRouter`); the
    native layer adds it too."""

    bias: torch.Tensor | None = None

    def __init__(self, weight: torch.Tensor, k: int, softmax: bool):
        self.weight, self.k, self.softmax = weight, k, softmax  # weight [E, D]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.t()  # [T, E]

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route_weights(self.logits(h), self.k, self.softmax)


def visible_keys(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """mask [T, S]: query at qpos[t] sees the key at kpos[s] when 0 <= qpos - kpos (< window)."""
    delta = qpos[:, None] - kpos[None, :]  # [T, S]
    mask = delta >= 0
    return mask & (delta < window) if window is not None else mask


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, Hd] for NeoX-style RoPE over the full head dim."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [Hd/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, Hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, Hd]
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


class KVCache:
    """Keys and values of one layer: all positions for global layers, a ring of `window` for SWA."""

    def __init__(self, capacity: int, kv_heads: int, head_dim: int, window: int | None):
        self.window = window
        size = window if window is not None else capacity
        self.capacity = capacity
        self.k = torch.zeros(size, kv_heads, head_dim)  # [S_max, G, Hd]
        self.v = torch.zeros(size, kv_heads, head_dim)
        self.length = 0  # positions written so far

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def advance_one(self, pos0: int) -> tuple[int, int]:
        """Claim the slot of one new token at `pos0`: (slot, number of keys it then sees, slots
        0 .. n-1, itself included). The caller writes its key and value there."""
        if pos0 != self.length or pos0 >= self.capacity:
            raise ValueError(f"KV cache: write at {pos0}+1 but {self.length} written, capacity {self.capacity}")
        self.length += 1
        if self.window is None:
            return pos0, self.length
        return pos0 % self.window, min(self.length, self.window)

    def update(self, pos0: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v [T, G, Hd] at positions pos0..; return (keys, values, key positions) to attend.

        For a single new token every returned key is visible to it and the positions are None.
        """
        t = k.shape[0]
        if pos0 != self.length or pos0 + t > self.capacity:
            raise ValueError(f"KV cache: write at {pos0}+{t} but {self.length} written, capacity {self.capacity}")
        if self.window is None:
            self.k[pos0:pos0 + t] = k
            self.v[pos0:pos0 + t] = v
            self.length += t
            return self.k[:pos0 + t], self.v[:pos0 + t], None if t == 1 else torch.arange(pos0 + t)
        if t == 1:  # decode: write into the ring, attend to everything it holds (all in the window)
            slot, n = self.advance_one(pos0)
            self.k[slot], self.v[slot] = k[0], v[0]
            return self.k[:n], self.v[:n], None
        w = self.window
        old_pos = torch.arange(max(0, pos0 - w + 1), pos0)  # cached positions a new query can still see
        keys = torch.cat([self.k[old_pos % w], k])  # [S, G, Hd]
        values = torch.cat([self.v[old_pos % w], v])
        new_pos = torch.arange(pos0, pos0 + t)
        keep = new_pos[-w:]
        self.k[keep % w] = k[-w:]
        self.v[keep % w] = v[-w:]
        self.length += t
        return keys, values, torch.cat([old_pos, new_pos])


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [D]
    post_norm: torch.Tensor  # [D]
    router: torch.Tensor  # [E, D] fp32
    qkv: Matrix  # [(H + 2G)*Hd, D]: q_proj, k_proj, v_proj rows stacked, one product per step
    o: Matrix  # [D, H*Hd]

    @property
    def nbytes(self) -> int:
        norms = (self.input_norm.numel() + self.post_norm.numel() + self.router.numel()) * 4
        return norms + self.qkv.nbytes + self.o.nbytes


class Block:
    def __init__(self, index: int, cfg: ModelConfig, w: LayerWeights, fast: FastDecode | None = None):
        self.index, self.cfg, self.w, self.fast = index, cfg, w, fast
        self.next: Block | None = None  # the following layer (look-ahead prefetch)
        self.rope = cfg.uses_rope(index)
        self.window = cfg.sliding_window_size if cfg.uses_sliding_window(index) else None
        self.scale = cfg.head_dim ** -0.5
        self.router = Router(w.router, cfg.moe_num_active_primary_experts, cfg.moe_primary_router_apply_softmax)
        self.active_rows = self.expert_rows = 0  # sparse ReGLU: rows computed / rows an expert has

    def _count(self, active: int | None, tokens: int) -> None:
        if active is not None:
            self.active_rows += active
            self.expert_rows += tokens * self.cfg.moe_ffn_hidden_size

    def attention(self, x: torch.Tensor, pos0: int, cache: KVCache, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        H, G, Hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = self.w.qkv(x).split([H * Hd, G * Hd, G * Hd], dim=-1)
        q, k, v = q.view(t, H, Hd), k.view(t, G, Hd), v.view(t, G, Hd)  # [T, H|G, Hd]
        if self.rope:
            cos, sin = rope  # [T, 1, Hd]
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        keys, values, kpos = cache.update(pos0, k, v)  # [S, G, Hd], [S] or None
        if kpos is None:  # one query that sees every returned key: grouped matmuls, no mask
            qg = q.view(G, H // G, Hd)  # [G, H/G, Hd]
            scores = torch.bmm(qg, keys.permute(1, 2, 0)) * self.scale  # [G, H/G, S]
            out = torch.bmm(scores.softmax(dim=-1), values.transpose(0, 1))  # [G, H/G, Hd]
            return self.w.o(out.reshape(1, H * Hd))  # [1, D]
        mask = visible_keys(torch.arange(pos0, pos0 + t), kpos, self.window)  # [T, S]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),  # [H|G, T|S, Hd]
            attn_mask=mask, enable_gqa=True,
        )  # [H, T, Hd]
        return self.w.o(out.transpose(0, 1).reshape(t, H * Hd))  # [T, D]

    def moe(self, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertSource,
            id_list: list[int]) -> torch.Tensor:
        if y.shape[0] == 1:
            out = None
            weight_of = dict(zip(ids[0].tolist(), weights[0].tolist()))
            for e in id_list:
                with experts.use(self.index, e) as expert:
                    contrib, active = expert(y)
                self._count(active, 1)
                contrib.mul_(weight_of[e])
                out = contrib if out is None else out.add_(contrib)
            return out
        out = torch.zeros_like(y)  # [T, D]
        for e in id_list:
            rows, slot = (ids == e).nonzero(as_tuple=True)
            with experts.use(self.index, e) as expert:
                contrib, active = expert(y[rows])
            self._count(active, rows.numel())
            out.index_add_(0, rows, contrib * weights[rows, slot, None])
        return out

    def decode_fast(self, h: torch.Tensor, pos0: int, cache: KVCache, rope, experts: ExpertSource) -> torch.Tensor:
        """`forward` for one token through `self.fast`; h [1, D] is updated in place."""
        if self.fast.has_experts:  # every expert resident for good: nothing to fetch, one call
            slot, n_keys = cache.advance_one(pos0)
            id_list = self.fast.decode(h, cache.k, cache.v, slot, n_keys, rope if self.rope else None, self.router.bias)
            experts.prefetch(self.index, id_list)  # counts the lookups
            return h
        id_list, weights = self.fast.route(h, self.router.bias)  # router before attention ...
        ready_order = experts.prefetch(self.index, id_list)  # ... so the expert reads overlap it
        slot, n_keys = cache.advance_one(pos0)
        y = self.fast.attend(h, cache.k, cache.v, slot, n_keys, rope if self.rope else None)
        if experts.lookahead and self.next is not None and self.next.fast is not None:
            # the next layer's router on this residual: its likely experts, read while these compute
            experts.prefetch_ahead(self.next.index, self.next.fast.route(h, self.next.router.bias)[0])
        weight_of = dict(zip(id_list, weights))
        resident = experts.resident_experts(self.index, ready_order)
        if resident is not None and self.fast.moe(resident, [weight_of[e] for e in ready_order], h):
            return h
        for e in ready_order:
            with experts.use(self.index, e) as expert:
                self._count(expert.accumulate(y, weight_of[e], h), 1)
        return h

    def forward(self, h: torch.Tensor, pos0: int, cache: KVCache, rope, experts: ExpertSource) -> torch.Tensor:
        if self.fast is not None and h.shape[0] == 1:
            return self.decode_fast(h, pos0, cache, rope, experts)
        ids, weights = self.router(h)  # [T, K] each: the router before attention ...
        id_list = ids[0].tolist() if h.shape[0] == 1 else ids.unique().tolist()
        id_list = experts.prefetch(self.index, id_list)  # ... so the expert reads overlap it
        h = h + self.attention(rms_norm(h, self.w.input_norm, self.cfg.rms_norm_eps), pos0, cache, rope)
        y = rms_norm(h, self.w.post_norm, self.cfg.rms_norm_eps)
        if self.fast is not None and self.fast.has_experts:  # every expert resident: one native call
            return h.add_(self.fast.moe_batch(y, ids, weights))
        return h.add_(self.moe(y, ids, weights, experts, id_list))


class Transformer:
    """Embedding -> blocks -> final norm -> head; `forward` consumes tokens at the next positions."""

    def __init__(self, cfg: ModelConfig, embed_rows: Callable[[torch.Tensor], torch.Tensor], blocks: list[Block],
                 final_norm: torch.Tensor, head: Matrix, experts: ExpertSource):
        self.cfg, self.embed_rows, self.blocks = cfg, embed_rows, blocks
        self.final_norm, self.head, self.experts = final_norm, head, experts
        for block, following in zip(blocks, blocks[1:]):
            block.next = following
        self.caches: list[KVCache] = []
        self.pos = 0

    def setup_caches(self, max_seq_len: int) -> None:
        cfg = self.cfg
        self.caches = [KVCache(max_seq_len, cfg.num_key_value_heads, cfg.head_dim, b.window) for b in self.blocks]
        cos, sin = rope_tables(torch.arange(max_seq_len), cfg.head_dim, cfg.rope_theta)
        self.rope = (cos[:, None, :], sin[:, None, :])  # [S_max, 1, Hd]
        self.pos = 0

    def activity(self) -> tuple[int, int]:
        """(rows computed, rows the used experts have) summed over layers, for sparse ReGLU."""
        return sum(b.active_rows for b in self.blocks), sum(b.expert_rows for b in self.blocks)

    @staticmethod
    def kv_cache_bytes(cfg: ModelConfig, context_len: int) -> int:
        per_pos = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
        return sum(per_pos * (min(context_len, cfg.sliding_window_size) if cfg.uses_sliding_window(i) else context_len)
                   for i in range(cfg.num_hidden_layers))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """tokens [T] at positions pos..pos+T-1 -> logits [T, V] (or [1, V] for the last token)."""
        t, pos0 = tokens.shape[0], self.pos
        h = self.embed_rows(tokens)  # [T, D]
        rope = (self.rope[0][pos0:pos0 + t], self.rope[1][pos0:pos0 + t])
        try:
            for block, cache in zip(self.blocks, self.caches):
                h = block.forward(h, pos0, cache, rope, self.experts)
        finally:
            self.experts.settle()
        self.pos += t
        if not all_logits:
            h = h[-1:]
        return self.head(rms_norm(h, self.final_norm, self.cfg.rms_norm_eps))  # [T, V]
