"""Decode and prefill speed, memory and expert-cache figures for one configuration.

Rule: figures are measured, never asserted; each run states what it ran on (CPU, threads,
kernel backend, budget, storage simulation) next to the numbers.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from model.engine import Engine
from model.expert_store import StorageSim
from model.instrument import set_router_bias, track_expert_use
from model.kernels import describe
from model.memory import peak_rss_bytes


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def zipf_router_bias(experts: int, layers: int, skew: float, seed: int = 0) -> list[torch.Tensor]:
    """Per-layer router logit offsets log(1/rank^skew): a stand-in for a trained model's hot experts.

    Each layer gets its own random ranking; skew 0 means no bias.
    """
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, experts + 1, dtype=torch.float32)
    return [(-skew * ranks.log())[torch.randperm(experts, generator=gen)] for _ in range(layers)]


def run_bench(package: str | Path, *, memory_budget_bytes: int | None = None, prefetch: bool = True,
              lookahead: bool = True,
              storage_mbps: float | None = None, storage_latency_us: float = 0.0, threads: int | None = None,
              tokens: int = 64, prompt_tokens: int = 32, policy: str = "lru", router_skew: float = 0.0,
              max_context: int | None = None, seed: int = 0) -> dict:
    storage = StorageSim(storage_mbps, storage_latency_us) if storage_mbps else None
    kw = {"max_context": max_context} if max_context else {"max_context": prompt_tokens + tokens + 1}
    started = time.perf_counter()
    engine = Engine.load(package, memory_budget_bytes=memory_budget_bytes, threads=threads, prefetch=prefetch,
                         lookahead=lookahead, policy=policy, storage=storage, **kw)
    load_s = time.perf_counter() - started
    cfg = engine.config
    if router_skew:
        set_router_bias(engine.transformer,
                        zipf_router_bias(cfg.moe_num_primary_experts, cfg.num_hidden_layers, router_skew, seed))
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, min(cfg.vocab_size, 256), (prompt_tokens,), generator=gen).tolist()
    store = engine.transformer.experts
    used = track_expert_use(engine.transformer)
    out = list(engine.generate(prompt, tokens, temperature=0.8, seed=seed))
    stats = dict(engine.last_stats)
    decode_steps = max(len(out) - 1, 1)
    per_layer = [len(s) for s in used]
    return {
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "kernel": engine.kernel, "kernel_path": describe()},
        "package": str(package),
        "model": f"{engine.manifest.name} {engine.manifest.version}",
        "memory_budget_bytes": memory_budget_bytes,
        "expert_slots": store.capacity,
        "experts_total": cfg.num_hidden_layers * cfg.moe_num_primary_experts,
        "prefetch": prefetch,
        "lookahead": store.lookahead,
        "lookahead_reads": store.lookahead_reads,
        "lookahead_hits": store.lookahead_hits,
        "lookahead_paused": store.lookahead_paused,
        "lookahead_paused_layers": sorted(store.lookahead_paused_layers),
        "policy": policy,
        "storage": {"simulated": True, "mbps": storage_mbps, "latency_us": storage_latency_us,
                    "label": "simulated eMMC/SATA SSD"} if storage else {"simulated": False},
        "router_skew": router_skew,
        "load_s": round(load_s, 3),
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["completion_tokens"],
        "prefill_tokens_per_s": stats["prefill_tokens_per_s"],
        "decode_tokens_per_s": stats["decode_tokens_per_s"],
        "decode_ms_per_token": stats["decode_ms"] / decode_steps,
        "read_ms_per_token": stats["decode_read_ms"] / decode_steps,
        "peak_rss_bytes": stats["peak_rss_bytes"],
        "process_peak_rss_bytes": peak_rss_bytes(),
        "dense_bytes": engine.dense_bytes,
        "expert_cache_bytes": store.nbytes,
        "kv_cache_bytes": engine.kv_cache_bytes(stats["prompt_tokens"] + stats["completion_tokens"]),
        "expert_cache_hits": stats["expert_cache_hits"],
        "expert_cache_misses": stats["expert_cache_misses"],
        "prefetch_hits": stats["prefetch_hits"],
        "bytes_read": stats["bytes_read"],
        "sparse_reglu": store.sparse,
        "activation_sparsity": stats["activation_sparsity"],
        "distinct_experts_per_layer": {"min": min(per_layer), "median": statistics.median(per_layer),
                                       "max": max(per_layer)},
    }
