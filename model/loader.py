"""Assemble a runnable Transformer from a model package.

Rule: every tensor comes from a shard that passed its size and sha256 check and has exactly the
shape the config implies; the memory budget is split here (dense weights + KV reserve first, the
rest to expert slots) and refused with the numbers when it cannot hold the minimum.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from manifests import ManifestError, ModelManifest
from model.config import ModelConfig
from model.errors import BudgetError, PackageError
from model.expert_store import ExpertStore, StorageSim, expert_bytes
from model.kernels.layer import native_layer
from model.matrices import EmbeddingRows, make_matrix
from model.memory import format_size
from model.model import Block, LayerWeights, Transformer
from model.package import (
    EMBED_SHARD, EMBED_TENSOR, HEAD_SHARD, LM_HEAD_TENSOR, NORM_TENSOR, layer_shard, layer_tensor_names, load_shard,
)


@dataclass
class Loaded:
    transformer: Transformer
    dense_bytes: int


class _Shards:
    """Verified tensors of one package, checked for presence and shape on the way out."""

    def __init__(self, package_dir: Path, manifest: ModelManifest, kernel: str | None, progress):
        self.dir, self.manifest, self.kernel, self.tick = package_dir, manifest, kernel, progress or (lambda: None)

    def load(self, name: str) -> dict[str, torch.Tensor]:
        try:
            entry = self.manifest.shard(name)
        except ManifestError:
            raise PackageError(f"{self.dir}: manifest lists no shard {name!r}") from None
        tensors = load_shard(self.dir, entry)
        self.tick()
        return tensors

    def vector(self, tensors: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in tensors:
            raise PackageError(f"{self.dir}: tensor {name} missing")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise PackageError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
        return t.to(torch.float32)

    def stored(self, tensors: dict, name: str, out_f: int, in_f: int) -> torch.Tensor:
        """A matrix [out, in] as stored: Q4_0 blocks [out, in/32*18] or a dense tensor."""
        if name not in tensors:
            raise PackageError(f"{self.dir}: tensor {name} missing")
        t = tensors[name]
        expected = (out_f, in_f // 32 * 18) if self.manifest.quant == "q4_0" else (out_f, in_f)
        if tuple(t.shape) != expected:
            raise PackageError(f"{name}: shape {tuple(t.shape)}, expected {expected}")
        return t

    def matrix(self, tensors: dict, names: list[str], out_fs: list[int], in_f: int):
        """One matrix from one or more stacked tensors (q, k, v -> qkv: one product per step)."""
        parts = [self.stored(tensors, n, o, in_f) for n, o in zip(names, out_fs)]
        return make_matrix(parts[0] if len(parts) == 1 else torch.cat(parts), self.manifest.quant, names[0], self.kernel)


def load_transformer(package_dir: Path, manifest: ModelManifest, cfg: ModelConfig, *, kernel: str | None,
                     memory_budget_bytes: int | None, max_context: int, prefetch: bool, policy: str,
                     storage: StorageSim | None, progress=None) -> Loaded:
    shards = _Shards(package_dir, manifest, kernel, progress)
    D, E = cfg.hidden_size, cfg.moe_num_primary_experts
    embed_t = shards.load(EMBED_SHARD)
    embed_rows = EmbeddingRows(shards.stored(embed_t, EMBED_TENSOR, cfg.vocab_size, D), manifest.quant)
    head_t = shards.load(HEAD_SHARD)
    final_norm = shards.vector(head_t, NORM_TENSOR, (D,))
    tied = cfg.tie_word_embeddings or LM_HEAD_TENSOR not in head_t
    head = shards.matrix(embed_t if tied else head_t, [EMBED_TENSOR if tied else LM_HEAD_TENSOR], [cfg.vocab_size], D)
    blocks = []
    for i in range(cfg.num_hidden_layers):
        t, n = shards.load(layer_shard(i)), layer_tensor_names(i)
        weights = LayerWeights(
            input_norm=shards.vector(t, n["input_layernorm"], (D,)),
            post_norm=shards.vector(t, n["post_attention_layernorm"], (D,)),
            router=shards.vector(t, n["router"], (E, D)),
            qkv=shards.matrix(t, [n["q_proj"], n["k_proj"], n["v_proj"]], [cfg.q_dim, cfg.kv_dim, cfg.kv_dim], D),
            o=shards.matrix(t, [n["o_proj"]], [D], cfg.q_dim),
        )
        blocks.append(Block(i, cfg, weights, native_layer(cfg, weights)))
    head_shares_embedding = tied and manifest.quant == "q4_0" and kernel in ("c", "reference")
    dense_bytes = embed_rows.nbytes + final_norm.numel() * 4 + sum(b.w.nbytes for b in blocks)
    dense_bytes += 0 if head_shares_embedding else head.nbytes
    expert_budget = None
    if memory_budget_bytes is not None:
        kv = Transformer.kv_cache_bytes(cfg, max_context)
        minimum = dense_bytes + kv + cfg.moe_num_active_primary_experts * expert_bytes(cfg, manifest.quant)
        if memory_budget_bytes < minimum:
            raise BudgetError(
                f"memory budget {format_size(memory_budget_bytes)} is below the minimum {format_size(minimum)}: "
                f"dense weights {format_size(dense_bytes)} + {max_context}-token KV cache {format_size(kv)} + "
                f"{cfg.moe_num_active_primary_experts} experts"
            )
        expert_budget = memory_budget_bytes - dense_bytes - kv
    experts = ExpertStore(package_dir, manifest, cfg, budget_bytes=expert_budget, kernel=kernel,
                          policy=policy, prefetch=prefetch, storage=storage)
    return Loaded(Transformer(cfg, embed_rows, blocks, final_norm, head, experts), dense_bytes)
