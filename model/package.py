"""Model packages on disk: a directory with `manifest.json` and one safetensors file per shard.

Rule: a package directory either does not exist or is complete. Writers build it in a temp
directory beside the target and rename it into place at the end; readers check every shard's
size and sha256 before its tensors are used, and never follow a shard file outside the package.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

from manifests import ManifestError, ModelManifest, ShardEntry
from model.errors import IntegrityError, PackageError

if TYPE_CHECKING:  # torch loads only where tensors are read or written, not for hashing and paths
    import torch

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"

# ---- shard naming: one place decides which tensor lives in which file -------------------------
EMBED_SHARD = "embed"
HEAD_SHARD = "head"


def layer_shard(layer: int) -> str:
    return f"layer.{layer}"


def expert_shard(layer: int, expert: int) -> str:
    return f"layer.{layer}.expert.{expert}"


def shard_file(name: str) -> str:
    return f"{SHARDS_DIR}/{name}.safetensors"


def expert_tensor_names(layer: int, expert: int) -> dict[str, str]:
    base = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return {p: f"{base}.{p}.weight" for p in ("gate", "up", "down")}


def layer_tensor_names(layer: int) -> dict[str, str]:
    base = f"model.layers.{layer}"
    return {
        "input_layernorm": f"{base}.input_layernorm.weight",
        "q_proj": f"{base}.self_attn.q_proj.weight",
        "k_proj": f"{base}.self_attn.k_proj.weight",
        "v_proj": f"{base}.self_attn.v_proj.weight",
        "o_proj": f"{base}.self_attn.o_proj.weight",
        "post_attention_layernorm": f"{base}.post_attention_layernorm.weight",
        "router": f"{base}.block_sparse_moe.primary_router.weight",
    }


EMBED_TENSOR = "model.embed_tokens.weight"
NORM_TENSOR = "model.norm.weight"
LM_HEAD_TENSOR = "lm_head.weight"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- reading -------------------------------------------------------------------------------
def read_manifest(package_dir: str | os.PathLike) -> ModelManifest:
    path = Path(package_dir) / MANIFEST_FILE
    if not Path(package_dir).is_dir():
        raise PackageError(f"{package_dir}: not a model package directory")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{package_dir}: no {MANIFEST_FILE}; not a model package") from None
    try:
        return ModelManifest.from_bytes(data)
    except ManifestError as e:
        raise PackageError(f"{path}: {e}") from None


def read_verified(package_dir: str | os.PathLike, entry: ShardEntry | None, *, file: str | None = None,
                  sha256: str | None = None, size: int | None = None) -> bytes:
    """The bytes of one package file, after checking size and sha256 against the manifest."""
    file = file or entry.file
    sha256 = sha256 or entry.sha256
    size = entry.size if size is None else size
    path = Path(package_dir) / file
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except FileNotFoundError:
        raise IntegrityError(f"{file}: missing from package {package_dir}") from None
    if len(data) != size:
        raise IntegrityError(f"{file}: size {len(data)}{'+' if len(data) > size else ''} bytes, manifest says {size}")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"{file}: sha256 mismatch (corrupt or tampered shard)")
    return data


def load_shard(package_dir: str | os.PathLike, entry: ShardEntry) -> dict[str, torch.Tensor]:
    """Tensors of a verified shard."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors_bytes

    data = read_verified(package_dir, entry)
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as e:
        raise IntegrityError(f"{entry.file}: not a valid safetensors file ({e})") from None


def verify_package(package_dir: str | os.PathLike) -> ModelManifest:
    """Check every file the manifest lists; return the manifest."""
    manifest = read_manifest(package_dir)
    for entry in manifest.shards:
        read_verified(package_dir, entry)
    tok = manifest.tokenizer
    if tok.file:
        read_verified(package_dir, None, file=tok.file, sha256=tok.sha256, size=tok.size)
    return manifest


# ---- writing -------------------------------------------------------------------------------
class PackageWriter:
    """Writes a package into a hidden temp directory; `commit` renames it into place."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        if self.out.exists():
            raise PackageError(f"{self.out}: already exists; refusing to overwrite")
        missing = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.created_parents = missing  # removed again by abort(), innermost first
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        (self.tmp / SHARDS_DIR).mkdir()
        self.shards: list[ShardEntry] = []

    def add_shard(self, name: str, kind: str, tensors: dict[str, torch.Tensor], *,
                  layer: int | None = None, expert: int | None = None) -> ShardEntry:
        from safetensors.torch import save as save_safetensors_bytes

        data = save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})
        file = shard_file(name)
        (self.tmp / file).write_bytes(data)
        entry = ShardEntry(name=name, file=file, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                           kind=kind, layer=layer, expert=expert)
        self.shards.append(entry)
        return entry

    def add_file(self, src: Path, name: str) -> tuple[str, int]:
        dst = self.tmp / name
        shutil.copyfile(src, dst)
        return sha256_file(dst), dst.stat().st_size

    def write_manifest(self, manifest: ModelManifest) -> None:
        tmp = self.tmp / (MANIFEST_FILE + ".tmp")
        tmp.write_bytes(manifest.to_bytes())
        os.replace(tmp, self.tmp / MANIFEST_FILE)

    def commit(self) -> Path:
        if self.out.exists():
            raise PackageError(f"{self.out}: appeared while building; refusing to overwrite")
        os.rename(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for parent in self.created_parents:
            try:
                parent.rmdir()
            except OSError:
                break
