"""Names inside a release repository, shared by the publisher (stctl) and the device (agent).

Rule: one place decides what a TUF target is called, so both sides agree byte for byte.

- A shard is a content-addressed target `blobs/<sha256>`: two versions that share a shard share
  one target, so a device that holds it never downloads it again.
- A release's manifest is the target `models/<name>/<version>/manifest.json`.
- The fleet CA's certificate revocation list (PEM) is the target `pki/crl.pem`: devices fetch it
  with their updates (one per repository; a repository without it has revoked nothing).
- With consistent snapshots (always on), TUF stores and serves a target as
  `<dirname>/<sha256>.<basename>`, e.g. `targets/blobs/<sha>.<sha>`; metadata as
  `metadata/<version>.<role>.json`, with `metadata/timestamp.json` unversioned.
- A repository is served as two folders: `metadata/` and `targets/` under one base URL. An
  offline bundle is a tar with the same two folders (plus `bundle.json`).
"""
from __future__ import annotations

from manifests.errors import ManifestError
from manifests.model_manifest import ModelManifest, check_sha256, parse_version
from manifests.names import check_name

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
BLOB_PREFIX = "blobs/"
MODELS_PREFIX = "models/"
MANIFEST_BASENAME = "manifest.json"
BUNDLE_INFO = "bundle.json"
CRL_TARGET = "pki/crl.pem"


def blob_target(sha256: str) -> str:
    """Target path of the shard (or any file) whose content hashes to `sha256`."""
    return BLOB_PREFIX + check_sha256(sha256, "blob target")


def manifest_target(name: str, version: str) -> str:
    """Target path of the manifest of release `name` `version`."""
    check_name(name, "model name")
    parse_version(version)
    return f"{MODELS_PREFIX}{name}/{version}/{MANIFEST_BASENAME}"


def parse_manifest_target(path: str) -> tuple[str, str] | None:
    """(name, version) if `path` is a release manifest target, else None."""
    parts = path.split("/")
    if len(parts) != 4 or parts[0] + "/" != MODELS_PREFIX or parts[3] != MANIFEST_BASENAME:
        return None
    try:
        check_name(parts[1])
        parse_version(parts[2])
    except ManifestError:
        return None
    return parts[1], parts[2]


def parse_release_ref(text: str) -> tuple[str, str]:
    """`name@version` -> (name, version)."""
    name, sep, version = text.partition("@")
    if not sep:
        raise ManifestError(f"{text!r}: expected NAME@VERSION, e.g. st-demo@1.0.0")
    check_name(name, "model name")
    parse_version(version)
    return name, version


def package_files(manifest: ModelManifest) -> list[tuple[str, str, int]]:
    """(file, sha256, size) of every file a package holds besides manifest.json: shards, then tokenizer."""
    files = [(s.file, s.sha256, s.size) for s in manifest.shards]
    tok = manifest.tokenizer
    if tok.file:
        files.append((tok.file, tok.sha256, tok.size))
    return files
