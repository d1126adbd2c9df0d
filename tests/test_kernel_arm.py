"""The 64-bit ARM paths of the x4 kernels compute the same products as every other path.

Each ARM ISA of `model.kernels.isa.ARM_ISAS` (NEON with SDOT, plain NEON, portable C) is built
with a cross compiler from the kernel sources and its own flags, together with
`tests/native/x4_products.c` (repack, rows read back, products), and run under qemu-user: against
the float64 product of the dequantized weights within the Q8_0 rounding bound of test_quant, and
against the portable path (the same integers, summed in another float order: <= 1e-5 of scale).
Needs `aarch64-linux-gnu-gcc` and `qemu-aarch64` (Debian: gcc-aarch64-linux-gnu, qemu-user;
`.ci/run` installs them where apt can); skipped without them.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from model.kernels.isa import ARM_ISAS
from test_kernel_isas import _weights
from test_quant import _error_bound

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "model" / "kernels"
HARNESS = Path(__file__).resolve().parent / "native" / "x4_products.c"
CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
SYSROOT = Path("/usr/aarch64-linux-gnu")
Q4_0 = GGMLQuantizationType.Q4_0

pytestmark = pytest.mark.skipif(not (CC and QEMU), reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, Path]:
    """One x4_products program per ARM ISA, built with that ISA's flags (as isa.py builds it)."""
    out = tmp_path_factory.mktemp("arm-kernels")
    built = {}
    for isa in ARM_ISAS:
        exe = out / f"x4-{isa.name}"
        sources = sorted(str(p) for p in KERNELS.glob("*.c"))
        proc = subprocess.run([CC, "-O3", "-fopenmp", "-fPIC", *isa.flags, "-I", str(KERNELS), str(HARNESS), *sources,
                               "-o", str(exe), "-lm", "-lpthread"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{isa.name}: {proc.stderr[-2000:]}"
        built[isa.name] = exe
    return built


def _run(exe: Path, blocks: np.ndarray, x: np.ndarray, n: int) -> tuple[str, np.ndarray]:
    m, k = x.shape
    payload = np.array([n, k, m], dtype=np.int64).tobytes() + blocks.tobytes() + x.astype(np.float32).tobytes()
    proc = subprocess.run([QEMU, "-cpu", "max", "-L", str(SYSROOT), str(exe)], input=payload, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    name, _, rest = proc.stdout.partition(b"\n")
    return name.decode(), np.frombuffer(rest, dtype=np.float32).reshape(m, n).astype(np.float64)


@pytest.mark.parametrize("m", [1, 2, 3, 6, 17])  # every pass: 4 rows, the last 1, 2 or 3
@pytest.mark.parametrize("out_f,in_f", [(4, 32), (6, 64), (160, 1536), (301, 256), (9, 288)])
def test_every_arm_isa_matches_the_float64_product(programs, out_f, in_f, m):
    blocks = _weights(out_f, in_f, out_f + in_f + m)
    w = gguf_dequantize(blocks, Q4_0).astype(np.float64)
    x = np.random.default_rng(m).standard_normal((m, in_f)).astype(np.float32)
    x[:, :32] *= 20.0
    y_ref = x.astype(np.float64) @ w.T
    bound = _error_bound("c", x.astype(np.float64), w, y_ref)
    for name, exe in programs.items():
        isa, y = _run(exe, blocks, x, out_f)
        assert isa == name, f"the {name} build runs the {isa} path"
        assert np.all(np.abs(y - y_ref) <= bound), f"{name}: worst {np.max(np.abs(y - y_ref) / bound):.3g} x bound"


def test_neon_paths_equal_the_portable_path(programs):
    blocks = _weights(300, 1536, 5)
    x = np.random.default_rng(1).standard_normal((5, 1536)).astype(np.float32)
    results = {name: (_run(exe, blocks, x, 300)[1], _run(exe, blocks, x[:1], 300)[1]) for name, exe in programs.items()}
    batch, single = results["portable"]
    for name, (b, s) in results.items():
        assert np.abs(b - batch).max() <= 1e-5 * np.abs(batch).max(), name
        assert np.abs(s - single).max() <= 1e-5 * np.abs(single).max(), name
