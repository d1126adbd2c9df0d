"""Shared fixtures: tiny HF checkpoints written by the tests, built into packages once per session.

`zoo` builds lazily (a test file run alone builds only what it uses) and caches checkpoints,
packages, engines and the package weights read back without the engine.

Specs (all >= 8 layers; SmallThinker field names in `hf_fixtures.tiny_config`):
- generic weights (every sub-layer as large as the residual; the router reads everything): used
  with exact kernels, where any deviation from DESIGN.md's forward pass shows far above rounding;
- "conditioned" weights (sub-layers at 0.3 of the residual, routing decided mostly by the token):
  used with the fast kernels, whose activation rounding must not flip a near-tie top-k choice
  (a flip would swap an expert and say nothing about the kernel).
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The test models are tiny: one thread is fastest, and on a loaded 2-core machine OpenMP threads
# spinning against each other make every call 5-10x slower. Correctness does not depend on it
# (test_quant checks the kernels give the same result on 1 and 2 threads). ST_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("ST_TEST_THREADS", "1")))

from hf_fixtures import random_weights, tiny_config, write_checkpoint  # noqa: E402


@dataclass(frozen=True)
class Spec:
    name: str
    config: dict = field(hash=False)
    dtype: str = "float32"
    shards: int = 1
    seed: int = 0
    gain: float = 1.0
    token_routed: bool = False

    def hf_config(self) -> dict:
        return tiny_config(**self.config)


SPECS = {s.name: s for s in [
    # 21B-style hybrid (global NoPE every 4th layer, else RoPE + window 4), sigmoid routing, tied head,
    # fp32 weights in one model.safetensors.
    Spec("hybrid-sigmoid-tied", dict(layout="hybrid", softmax=False, tie=True, window=4),
         dtype="float32", shards=1, seed=1),
    # hybrid, softmax routing, separate lm_head, GQA 3:1, 6 experts top-3, bf16 weights in 3 index-listed files.
    Spec("hybrid-softmax-lmhead", dict(hidden=96, heads=6, kv_heads=2, head_dim=16, experts=6, active=3,
                                       vocab=384, layout="hybrid", softmax=True, tie=False, window=4),
         dtype="bfloat16", shards=3, seed=2),
    # 4B-style: RoPE everywhere, no sliding window, head_dim 32, GQA 4:1, separate head, fp16, 2 files.
    Spec("rope-softmax-lmhead", dict(hidden=128, heads=4, kv_heads=1, head_dim=32, experts=4, active=2, ffn=96,
                                     vocab=300, layout="rope", softmax=True, tie=False),
         dtype="float16", shards=2, seed=3),
    # well-conditioned models for the fast kernels, the KV cache and generation (window 8)
    Spec("conditioned-sigmoid-tied", dict(layout="hybrid", softmax=False, tie=True, window=8),
         dtype="float32", shards=2, seed=4, gain=0.3, token_routed=True),
    Spec("conditioned-softmax-lmhead", dict(layout="hybrid", softmax=True, tie=False, window=8, vocab=512),
         dtype="bfloat16", shards=1, seed=5, gain=0.3, token_routed=True),
]}


class Zoo:
    def __init__(self, root: Path):
        self.root = root
        self._checkpoints: dict = {}
        self._packages: dict = {}
        self._engines: dict = {}
        self._weights: dict = {}

    def checkpoint(self, spec: str):
        """(dir, hf config dict, float32 weights as written before the dtype cast)."""
        if spec not in self._checkpoints:
            s = SPECS[spec]
            cfg = s.hf_config()
            weights = random_weights(cfg, s.seed, gain=s.gain, token_routed=s.token_routed)
            path = write_checkpoint(self.root / f"hf-{spec}", cfg, weights, dtype=s.dtype, shards=s.shards)
            self._checkpoints[spec] = (path, cfg, weights)
        return self._checkpoints[spec]

    def package(self, spec: str, quant: str) -> Path:
        """`quant` is q4_0 or bf16; "q4_0+sparse-down" builds with expert down matrices stored transposed."""
        key = (spec, quant)
        if key not in self._packages:
            from model.build import build_from_hf

            ckpt, _, _ = self.checkpoint(spec)
            out = self.root / f"pkg-{spec}-{quant.replace('+', '-')}"
            base, _, option = quant.partition("+")
            kw = {"sparse_down": True} if option == "sparse-down" else {}
            try:
                build_from_hf(ckpt, out, quant=base, name=spec, version="1.0.0", **kw)
                self._packages[key] = out
            except Exception as e:  # remember: every test using it fails with the same cause, quickly
                self._packages[key] = e
        got = self._packages[key]
        if isinstance(got, Exception):
            raise got
        return got

    def engine(self, spec: str, quant: str, kernel: str | None = None):
        key = (spec, quant, kernel)
        if key not in self._engines:
            from model import Engine

            path = self.package(spec, quant)
            self._engines[key] = Engine.load(path) if kernel is None else Engine.load(path, kernel=kernel)
        return self._engines[key]

    def package_weights(self, spec: str, quant: str):
        """The package's tensors as float64, Q4_0 decoded by gguf (never by the engine)."""
        key = (spec, quant)
        if key not in self._weights:
            from reference_forward import load_package_weights

            self._weights[key] = load_package_weights(self.package(spec, quant))
        return self._weights[key]


@pytest.fixture(scope="session", autouse=True)
def packed_cache_root(tmp_path_factory) -> Path:
    """The torch-int4 packed expert cache of this test session (not the user's ~/.cache)."""
    root = tmp_path_factory.mktemp("packed-cache")
    os.environ["ST_PACKED_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


def error_within(seconds: float, work, what: str) -> BaseException | None:
    """Run `work()` in a thread and return what it raised (None if nothing): a hang fails the test
    ("`what` hung") instead of hanging the suite."""
    outcome: list[BaseException | None] = []

    def target():
        try:
            work()
            outcome.append(None)
        except BaseException as e:  # the error under test
            outcome.append(e)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{what} hung"
    return outcome[0]
