"""Formats shared by the control side (stctl) and the device (st-agent), and the few side-neutral
helpers both need, each in its own module (`names`: what a name may be; `cli_support`: the
command lines' error lines and JSON output).

Rule: bytes in, objects out, objects to bytes; no file or network I/O (`cli_support` writes only
to stdout and stderr), no torch, no HTTP.
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
