"""Benchmark instrumentation: wrappers around a layer's router and the expert source.

Rule: the forward pass never holds benchmark state. `BiasedRouter` wraps a layer's router and
adds fixed offsets to its logits (the native layer adds the same offsets, as the router's
`bias`); `ExpertUseLog` wraps the transformer's expert source and records the experts each
layer's router looks up. Neither changes which experts run beyond what the offsets change, and
with no wrapper installed (the default) a layer runs exactly as without this module.
"""
from __future__ import annotations

import torch

from model.model import ExpertSource, Router, Transformer


class BiasedRouter(Router):
    """A router whose logits get per-expert offsets `bias` [E]: a stand-in for a trained model's
    hot experts (`model.bench.zipf_router_bias`)."""

    def __init__(self, router: Router, bias: torch.Tensor):
        super().__init__(router.weight, router.k, router.softmax)
        self.inner, self.bias = router, bias

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(h) + self.bias  # [T, E]


class ExpertUseLog:
    """The expert source it wraps, recording the experts each layer's router looked up (`used`:
    one set per layer). Every lookup goes through `prefetch`, so nothing else is wrapped."""

    def __init__(self, source: ExpertSource, layers: int):
        self.source = source
        self.used: list[set[int]] = [set() for _ in range(layers)]

    def prefetch(self, layer: int, expert_ids: list[int]) -> list[int]:
        self.used[layer].update(expert_ids)
        return self.source.prefetch(layer, expert_ids)

    def __getattr__(self, name: str):
        return getattr(self.source, name)


def set_router_bias(transformer: Transformer, biases: list[torch.Tensor] | None) -> None:
    """Add per-layer offsets [E] to the router logits (None: back to the plain routers)."""
    for i, block in enumerate(transformer.blocks):
        plain = block.router.inner if isinstance(block.router, BiasedRouter) else block.router
        block.router = plain if biases is None else BiasedRouter(plain, biases[i])


def track_expert_use(transformer: Transformer) -> list[set[int]]:
    """Start recording which experts each layer uses; returns the live per-layer sets."""
    source = transformer.experts
    if isinstance(source, ExpertUseLog):
        source = source.source
    log = ExpertUseLog(source, len(transformer.blocks))
    transformer.experts = log
    return log.used
