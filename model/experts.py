"""Expert weights for the forward pass.

Rule: an expert is used only after its shard passed the manifest's size and sha256 check.
`ResidentExperts` keeps every expert in memory (no budget); the budgeted, prefetching store
builds on the same `ExpertSource` interface.
"""
from __future__ import annotations

from pathlib import Path

from manifests import ModelManifest, ShardEntry
from model.errors import PackageError
from model.matrices import make_matrix
from model.model import ExpertWeights
from model.package import expert_tensor_names, load_shard


def load_expert(package_dir: Path, manifest: ModelManifest, entry: ShardEntry, kernel: str | None = None) -> ExpertWeights:
    tensors = load_shard(package_dir, entry)
    names = expert_tensor_names(entry.layer, entry.expert)
    try:
        parts = {p: make_matrix(tensors[n], manifest.quant, n, kernel) for p, n in names.items()}
    except KeyError as e:
        raise PackageError(f"{entry.file}: missing tensor {e.args[0]}") from None
    return ExpertWeights(**parts)


class ResidentExperts:
    """All experts loaded at start-up."""

    def __init__(self, package_dir: Path, manifest: ModelManifest, kernel: str | None = None, progress=None):
        self.experts: dict[tuple[int, int], ExpertWeights] = {}
        for entry in manifest.expert_shards():
            self.experts[(entry.layer, entry.expert)] = load_expert(package_dir, manifest, entry, kernel)
            if progress:
                progress()
        self.hits = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.experts.values())

    def prefetch(self, layer: int, expert_ids: list[int]) -> None:
        """Everything is resident; nothing to fetch."""

    def get(self, layer: int, expert: int) -> ExpertWeights:
        self.hits += 1
        return self.experts[(layer, expert)]

    def stats(self) -> dict:
        return {"expert_cache_hits": self.hits, "expert_cache_misses": 0, "prefetch_hits": 0, "bytes_read": 0}
