"""SmallThinker inference on CPU: packages, Q4_0 kernels, the forward pass, generation.

Public API: `Engine.load(package_dir, *, memory_budget_bytes=None, threads=None)`,
`Engine.logits(ids)`, `Engine.generate(ids, max_new_tokens, temperature=0.0, seed=None)`,
`Engine.last_stats`, `Engine.kv_cache_bytes(n)`; `ModelConfig` and its presets; the builders.
"""
import os

# OpenMP threads sleep at barriers instead of spinning, unless the user chose a policy. This must
# happen before torch loads libgomp. On a busy 2-core PC spinning threads starve the threads
# doing the work: the 4B shape decoded at 1.8 tok/s with the default policy and 15.8 tok/s with
# PASSIVE under the same load (load average ~16-20, 2 threads; `stctl model bench`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
