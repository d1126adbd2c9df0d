"""SmallThinker inference on CPU: packages, Q4_0 kernels, the forward pass, generation.

Public API: `Engine.load(package_dir, *, memory_budget_bytes=None, threads=None)`,
`Engine.logits(ids)`, `Engine.generate(ids, max_new_tokens, temperature=0.0, seed=None)`,
`Engine.last_stats`, `Engine.kv_cache_bytes(n)`; `ModelConfig` and its presets; the builders.
"""
from model.config import PRESETS, ModelConfig
from model.engine import Engine
from model.errors import BudgetError, CheckpointError, ConfigError, IntegrityError, ModelError, PackageError

__all__ = [
    "PRESETS", "BudgetError", "CheckpointError", "ConfigError", "Engine", "IntegrityError", "ModelConfig",
    "ModelError", "PackageError",
]
