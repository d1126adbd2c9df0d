"""Delta between two releases: what a device holding OLD downloads to get NEW.

Rule (content addressing): a file of NEW ships iff no file of OLD has its sha256, and a content
repeated inside NEW ships once. This is exactly what the device's client downloads, because
shards are `blobs/<sha256>` targets and its store is keyed by sha256.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from manifests import ModelManifest
from manifests.release import package_files, parse_release_ref
from model.package import read_manifest
from stctl.repository import Repository
from stctl.workspace import open_workspace

TOKENIZER_NAME = "tokenizer"


@dataclass(frozen=True)
class DeltaReport:
    old: str  # name@version
    new: str
    changed_shards: list[str]  # shard names of NEW whose content OLD lacks ("tokenizer" for its file)
    bytes_to_ship: int
    bytes_full: int

    def to_dict(self) -> dict:
        return {"old": self.old, "new": self.new, "changed_shards": self.changed_shards,
                "bytes_to_ship": self.bytes_to_ship, "bytes_full": self.bytes_full}


def diff_manifests(old: ModelManifest, new: ModelManifest) -> DeltaReport:
    held = {sha256 for _, sha256, _ in package_files(old)}
    names = {s.file: s.name for s in new.shards} | ({new.tokenizer.file: TOKENIZER_NAME} if new.tokenizer.file else {})
    changed, shipped, to_ship = [], set(), 0
    for file, sha256, size in package_files(new):
        if sha256 in held:
            continue
        changed.append(names[file])
        if sha256 not in shipped:
            shipped.add(sha256)
            to_ship += size
    return DeltaReport(f"{old.name}@{old.version}", f"{new.name}@{new.version}", changed, to_ship, new.total_bytes)


def load_manifest(ref: str, workspace: str | os.PathLike | None = None) -> ModelManifest:
    """A manifest from a package directory, or from `name@version` published in the workspace."""
    if Path(ref).is_dir():
        return read_manifest(ref)
    name, version = parse_release_ref(ref)
    return ModelManifest.from_bytes(Repository(open_workspace(workspace)).manifest_bytes(name, version))
