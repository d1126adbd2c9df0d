"""The public face of the inference library: load a package, get logits, generate tokens.

Rule: nothing runs from a package before its manifest parsed and every shard it loads passed its
size and sha256 check; every call records its figures in `last_stats`.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from model.config import ModelConfig
from model.errors import BudgetError, ConfigError, PackageError
from model.expert_store import ExpertStore, StorageSim
from model.kernels import backend
from model.matrices import EmbeddingRows, make_matrix
from model.memory import format_size, peak_rss_bytes, reset_peak_rss
from model.model import Block, LayerWeights, Transformer
from model.package import (
    EMBED_SHARD, EMBED_TENSOR, HEAD_SHARD, LM_HEAD_TENSOR, NORM_TENSOR, layer_shard, layer_tensor_names,
    load_shard, read_manifest,
)
from model.sampling import sample
from model.tokenizer import load_tokenizer


DEFAULT_MAX_CONTEXT = 4096


class Engine:
    def __init__(self, package_dir: Path, manifest, cfg: ModelConfig, transformer: Transformer, tokenizer,
                 dense_bytes: int, memory_budget_bytes: int | None):
        self.package_dir, self.manifest, self.config = package_dir, manifest, cfg
        self.transformer, self.tokenizer = transformer, tokenizer
        self.dense_bytes = dense_bytes
        self.memory_budget_bytes = memory_budget_bytes
        self.last_stats: dict = {}

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, package_dir: str | Path, *, memory_budget_bytes: int | None = None, threads: int | None = None,
             kernel: str | None = None, prefetch: bool = True, policy: str = "lru",
             storage: StorageSim | None = None, max_context: int = DEFAULT_MAX_CONTEXT, progress=None) -> Engine:
        """Load a verified package.

        `memory_budget_bytes` covers dense weights + expert cache + a KV cache of `max_context`
        tokens; None keeps every expert resident. `progress()` is called as dense shards load.
        """
        if threads is not None:
            if threads < 1:
                raise ConfigError("threads must be >= 1")
            torch.set_num_threads(threads)
        package_dir = Path(package_dir)
        manifest = read_manifest(package_dir)
        cfg = ModelConfig.from_hf_dict(manifest.config)
        if manifest.quant == "q4_0":
            cfg.check_quantizable()
        kernel = kernel or (backend() if manifest.quant == "q4_0" else None)
        tick = progress or (lambda: None)

        def dense(name: str) -> dict[str, torch.Tensor]:
            try:
                entry = manifest.shard(name)
            except Exception:
                raise PackageError(f"{package_dir}: manifest lists no shard {name!r}") from None
            tensors = load_shard(package_dir, entry)
            tick()
            return tensors

        def pick(tensors: dict, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
            if name not in tensors:
                raise PackageError(f"{package_dir}: tensor {name} missing")
            t = tensors[name]
            if shape is not None and tuple(t.shape) != shape:
                raise PackageError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
            return t

        def stored(tensors: dict, name: str, out_f: int, in_f: int) -> torch.Tensor:
            t = pick(tensors, name)
            expected = (out_f, in_f // 32 * 18) if manifest.quant == "q4_0" else (out_f, in_f)
            if tuple(t.shape) != expected:
                raise PackageError(f"{name}: shape {tuple(t.shape)}, expected {expected}")
            return t

        def mat(tensors: dict, name: str, out_f: int, in_f: int):
            return make_matrix(stored(tensors, name, out_f, in_f), manifest.quant, name, kernel)

        D, E = cfg.hidden_size, cfg.moe_num_primary_experts
        embed_t = dense(EMBED_SHARD)
        embed_table = pick(embed_t, EMBED_TENSOR)
        embed_rows = EmbeddingRows(embed_table, manifest.quant)
        head_t = dense(HEAD_SHARD)
        final_norm = pick(head_t, NORM_TENSOR, (D,)).to(torch.float32)
        tied = cfg.tie_word_embeddings or LM_HEAD_TENSOR not in head_t
        head = mat(embed_t, EMBED_TENSOR, cfg.vocab_size, D) if tied else mat(head_t, LM_HEAD_TENSOR, cfg.vocab_size, D)
        head_shares_embedding = tied and manifest.quant == "q4_0" and kernel in ("c", "reference")
        blocks = []
        for i in range(cfg.num_hidden_layers):
            t = dense(layer_shard(i))
            n = layer_tensor_names(i)
            w = LayerWeights(
                input_norm=pick(t, n["input_layernorm"], (D,)).to(torch.float32),
                post_norm=pick(t, n["post_attention_layernorm"], (D,)).to(torch.float32),
                router=pick(t, n["router"], (E, D)).to(torch.float32),
                qkv=make_matrix(torch.cat([stored(t, n["q_proj"], cfg.q_dim, D), stored(t, n["k_proj"], cfg.kv_dim, D),
                                           stored(t, n["v_proj"], cfg.kv_dim, D)]), manifest.quant, n["q_proj"], kernel),
                o=mat(t, n["o_proj"], D, cfg.q_dim),
            )
            blocks.append(Block(i, cfg, w))
        dense_bytes = embed_rows.nbytes + final_norm.numel() * 4 + sum(b.w.nbytes for b in blocks)
        if not head_shares_embedding:
            dense_bytes += head.nbytes
        expert_budget = None
        if memory_budget_bytes is not None:
            kv = Transformer.kv_cache_bytes(cfg, max_context)
            expert_budget = memory_budget_bytes - dense_bytes - kv
            if expert_budget <= 0:
                raise BudgetError(
                    f"memory budget {format_size(memory_budget_bytes)} is below the {format_size(dense_bytes + kv)} "
                    f"that dense weights ({format_size(dense_bytes)}) and a {max_context}-token KV cache need"
                )
        experts = ExpertStore(package_dir, manifest, cfg, budget_bytes=expert_budget, kernel=kernel,
                              policy=policy, prefetch=prefetch, storage=storage)
        transformer = Transformer(cfg, embed_rows, blocks, final_norm, head, experts)
        tokenizer = load_tokenizer(package_dir, manifest.tokenizer)
        engine = cls(package_dir, manifest, cfg, transformer, tokenizer, dense_bytes, memory_budget_bytes)
        engine.max_context = max_context if memory_budget_bytes is not None else None
        engine.kernel = kernel or "dense"
        return engine

    # ---- figures ---------------------------------------------------------------------------
    def kv_cache_bytes(self, context_len: int) -> int:
        """Bytes of KV cache a context of this many tokens costs (SWA layers cap at their window)."""
        return Transformer.kv_cache_bytes(self.config, context_len)

    @property
    def weight_bytes(self) -> int:
        return self.dense_bytes + self.transformer.experts.nbytes

    # ---- instrumentation (benchmarks) --------------------------------------------------------
    def set_router_bias(self, biases: list[torch.Tensor] | None) -> None:
        """Add per-layer offsets [E] to the router logits (benchmarks' stand-in for hot experts)."""
        for i, block in enumerate(self.transformer.blocks):
            block.router_bias = None if biases is None else biases[i]

    def track_expert_use(self) -> list[set]:
        """Start recording which experts each layer uses; returns the live per-layer sets."""
        used: list[set] = [set() for _ in self.transformer.blocks]
        for block, s in zip(self.transformer.blocks, used):
            block.expert_log = s
        return used

    # ---- inference -------------------------------------------------------------------------
    def _check_ids(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ConfigError("token_ids must be a non-empty list of ints")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ConfigError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids

    def _check_context(self, n: int) -> None:
        if self.max_context is not None and n > self.max_context:
            raise ConfigError(f"{n} tokens exceed the {self.max_context}-token context the memory budget reserved")

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """One fresh prefill: logits [len(token_ids), vocab] float32."""
        ids = self._check_ids(token_ids)
        self._check_context(ids.numel())
        self.transformer.setup_caches(ids.numel())
        start = time.perf_counter()
        out = self.transformer.forward(ids, all_logits=True)
        self.last_stats = {"prompt_tokens": ids.numel(), "prefill_ms": (time.perf_counter() - start) * 1e3,
                           **self.transformer.experts.stats()}
        return out.to(torch.float32)

    def generate(self, token_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, top_p: float = 1.0, stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Yield up to max_new_tokens ids (stops after yielding a stop id); KV cache reused across steps."""
        ids = self._check_ids(token_ids)
        if max_new_tokens < 0:
            raise ConfigError("max_new_tokens must be >= 0")
        self._check_context(ids.numel() + max_new_tokens)
        return self._generate(ids, max_new_tokens, temperature, seed, top_p, frozenset(stop_ids))

    def _generate(self, ids, max_new_tokens, temperature, seed, top_p, stop_ids) -> Iterator[int]:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        tf = self.transformer
        tf.setup_caches(ids.numel() + max_new_tokens)
        counters0 = tf.experts.stats()
        reset_peak_rss()
        stats = {"prompt_tokens": ids.numel(), "completion_tokens": 0, "prefill_ms": 0.0, "decode_ms": 0.0}
        self.last_stats = stats
        decode_s, steps = 0.0, 0
        try:
            if max_new_tokens == 0:
                return
            start = time.perf_counter()
            logits = tf.forward(ids)[-1]
            stats["prefill_ms"] = (time.perf_counter() - start) * 1e3
            while True:
                token = sample(logits, temperature, top_p, gen)
                stats["completion_tokens"] += 1
                yield token
                if token in stop_ids or stats["completion_tokens"] >= max_new_tokens:
                    return
                start = time.perf_counter()
                logits = tf.forward(torch.tensor([token]))[-1]
                decode_s += time.perf_counter() - start
                steps += 1
        finally:
            stats["decode_ms"] = decode_s * 1e3
            stats["decode_tokens_per_s"] = steps / decode_s if decode_s > 0 else 0.0
            stats["prefill_tokens_per_s"] = ids.numel() / (stats["prefill_ms"] / 1e3) if stats["prefill_ms"] else 0.0
            stats["peak_rss_bytes"] = peak_rss_bytes()
            counters = tf.experts.stats()
            stats.update({k: counters[k] - counters0.get(k, 0) for k in counters})
