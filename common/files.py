"""How state files are written, on the device and in the operator's workspace alike: whole or not
at all.

Rule: temp file in the same folder, fsync, `replace`, fsync the folder (where the OS allows
opening a folder; Windows does not, and its `MoveFileEx` replace is already atomic). Readers
never see a torn file: they see the old content or the new. `replace` is `os.replace`, retried
briefly on Windows, where a reader holding the target open makes it fail for a moment.
`writing(path)` is the same rule for a file written in pieces (a bundle, a packed cache file);
`put_in_place(tmp, path)` for a file another program wrote at a temporary path (a compiler's
output, a GGUF writer's). `durable=False` skips the fsyncs, for caches whose files are
verified when read (a torn one is rebuilt, never used).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_WINDOWS = os.name == "nt"
_REPLACE_TRIES = 20  # x 50 ms on Windows: an antivirus scan or a reader holding the file open


def fsync_dir(path: Path) -> None:
    if _WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`os.replace`; on Windows a sharing violation is retried for up to a second."""
    for attempt in range(_REPLACE_TRIES if _WINDOWS else 1):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if not _WINDOWS or attempt == _REPLACE_TRIES - 1:
                raise
            time.sleep(0.05)


@contextmanager
def writing(path: Path, mode: int = 0o644, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; on a clean exit it is synced and put in
    place, on an exception it is removed and `path` keeps its old content (or stays absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, mode)
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def put_in_place(tmp: Path, path: Path, durable: bool = True) -> None:
    """Move the finished file `tmp` (in `path`'s folder) to `path`, synced first."""
    if durable:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    replace(tmp, path)
    if durable:
        fsync_dir(Path(path).parent)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    with writing(path, mode) as f:
        f.write(data)


def atomic_write_json(path: Path, obj, mode: int = 0o644) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path):
    """The JSON document at `path`, or None if the file does not exist."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
