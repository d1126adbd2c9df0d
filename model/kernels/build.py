"""Compiling the native kernels once per host and loading the shared library.

Rule: the library is built from the C sources here for exactly one instruction set
(`isa.chosen_isa`, its fixed flags, then `$ST_KERNEL_CFLAGS`) into a per-host cache
(`$ST_KERNEL_CACHE`, default `~/.cache/smallthinker-fleet/kernels`), under a name keyed by
the sources, the compiler, the flags, the CPU's flags and torch's version: a build that is
there is that build, so it is loaded without compiling again. A build is written to a temp file
in the cache and renamed into place, so a crash never leaves half a library under a good name.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from common.files import put_in_place
from model.errors import KernelError
from model.kernels.bindings import bind
from model.kernels.isa import chosen_isa, cpu_features, known_isas

_HERE = Path(__file__).parent
SOURCES = (_HERE / "q4_0.c", _HERE / "x4.c", _HERE / "layer.c", _HERE / "moe.c", _HERE / "pool.c")
HEADER = _HERE / "q4_0.h"
_COMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    root = os.environ.get("ST_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "smallthinker-fleet", "kernels")
    return Path(root)


def native(cflags: str | None = None) -> ctypes.CDLL:
    """The compiled kernel library for the chosen ISA (`isa.chosen_isa`); `cflags` (default
    `$ST_KERNEL_CFLAGS`) are extra compiler flags. KernelError when it cannot be built."""
    return _load(chosen_isa().name, os.environ.get("ST_KERNEL_CFLAGS", "") if cflags is None else cflags)


@lru_cache(maxsize=8)
def _load(isa_name: str, cflags: str) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise KernelError("no C compiler found (gcc or $CC)")
    isa = next(i for i in known_isas() if i.name == isa_name)
    flags = (*isa.flags, *shlex.split(cflags))
    key = hashlib.sha256(
        b"\0".join([*(f.read_bytes() for f in (*SOURCES, HEADER)), cc.encode(),
                    (" ".join(sorted(cpu_features())) or platform.processor()).encode(), torch.__version__.encode(),
                    " ".join(flags).encode()])
    ).hexdigest()[:16]
    lib_path = cache_dir() / f"st-{isa.name}-{key}.so"
    if not lib_path.exists():
        _compile(cc, lib_path, flags)
    return bind(ctypes.CDLL(str(lib_path)), lib_path)


def _compile(cc: str, out: Path, cflags: tuple[str, ...]) -> None:
    """Build the library with exactly `cflags` (the ISA's flags, then any extra ones)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [cc, "-O3", "-fopenmp", "-fPIC", "-shared", *cflags, *map(str, SOURCES), "-o", tmp, "-lm", "-lpthread"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no compiler output"])[-1]
            raise KernelError(f"compiling the native kernels failed: {last}")
        put_in_place(Path(tmp), out, durable=False)  # a cache: rebuilt if a crash leaves it torn (ABI check)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
