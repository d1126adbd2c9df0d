"""Which instruction sets the native kernels are built for, and which one this CPU runs.

Rule: each ISA is a fixed set of compiler flags (never `-march=native`, so a build is exactly
the path it is named for) and the CPU features it needs (from /proc/cpuinfo). The best ISA the
CPU has runs, unless `ST_KERNEL_ISA` names another it has (tests run every path the CPU
supports that way). All paths compute the same products (see x4.c, q4_0.c). The ARM paths are
also built with a cross compiler and run under qemu-user on x86 hosts (tests/test_kernel_arm.py).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from model.errors import IsaError


@dataclass(frozen=True)
class Isa:
    name: str
    flags: tuple[str, ...]
    needs: frozenset[str]


_X86_BASE = ("-march=x86-64", "-mtune=native")
_AVX2 = ("-mavx2", "-mfma", "-mf16c", "-mbmi2")
# best first
X86_ISAS = (
    Isa("avx512-vnni", _X86_BASE + _AVX2 + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
        frozenset({"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})),
    Isa("avx-vnni", _X86_BASE + _AVX2 + ("-mavxvnni",), frozenset({"avx2", "fma", "f16c", "bmi2", "avx_vnni"})),
    Isa("avx2", _X86_BASE + _AVX2, frozenset({"avx2", "fma", "f16c", "bmi2"})),
    Isa("portable", _X86_BASE, frozenset()),
)
# 64-bit ARM (Raspberry Pi 5, RK3588, Apple silicon under Linux): NEON with the dotprod
# extension's SDOT (ARMv8.2+), plain NEON (ARMv8.0: widening multiplies), and portable C
ARM_ISAS = (
    Isa("neon-dotprod", ("-march=armv8.2-a+dotprod",), frozenset({"asimd", "asimddp"})),
    Isa("neon", ("-march=armv8-a",), frozenset({"asimd"})),
    Isa("portable", ("-march=armv8-a", "-DST_PORTABLE"), frozenset()),
)
# other CPUs: the portable C path
OTHER_ISAS = (Isa("portable", (), frozenset()),)


@lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The CPU's feature flags, read once per process (every kernel-library lookup asks)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def known_isas() -> tuple[Isa, ...]:
    machine = platform.machine()
    if machine in ("x86_64", "AMD64", "i686"):
        return X86_ISAS
    return ARM_ISAS if machine in ("aarch64", "arm64") else OTHER_ISAS


def available_isas() -> list[str]:
    """The ISAs this CPU can run, best first."""
    have = cpu_features()
    return [isa.name for isa in known_isas() if isa.needs <= have]


def chosen_isa() -> Isa:
    """`ST_KERNEL_ISA` if set (and runnable here), else the best this CPU has."""
    by_name = {isa.name: isa for isa in known_isas()}
    forced = os.environ.get("ST_KERNEL_ISA")
    runnable = available_isas()
    if forced:
        if forced not in by_name:
            raise IsaError(f"ST_KERNEL_ISA={forced!r} is not one of {', '.join(by_name)}")
        if forced not in runnable:
            missing = sorted(by_name[forced].needs - cpu_features())
            raise IsaError(f"ST_KERNEL_ISA={forced}: this CPU lacks {', '.join(missing)}")
        return by_name[forced]
    return by_name[runnable[0]]
