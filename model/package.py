"""Model packages on disk: a directory with `manifest.json` and one safetensors file per shard.

Rule: a package directory either does not exist or is complete. Writers build it in a temp
directory beside the target and rename it into place at the end; readers check every shard's
size and sha256 before its tensors are used, and never follow a shard file outside the package.
Readers never hold a copy of a file to do so: `ShardFile` hashes a shard in one pass while its
tensors land in the buffers they will live in, or streams it through a small scratch buffer.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.files import atomic_write, fsync_dir
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
_READ_CHUNK = 1 << 20  # bytes hashed per read when a file is streamed rather than kept
_MAX_HEADER_BYTES = 1 << 24  # a shard's JSON header is a few hundred bytes; anything near this is damage
# safetensors dtype -> (torch dtype name, bytes per element), for the dtypes packages may hold
_DTYPES = {"U8": ("uint8", 1), "I8": ("int8", 1), "BF16": ("bfloat16", 2), "F16": ("float16", 2),
           "F32": ("float32", 4), "I32": ("int32", 4), "I64": ("int64", 8), "F64": ("float64", 8)}


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


class NotARegularFile(OSError):
    """The path names a FIFO, device or directory, not a file."""


def open_regular_file(path: str | os.PathLike, flags: int = 0) -> tuple[int, int]:
    """(fd, size) of `path` opened read-only without blocking (plus `flags`); a FIFO, device or
    directory is NotARegularFile (nothing left open), never a hang."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | flags)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
    return fd, info.st_size


class _PackageFile:
    """One file a manifest lists, open for positioned reads, its size already matched to the manifest.

    It opens without blocking and refuses anything but a regular file, so a FIFO or device left
    where a shard should be is an error, never a hang. `pread` is positionless: threads may share it.
    """

    def __init__(self, package_dir: str | os.PathLike, file: str, sha256: str, size: int):
        self.file, self.sha256, self.size = file, sha256, size
        self.path = Path(package_dir) / file
        try:
            fd, actual = open_regular_file(self.path)
        except FileNotFoundError:
            raise IntegrityError(f"{file}: missing from package {package_dir}") from None
        except NotARegularFile:
            raise IntegrityError(f"{file}: not a regular file") from None
        except OSError as e:
            raise IntegrityError(f"{file}: cannot open ({e.strerror})") from None
        self._io = os.fdopen(fd, "rb", buffering=0)  # closes the fd when closed or collected
        if actual != size:
            self.close()
            raise IntegrityError(f"{file}: size {actual} bytes, manifest says {size}")

    def close(self) -> None:
        self._io.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advise_random(self) -> None:
        """Reads from now on are scattered and small: no read-ahead (nothing left in the page cache
        beyond the pages read)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._io.fileno(), 0, 0, os.POSIX_FADV_RANDOM)

    def drop_cached(self) -> None:
        """Let the page cache drop this file's pages: its bytes now live in their tensors, and under
        a memory cgroup a second copy counts against the process."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._io.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def pread(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the file's bytes from `offset`; the file ending first is an IntegrityError."""
        done, want = 0, buf.nbytes
        while done < want:
            got = os.preadv(self._io.fileno(), [buf[done:]], offset + done)
            if got == 0:
                raise IntegrityError(f"{self.file}: truncated (ends before byte {offset + want})")
            done += got

    def hash_range(self, h, start: int, end: int, scratch: memoryview) -> None:
        """Feed bytes [start, end) to `h`, read through `scratch` (nothing kept)."""
        if start < end and not scratch.nbytes:
            raise ValueError("hashing a range needs a scratch buffer")  # a caller's bug; never loop on it
        while start < end:
            piece = scratch[: min(scratch.nbytes, end - start)]
            self.pread(start, piece)
            h.update(piece)
            start += piece.nbytes

    def check_sha256(self) -> None:
        """Stream the whole file through sha256 and compare with the manifest."""
        h = hashlib.sha256()
        self.hash_range(h, 0, self.size, memoryview(bytearray(min(_READ_CHUNK, self.size))))
        self.require(h)

    def require(self, h) -> None:
        if h.hexdigest() != self.sha256:
            raise IntegrityError(f"{self.file}: sha256 mismatch (corrupt or tampered shard)")


def read_verified(package_dir: str | os.PathLike, entry: ShardEntry | None, *, file: str | None = None,
                  sha256: str | None = None, size: int | None = None) -> bytes:
    """The bytes of one (small) package file, after checking size and sha256 against the manifest."""
    with _PackageFile(package_dir, file or entry.file, sha256 or entry.sha256,
                      entry.size if size is None else size) as f:
        data = bytearray(f.size)
        f.pread(0, memoryview(data))
        f.require(hashlib.sha256(data))
    return bytes(data)


@dataclass(frozen=True)
class TensorRange:
    """One tensor of a shard: safetensors dtype name, shape, and where its bytes sit in the file."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


class ShardFile(_PackageFile):
    """A shard open for reading, its safetensors header parsed into `tensors` (name -> TensorRange).

    Safetensors: an 8-byte little-endian header length, the JSON header, then the tensors' bytes
    back to back. A header that does not describe exactly that is damage: the file is hashed first,
    so a corrupt file is reported as a sha256 mismatch, and only a file that matches its manifest
    but is malformed as a bad header.
    """

    def __init__(self, package_dir: str | os.PathLike, entry: ShardEntry):
        super().__init__(package_dir, entry.file, entry.sha256, entry.size)
        try:
            self.header, self.tensors = self._parse_header()
        except IntegrityError:
            try:
                self.check_sha256()
            finally:
                self.close()
            raise

    def _parse_header(self) -> tuple[bytes, dict[str, TensorRange]]:
        def read_at(offset: int, n: int) -> bytearray:
            buf = bytearray(n)
            self.pread(offset, memoryview(buf))
            return buf

        return parse_shard_header(read_at, self.size, self.file)

    def read_into(self, targets: dict[str, memoryview]) -> None:
        """Read the whole file once, in file order: each tensor named in `targets` straight into its
        buffer (exactly its bytes), the rest through a small scratch buffer; the sha256 of it all
        must match the manifest. On an error the targets hold garbage: the caller drops them."""
        for name, buf in targets.items():
            if name not in self.tensors or buf.nbytes != self.tensors[name].length:
                raise ValueError(f"{self.file}: no room for {name} as stored")  # a caller's bug
        h = hashlib.sha256(self.header)
        rest = [t.length for name, t in self.tensors.items() if name not in targets]
        scratch = memoryview(bytearray(min(_READ_CHUNK, max(rest, default=0))))
        for name, t in sorted(self.tensors.items(), key=lambda item: item[1].offset):
            if name in targets:
                self.pread(t.offset, targets[name])
                h.update(targets[name])
            else:
                self.hash_range(h, t.offset, t.offset + t.length, scratch)
        self.require(h)


def parse_shard_header(read_at, size: int, file: str) -> tuple[bytes, dict[str, TensorRange]]:
    """A safetensors file's header bytes and its tensors (name -> TensorRange), from `read_at(offset,
    n)`, which returns n bytes of the file (a file of `size` bytes, named `file` in messages)."""
    bad = f"{file}: not a valid safetensors file"
    if size < 8:
        raise IntegrityError(f"{bad} (only {size} bytes)")
    prefix = bytes(read_at(0, 8))
    n = struct.unpack("<Q", prefix)[0]
    if n > min(_MAX_HEADER_BYTES, size - 8):
        raise IntegrityError(f"{bad} (header length {n})")
    raw = bytes(read_at(8, n))
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{bad} (header is not JSON)") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{bad} (header is not a JSON object)")
    data_start, tensors = 8 + n, {}
    for name, info in header.items():
        if name != "__metadata__":
            tensors[name] = _tensor_range(info, data_start, bad, name)
    position = data_start  # the tensors must tile the rest of the file, no gaps, no overlaps
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset != position:
            raise IntegrityError(f"{bad} (tensor bytes do not tile the file)")
        position += t.length
    if position != size:
        raise IntegrityError(f"{bad} (tensors end at byte {position}, file at {size})")
    return prefix + raw, tensors


def _tensor_range(info, data_start: int, bad: str, name: str) -> TensorRange:
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if not (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise TypeError
    except (TypeError, ValueError, KeyError):
        raise IntegrityError(f"{bad} (entry of {name})") from None
    if dtype in _DTYPES and end - start != math.prod(shape) * _DTYPES[dtype][1]:
        raise IntegrityError(f"{bad} ({name}: {end - start} bytes for {dtype} {list(shape)})")
    return TensorRange(dtype, shape, data_start + start, end - start)


def torch_dtype(shard: ShardFile, name: str) -> torch.dtype:
    """The torch dtype of a stored tensor; one the engine has no use for is a PackageError."""
    import torch

    dtype = shard.tensors[name].dtype
    if dtype not in _DTYPES:
        raise PackageError(f"{shard.file}: tensor {name} has dtype {dtype}, which this engine does not read")
    return getattr(torch, _DTYPES[dtype][0])


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, writable in place (a shard is read straight into it)."""
    import torch

    if not t.is_contiguous():
        raise ValueError("reading into a tensor needs it contiguous")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def load_shard(package_dir: str | os.PathLike, entry: ShardEntry) -> dict[str, torch.Tensor]:
    """Every tensor of a verified shard, each read straight into its own buffer (no copy of the file)."""
    import torch

    with ShardFile(package_dir, entry) as shard:
        tensors = {name: torch.empty(t.shape, dtype=torch_dtype(shard, name)) for name, t in shard.tensors.items()}
        shard.read_into({name: tensor_buffer(t) for name, t in tensors.items()})
    return tensors


def verify_package(package_dir: str | os.PathLike) -> ModelManifest:
    """Check every file the manifest lists (streamed: no file is held in memory); return the manifest."""
    manifest = read_manifest(package_dir)
    files = [(e.file, e.sha256, e.size) for e in manifest.shards]
    tok = manifest.tokenizer
    if tok.file:
        files.append((tok.file, tok.sha256, tok.size))
    for file, sha256, size in files:
        with _PackageFile(package_dir, file, sha256, size) as f:
            f.check_sha256()
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
        atomic_write(self.tmp / file, data)
        entry = ShardEntry(name=name, file=file, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                           kind=kind, layer=layer, expert=expert)
        self.shards.append(entry)
        return entry

    def add_file(self, src: Path, name: str) -> tuple[str, int]:
        dst = self.tmp / name
        atomic_write(dst, Path(src).read_bytes())  # tokenizer and config files: small
        return sha256_file(dst), dst.stat().st_size

    def write_manifest(self, manifest: ModelManifest) -> None:
        atomic_write(self.tmp / MANIFEST_FILE, manifest.to_bytes())

    def commit(self) -> Path:
        """The package appears whole: every file was synced as it was written, the folder's
        entries are synced, then the folder is renamed into place."""
        if self.out.exists():
            raise PackageError(f"{self.out}: appeared while building; refusing to overwrite")
        for folder in (self.tmp / SHARDS_DIR, self.tmp):
            fsync_dir(folder)
        os.rename(self.tmp, self.out)
        fsync_dir(self.out.parent)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for parent in self.created_parents:
            try:
                parent.rmdir()
            except OSError:
                break
