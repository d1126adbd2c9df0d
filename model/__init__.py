"""SmallThinker inference on CPU: packages, Q4_0 kernels, the forward pass, generation.

Public API: `Engine.load(package_dir, *, memory_budget_bytes=None, threads=None)`,
`Engine.logits(ids)`, `Engine.generate(ids, max_new_tokens, temperature=0.0, seed=None)`,
`Engine.last_stats`, `Engine.kv_cache_bytes(n)`, `Engine.close()`; `ModelConfig` and its presets;
the builders.
"""
from model import runtime_env

# Before torch loads: torch's OpenMP threads sleep between its regions unless the user chose a
# policy (see model/runtime_env.py; programs we start get the environment without it).
runtime_env.apply()

from model.errors import (  # noqa: E402  (the error family is light: no torch)
    BudgetError, CheckpointError, ConfigError, IntegrityError, ModelError, PackageError,
)

# The rest loads torch; imported on first use, so `from model.errors import ...` (every stctl
# command) stays cheap.
_LAZY = {"Engine": "model.engine", "ModelConfig": "model.config", "PRESETS": "model.config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = [
    "PRESETS", "BudgetError", "CheckpointError", "ConfigError", "Engine", "IntegrityError", "ModelConfig",
    "ModelError", "PackageError",
]
