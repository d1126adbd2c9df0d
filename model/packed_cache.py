"""A per-host cache of experts in the torch int4 kernel's packed layout: a load is one read, no repacking.

Rules:
- It holds derived copies only: the package's GGML Q4_0 shards stay the verified source of truth.
  A file is named by the sha256 of the shard it was packed from and kept in a directory named by
  what decides the packed layout (`layout_key`): torch's version and the CPU capability torch's
  kernels dispatch to (the int4 pack differs between AVX2 and AVX512 builds).
- One file per expert: a `HEADER_BYTES` header, then each tensor at an `ALIGN`-aligned offset, so
  a load is one (O_DIRECT-capable) read into a slot and the tensors are views of it.
- A file counts only when its header names this layout key, its source sha256 and the expected
  tensor table, and its payload hashes to the sha256 the header records (checked the first time a
  process reads the file). Anything else is treated as absent: the expert is packed again from its
  shard and the file rewritten.
- Writes are atomic (a temp file in the same directory, then rename). A write that fails
  (read-only directory, full disk) never fails inference: the expert is used from memory, the
  failure is counted in `write_errors`, and later experts do not try again.
- `ST_PACKED_CACHE` names the cache root (default `~/.cache/smallthinker-fleet/packed`); `off`
  turns the cache off. `prune` keeps a cache to the experts still installed (the device agent
  runs it with its garbage collection, on the cache under its data directory).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.files import writing
from model.direct_io import WholeFileReader, align_up

MAGIC = b"STPACK1\n"
HEADER_BYTES = 4096
_LENGTH = struct.Struct("<I")


def layout_key() -> str:
    """What the packed bytes depend on besides the weights: torch's version and its CPU capability."""
    return f"torch-{torch.__version__}-{torch.backends.cpu.get_cpu_capability().lower()}"


def default_root() -> Path | None:
    """The cache root from `ST_PACKED_CACHE` (None when it is `off`)."""
    root = os.environ.get("ST_PACKED_CACHE", "")
    if root == "off":
        return None
    return Path(root or os.path.join(os.path.expanduser("~"), ".cache", "smallthinker-fleet", "packed"))


@dataclass(frozen=True)
class _PackedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)

    def describe(self) -> list:
        return [self.name, str(self.dtype).removeprefix("torch."), list(self.shape), self.offset]


class PackedLayout:
    """Where each tensor of a packed expert sits in its file (the same for every expert of a package)."""

    def __init__(self, sample: dict[str, torch.Tensor]):
        """From one packed expert's tensors (their names, dtypes and shapes; not their values)."""
        offset, tensors = HEADER_BYTES, []
        for name, t in sample.items():
            tensors.append(_PackedTensor(name, t.dtype, tuple(t.shape), offset))
            offset = align_up(offset + tensors[-1].nbytes)
        self.tensors = tensors
        self.file_bytes = offset
        self.payload_bytes = sum(t.nbytes for t in tensors)  # the weights, without header and padding

    def _table(self) -> list:
        return [t.describe() for t in self.tensors]

    def write(self, image: torch.Tensor, tensors: dict[str, torch.Tensor], source_sha256: str) -> None:
        """Lay `tensors` out in `image` (>= file_bytes) behind a header; padding is zeroed, so equal
        weights give equal files."""
        image[:self.file_bytes].zero_()
        for t in self.tensors:
            image[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape).copy_(tensors[t.name])
        payload = hashlib.sha256(image[HEADER_BYTES:self.file_bytes].numpy()).hexdigest()
        header = json.dumps({"key": layout_key(), "source_sha256": source_sha256, "tensors": self._table(),
                             "payload_sha256": payload}, separators=(",", ":")).encode()
        block = MAGIC + _LENGTH.pack(len(header)) + header
        if len(block) > HEADER_BYTES:
            raise ValueError("packed expert header does not fit its block")
        image[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(block.ljust(HEADER_BYTES, b"\0")), dtype=torch.uint8))

    def matches(self, image: torch.Tensor, source_sha256: str, check_payload: bool) -> bool:
        """Whether `image` holds a packed expert of this layout and key, packed from that shard."""
        head = bytes(image[:HEADER_BYTES].numpy())
        if not head.startswith(MAGIC):
            return False
        (length,) = _LENGTH.unpack_from(head, len(MAGIC))
        try:
            header = json.loads(head[len(MAGIC) + _LENGTH.size:len(MAGIC) + _LENGTH.size + length])
        except ValueError:
            return False
        if not isinstance(header, dict) or (header.get("key"), header.get("source_sha256"), header.get("tensors")) != (
                layout_key(), source_sha256, self._table()):
            return False
        return not check_payload or (
            hashlib.sha256(image[HEADER_BYTES:self.file_bytes].numpy()).hexdigest() == header.get("payload_sha256"))

    def views(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors, as views of `image` (no copy)."""
        return {t.name: image[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape) for t in self.tensors}


class PackedExpertCache:
    """The cache directory of one layout key; files are found by their source shard's sha256.
    Safe to use from several reader threads (each with its own buffer)."""

    def __init__(self, root: Path):
        self.dir = Path(root) / layout_key()
        self.reader = WholeFileReader()
        self.verified: set[str] = set()  # source hashes whose file's payload this process checked
        self.loads = self.packs = self.write_errors = 0
        self.writable = True
        self._lock = threading.Lock()  # the counters and `verified`

    def path(self, source_sha256: str) -> Path:
        return self.dir / f"{source_sha256}.int4"

    def load(self, layout: PackedLayout, source_sha256: str, image: torch.Tensor) -> bool:
        """Read the packed expert into `image` (>= align_up(file_bytes), aligned); False when there
        is no valid file for it (absent, another size or key, or corrupt)."""
        try:
            got = self.reader.read(self.path(source_sha256), layout.file_bytes, image)
        except OSError:  # absent, or unreadable: either way packed again from the shard
            return False
        check = source_sha256 not in self.verified
        if got != layout.file_bytes or not layout.matches(image, source_sha256, check):
            return False
        with self._lock:
            self.verified.add(source_sha256)
            self.loads += 1
        return True

    def save(self, layout: PackedLayout, source_sha256: str, image: torch.Tensor) -> None:
        """Store the packed expert laid out in `image` (see `PackedLayout.write`)."""
        with self._lock:
            self.packs += 1
        if not self.writable:
            return
        try:
            with writing(self.path(source_sha256), durable=False) as f:  # verified when read: never fsynced
                f.write(memoryview(image[:layout.file_bytes].numpy()))
            with self._lock:
                self.verified.add(source_sha256)
        except OSError:
            with self._lock:
                self.write_errors += 1
            self.writable = False



_TEMP_GRACE_S = 600.0  # a temp file younger than this may be a write in progress


def prune(root: Path, keep: set[str]) -> int:
    """Remove from the cache under `root` the packed files whose source sha256 is not in `keep`,
    every packed file of another layout key (another torch version or CPU), and temp files a
    killed writer left; other files stay. Returns the files removed (0 when there is no cache)."""
    removed, current = 0, layout_key()
    try:
        key_dirs = [d for d in Path(root).iterdir() if d.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for key_dir in key_dirs:
        for path in key_dir.iterdir():
            stale_temp = path.suffix == ".tmp" and time.time() - path.stat().st_mtime > _TEMP_GRACE_S
            unused = path.suffix == ".int4" and (key_dir.name != current or path.stem not in keep)
            if stale_temp or unused:
                path.unlink(missing_ok=True)
                removed += 1
        if key_dir.name != current and not any(key_dir.iterdir()):
            key_dir.rmdir()
    return removed
