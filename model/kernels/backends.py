"""Which backend runs the Q4_0 products in this process, and how to say so.

Rule: the choice is made once per process: `ST_KERNEL` when set (one of `BACKENDS`; `c` then
must build), else `c` when the native library builds, else `torch-int4` with one warning line
saying why. An `ST_KERNEL_ISA` this CPU cannot run is an error, never a reason to fall back.
`describe()` reports the choice (for `stctl model bench` and the agent's `/v1/status`).
"""
from __future__ import annotations

import logging
import os
import subprocess
from functools import lru_cache

from model.errors import IsaError, KernelError
from model.kernels.build import native

BACKENDS = ("c", "torch-int4", "reference")

_fallback_reason: str | None = None


@lru_cache(maxsize=1)
def backend() -> str:
    """The backend in use: forced by `ST_KERNEL`, else `c` when it builds, else `torch-int4`
    (with one warning line saying why the native kernels did not build)."""
    global _fallback_reason
    forced = os.environ.get("ST_KERNEL")
    if forced:
        if forced not in BACKENDS:
            raise KernelError(f"ST_KERNEL={forced!r} is not one of {', '.join(BACKENDS)}")
        if forced == "c":
            native()
        return forced
    try:
        native()
        return "c"
    except IsaError:
        raise
    except (KernelError, OSError, subprocess.SubprocessError) as e:
        _fallback_reason = str(e)
        logging.getLogger("model.kernels").warning(
            "native Q4_0 kernels unavailable (%s): running the torch-int4 fallback, several times slower", e)
        return "torch-int4"


def describe() -> dict:
    """Which kernel path runs: backend, instruction set (for `c`), why it fell back (if it did)."""
    name = backend()
    isa = native().st_isa().decode() if name == "c" else None
    return {"backend": name, "isa": isa, "fallback_reason": _fallback_reason}
