"""Whole-file reads into block-aligned buffers, past the page cache where the file system allows.

Rules:
- A file is read with one `preadv` into a buffer the caller allocated once (`aligned_bytes`):
  nothing is allocated per read (where the OS lacks `preadv`, Windows, a loop of reads into the
  same buffer: `read_into`).
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


def read_into(fd: int, buffer: memoryview) -> int:
    """Read from offset 0 of `fd` into `buffer`: one `preadv` where the OS has it; elsewhere
    (Windows) seek and read until the buffer is full or the file ends."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], 0)
    os.lseek(fd, 0, os.SEEK_SET)
    done = 0
    with open(fd, "rb", buffering=0, closefd=False) as f:
        while done < len(buffer):
            n = f.readinto(buffer[done:])
            if not n:
                break
            done += n
    return done


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
                return read_into(fd, memoryview(image[:align_up(size) if direct else size].numpy()))
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
        finally:
            os.close(fd)
        self.direct = False
        return self.read(path, size, image)
