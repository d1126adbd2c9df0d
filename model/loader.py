"""Assemble a runnable Transformer from a model package.

Rules:
- every tensor comes from a shard that passed its size and sha256 check and has exactly the shape
  the config implies;
- a shard is read once, straight into the buffers its tensors live in (q, k and v into their rows
  of the fused qkv): no copy of the file, no concatenation, so loading never holds a weight twice;
- the token-embedding table stays on disk (rows are read per token, see `model.matrices`) unless
  the head multiplies with that very table; `dense_bytes` counts what stays resident;
- the memory budget is split here (dense weights + KV reserve first, the rest to expert slots) and
  refused with the numbers when it cannot hold the minimum.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from manifests import ManifestError, ModelManifest
from model.config import ModelConfig
from model.errors import BudgetError, PackageError
from model.expert_store import ExpertStore, StoreOptions
from model.kernels.layer import native_layer
from model.matrices import EmbeddingRows, EmbeddingRowsOnDisk, head_keeps_stored_table, make_matrix
from model.memory import format_size
from model.model import Block, LayerWeights, Transformer
from model.package import (
    EMBED_SHARD, EMBED_TENSOR, HEAD_SHARD, LM_HEAD_TENSOR, NORM_TENSOR, ShardFile, layer_shard, layer_tensor_names,
    tensor_buffer, torch_dtype,
)
from model.quant import q4_0_row_bytes


@dataclass
class Loaded:
    transformer: Transformer
    dense_bytes: int


class _ShardRead:
    """The tensors wanted from one shard: each checked against the config's shape and given a
    buffer as stored; `read()` fills them all in one verified pass over the file."""

    def __init__(self, package_dir: Path, manifest: ModelManifest, name: str):
        try:
            entry = manifest.shard(name)
        except ManifestError:
            raise PackageError(f"{package_dir}: manifest lists no shard {name!r}") from None
        self.shard, self.quant = ShardFile(package_dir, entry), manifest.quant
        self.buffers: dict[str, torch.Tensor] = {}
        self.kept_open = False

    def __enter__(self) -> _ShardRead:
        return self

    def __exit__(self, *exc) -> None:
        if not self.kept_open:
            self.shard.close()

    def keep_open(self) -> ShardFile:
        """The verified shard, left open past the `with` block (for reads after load)."""
        self.kept_open = True
        self.shard.advise_random()  # single rows from now on
        return self.shard

    def has(self, name: str) -> bool:
        return name in self.shard.tensors

    def _require(self, name: str, shape: tuple[int, ...]) -> None:
        """A missing or misshapen tensor is named only once the file's hash holds (else that is the error)."""
        stored = self.shard.tensors.get(name)
        problem = (f"tensor {name} missing" if stored is None
                   else f"{name}: shape {stored.shape}, expected {shape}" if stored.shape != shape else None)
        if problem:
            self.shard.check_sha256()
            raise PackageError(f"{self.shard.file}: {problem}")

    def vector(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A norm or router weight, as stored (`_as_float` once read)."""
        self._require(name, shape)
        self.buffers[name] = torch.empty(shape, dtype=torch_dtype(self.shard, name))
        return self.buffers[name]

    def matrix(self, names: list[str], out_fs: list[int], in_f: int) -> torch.Tensor:
        """One matrix [sum(out_fs), in] as stored (Q4_0 blocks or a dense dtype) from one or more
        tensors stacked by rows (q, k, v -> qkv: one product per step)."""
        cols = q4_0_row_bytes(in_f) if self.quant == "q4_0" else in_f
        for name, out_f in zip(names, out_fs):
            self._require(name, (out_f, cols))
        dtypes = {torch_dtype(self.shard, name) for name in names}
        if len(dtypes) > 1:
            raise PackageError(f"{self.shard.file}: {', '.join(names)} are stored in different dtypes")
        stacked = torch.empty(sum(out_fs), cols, dtype=dtypes.pop())
        for name, rows in zip(names, stacked.split(out_fs)):
            self.buffers[name] = rows
        return stacked

    def read(self) -> None:
        self.shard.read_into({name: tensor_buffer(t) for name, t in self.buffers.items()})
        self.shard.drop_cached()


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)  # no copy when stored as float32, as the builder writes norms and routers


def load_transformer(package_dir: Path, manifest: ModelManifest, cfg: ModelConfig, *, kernel: str | None,
                     memory_budget_bytes: int | None, max_context: int, store: StoreOptions,
                     progress=None) -> Loaded:
    tick = progress or (lambda: None)
    D, E, V, quant = cfg.hidden_size, cfg.moe_num_primary_experts, cfg.vocab_size, manifest.quant

    def matrix(stored: torch.Tensor, name: str):  # read for this load alone: repacked in its own memory
        return make_matrix(stored, quant, name, kernel, in_place=True)

    with _ShardRead(package_dir, manifest, HEAD_SHARD) as r:
        final_norm = r.vector(NORM_TENSOR, (D,))
        tied = cfg.tie_word_embeddings or not r.has(LM_HEAD_TENSOR)
        lm_head = None if tied else r.matrix([LM_HEAD_TENSOR], [V], D)
        r.read()
    tick()
    final_norm = _as_float(final_norm)
    head_is_table = tied and head_keeps_stored_table(quant, kernel)
    with _ShardRead(package_dir, manifest, EMBED_SHARD) as r:
        table = r.matrix([EMBED_TENSOR], [V], D) if tied else None
        r.read()  # without a buffer for the table (untied head) the shard is only streamed through sha256
        head = matrix(table if tied else lm_head, EMBED_TENSOR if tied else LM_HEAD_TENSOR)
        # the table stays resident only as the head itself; otherwise rows come from the open shard
        embed_rows = EmbeddingRows(head, quant) if head_is_table else EmbeddingRowsOnDisk(r.keep_open(), EMBED_TENSOR, quant)
    del table, lm_head  # a table read for a repacking head, or an lm_head the head copied, is freed now
    tick()
    blocks = []
    for i in range(cfg.num_hidden_layers):
        n = layer_tensor_names(i)
        with _ShardRead(package_dir, manifest, layer_shard(i)) as r:
            input_norm = r.vector(n["input_layernorm"], (D,))
            post_norm = r.vector(n["post_attention_layernorm"], (D,))
            router = r.vector(n["router"], (E, D))
            qkv = r.matrix([n["q_proj"], n["k_proj"], n["v_proj"]], [cfg.q_dim, cfg.kv_dim, cfg.kv_dim], D)
            o = r.matrix([n["o_proj"]], [D], cfg.q_dim)
            r.read()
        weights = LayerWeights(
            input_norm=_as_float(input_norm), post_norm=_as_float(post_norm), router=_as_float(router),
            qkv=matrix(qkv, n["q_proj"]), o=matrix(o, n["o_proj"]),
        )
        blocks.append(Block(i, cfg, weights, native_layer(cfg, weights)))
        tick()
    dense_bytes = embed_rows.nbytes + final_norm.numel() * 4 + sum(b.w.nbytes for b in blocks)
    dense_bytes += 0 if head_is_table else head.nbytes
    experts = ExpertStore(package_dir, manifest, cfg, kernel=kernel, options=store)
    expert_budget = None
    if memory_budget_bytes is not None:
        kv = Transformer.kv_cache_bytes(cfg, max_context)
        minimum = dense_bytes + kv + cfg.moe_num_active_primary_experts * experts.slot_bytes
        if memory_budget_bytes < minimum:
            raise BudgetError(
                f"memory budget {format_size(memory_budget_bytes)} is below the minimum {format_size(minimum)}: "
                f"dense weights {format_size(dense_bytes)} + {max_context}-token KV cache {format_size(kv)} + "
                f"{cfg.moe_num_active_primary_experts} experts"
            )
        expert_budget = memory_budget_bytes - dense_bytes - kv
    experts.allocate(expert_budget)
    for block in blocks:  # with every expert resident for good, a layer decodes in one native call
        resident = experts.resident_experts(block.index, list(range(E)))
        if block.fast is not None and resident is not None:
            block.fast.bind_experts(resident)
    return Loaded(Transformer(cfg, embed_rows, blocks, final_norm, head, experts), dense_bytes)
