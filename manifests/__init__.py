"""Formats shared by the control side (stctl) and the device (st-agent): model manifests,
rollout plans, telemetry rows, enrollment files, release layout, and what a name may be.

Rule: bytes in, objects out, objects to bytes; no file or network I/O, no torch, no HTTP. The
platform helpers both sides need (files, locks, migrations, durations, CLI scaffolding) are in
`common`.
"""
from manifests.errors import ManifestError
from manifests.model_manifest import (
    CONFIG_KEYS,
    MANIFEST_FORMAT,
    HealthSpec,
    GoldenPrompt,
    ModelManifest,
    ShardEntry,
    TokenizerSpec,
)

__all__ = [
    "CONFIG_KEYS",
    "MANIFEST_FORMAT",
    "GoldenPrompt",
    "HealthSpec",
    "ManifestError",
    "ModelManifest",
    "ShardEntry",
    "TokenizerSpec",
]
