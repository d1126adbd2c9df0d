"""Whole-file reads into block-aligned buffers, past the page cache where the file system allows.

Rules:
- A file is read with one `preadv` into a buffer the caller allocated once (`aligned_bytes`):
  nothing is allocated per read.
- O_DIRECT is used while the file system accepts it: dropped for good, per reader, when an
  open or a read is refused with EINVAL (tmpfs refuses it at open, some file systems only at
  read). Without it the read is buffered and the bytes are the same.
- A file whose size is not the expected one is not read: the caller gets its size and decides
  what that means (a truncated shard, a stale cache file). Anything but a regular file (a FIFO
  left where a file should be) is refused without blocking.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from model.package import NotARegularFile, open_regular_file

ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length in whole blocks


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_bytes(n: int) -> torch.Tensor:
    """n bytes starting at a block-aligned address."""
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    shift = -raw.data_ptr() % ALIGN
    return raw[shift:shift + n]


class WholeFileReader:
    """Reads whole files of known size into aligned buffers (one reader per file system)."""

    def __init__(self) -> None:
        self.direct: bool | None = None  # None until a file was opened

    def read(self, path: Path, size: int, image: torch.Tensor) -> int:
        """Read `path` into `image` (>= align_up(size) bytes at an aligned address) when the file
        has `size` bytes; returns the bytes read, or the file's size when it is not `size` (then
        nothing is read). FileNotFoundError when the file is missing, NotARegularFile when it is
        not a file (`model.package.open_regular_file`)."""
        flag = getattr(os, "O_DIRECT", 0)
        direct = self.direct is not False and bool(flag)
        try:
            fd, actual = open_regular_file(path, flag if direct else 0)
        except NotARegularFile:
            raise
        except OSError as e:
            if not (direct and e.errno == errno.EINVAL):
                raise
            self.direct = False  # a file system that refuses the flag at open (tmpfs)
            return self.read(path, size, image)
        self.direct = direct
        try:
            if actual != size:
                return actual
            try:  # O_DIRECT: whole blocks, reading past the end is fine
                return os.preadv(fd, [memoryview(image[:align_up(size) if direct else size].numpy())], 0)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
        finally:
            os.close(fd)
        self.direct = False
        return self.read(path, size, image)
