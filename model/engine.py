"""The public face of the inference library: load a package, get logits, generate tokens.

Rule: nothing runs from a package before its manifest parsed and every shard it loads passed its
size and sha256 check; token ids are checked in Python before they reach torch (ints, not bools,
inside the vocabulary; InputError otherwise, so an id past int64 never overflows a tensor);
every call records its figures in `last_stats`.
"""
from __future__ import annotations

import operator
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from model.config import ModelConfig
from model.errors import ConfigError, InputError
from model.expert_store import StoreOptions
from model.kernels import backend
from model.loader import load_transformer
from model.memory import peak_rss_bytes, reset_peak_rss
from model.model import Transformer
from model.package import read_manifest
from model.sampling import sample
from model.tokenizer import load_tokenizer

DEFAULT_MAX_CONTEXT = 4096


def _token_id(value) -> int:
    """`value` as a token id: ints and integer scalars (numpy, 0-d tensors); TypeError for bools and floats."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a token id")
    return operator.index(value)


class Engine:
    def __init__(self, package_dir: Path, manifest, cfg: ModelConfig, transformer: Transformer, tokenizer,
                 dense_bytes: int, memory_budget_bytes: int | None, max_context: int | None, kernel: str):
        self.package_dir, self.manifest, self.config = package_dir, manifest, cfg
        self.transformer, self.tokenizer = transformer, tokenizer
        self.dense_bytes = dense_bytes
        self.memory_budget_bytes = memory_budget_bytes
        self.max_context = max_context  # a budget reserves KV for this many tokens; None = no limit
        self.kernel = kernel
        self.last_stats: dict = {}

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, package_dir: str | Path, *, memory_budget_bytes: int | None = None, threads: int | None = None,
             kernel: str | None = None, max_context: int = DEFAULT_MAX_CONTEXT, progress=None,
             **store_options) -> Engine:
        """Load a verified package.

        `memory_budget_bytes` covers dense weights + expert cache + a KV cache of `max_context`
        tokens; None keeps every expert resident. The runtime itself is outside the budget: ~220 MB
        RSS before a package loads (interpreter, torch, kernels), ~15 MB more of code the first
        forward pass touches (tests/test_memory_budget.py). `store_options` are the expert store's
        (`model.expert_store.StoreOptions`: `policy`, `prefetch`, `lookahead`, `packed_cache_dir`,
        `storage`). `progress()` is called as dense shards load.
        """
        store = StoreOptions(**store_options)
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
        loaded = load_transformer(package_dir, manifest, cfg, kernel=kernel, memory_budget_bytes=memory_budget_bytes,
                                  max_context=max_context, store=store, progress=progress)
        tokenizer = load_tokenizer(package_dir, manifest.tokenizer)
        return cls(package_dir, manifest, cfg, loaded.transformer, tokenizer, loaded.dense_bytes, memory_budget_bytes,
                   max_context if memory_budget_bytes is not None else None, kernel or "dense")

    def close(self) -> None:
        """Stop the expert store's background reader threads, so the engine can be freed;
        idempotent. Should it run again, its expert reads happen in the calling thread."""
        self.transformer.experts.close()

    # ---- figures ---------------------------------------------------------------------------
    def kv_cache_bytes(self, context_len: int) -> int:
        """Bytes of KV cache a context of this many tokens costs (SWA layers cap at their window)."""
        return Transformer.kv_cache_bytes(self.config, context_len)

    @property
    def weight_bytes(self) -> int:
        return self.dense_bytes + self.transformer.experts.nbytes

    # ---- inference -------------------------------------------------------------------------
    def _check_ids(self, token_ids: Sequence[int]) -> torch.Tensor:
        vocab = self.config.vocab_size
        try:
            ids = [_token_id(i) for i in token_ids]
        except TypeError:
            raise InputError("token_ids must be a non-empty list of ints") from None
        if not ids:
            raise InputError("token_ids must be a non-empty list of ints")
        outside = next((i for i in ids if not 0 <= i < vocab), None)
        if outside is not None:
            raise InputError(f"token id {outside} is outside the vocabulary: ids must lie in [0, {vocab})")
        return torch.tensor(ids, dtype=torch.long)

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
        activity0 = tf.activity()
        reset_peak_rss()
        stats = {"prompt_tokens": ids.numel(), "completion_tokens": 0, "prefill_ms": 0.0, "decode_ms": 0.0}
        self.last_stats = stats
        decode_s, steps, decode_reads0 = 0.0, 0, 0.0
        try:
            if max_new_tokens == 0:
                return
            start = time.perf_counter()
            logits = tf.forward(ids)[-1]
            stats["prefill_ms"] = (time.perf_counter() - start) * 1e3
            decode_reads0 = tf.experts.read_seconds
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
            # time spent reading experts while decoding (in the reader thread too, when prefetching)
            stats["decode_read_ms"] = (tf.experts.read_seconds - decode_reads0) * 1e3 if steps else 0.0
            stats["decode_tokens_per_s"] = steps / decode_s if decode_s > 0 else 0.0
            stats["prefill_tokens_per_s"] = ids.numel() / (stats["prefill_ms"] / 1e3) if stats["prefill_ms"] else 0.0
            stats["peak_rss_bytes"] = peak_rss_bytes()
            counters = tf.experts.stats()
            stats.update({k: counters[k] - counters0.get(k, 0) for k in counters})
            (active, rows), (active0, rows0) = tf.activity(), activity0
            stats["activation_sparsity"] = 1 - (active - active0) / (rows - rows0) if rows > rows0 else None
