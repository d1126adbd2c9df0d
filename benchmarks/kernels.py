"""Speed and accuracy of the Q4_0 matrix-product backends (`model.kernels`), printed as JSON.

For each weight shape [out, in] and activation row count m it reports, per backend, the time of
one call (best of several timed batches: on a shared host the best batch is the least disturbed
one), the weight bytes streamed per second (the backend's own storage: Q4_0 blocks for `c`, the
repacked int4 + bf16 scales for `torch-int4`) and the relative error ||y - ref|| / ||ref||
against float32 `x @ dequantize(w).T`.

    PYTHONPATH=. python benchmarks/kernels.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from model.kernels import Q4Matrix
from model.quant import dequantize_q4_0, quantize_q4_0

SHAPES = ((768, 1536), (1536, 768), (1536, 1536), (151936, 1536))
ROWS = (1, 8, 64)
BACKENDS = ("c", "torch-int4")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_call(fn, x: torch.Tensor, min_seconds: float, batches: int = 5) -> float:
    """Seconds per call: the best of `batches` batches each lasting about min_seconds / batches."""
    fn(x)  # warm up: compile, first-touch the output and scratch buffers
    t0 = time.perf_counter()
    fn(x)
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(min_seconds / batches / once))
    samples = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(x)
        samples.append((time.perf_counter() - t0) / reps)
    return min(samples)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(y.double() - ref.double()) / torch.linalg.vector_norm(ref.double()))


def bench_shape(out_f: int, in_f: int, rows: tuple[int, ...], backends: tuple[str, ...], min_seconds: float) -> list[dict]:
    gen = torch.Generator().manual_seed(out_f * 7 + in_f)
    blocks = quantize_q4_0(torch.randn(out_f, in_f, generator=gen) * 0.02)
    w_ref = dequantize_q4_0(blocks)
    mats = {name: Q4Matrix(blocks, kernel=name) for name in backends}
    results = []
    for m in rows:
        x = torch.randn(m, in_f, generator=gen)
        ref = x @ w_ref.t()
        for name, mat in mats.items():
            seconds = time_call(mat, x, min_seconds)
            results.append({
                "shape": [out_f, in_f],
                "m": m,
                "backend": name,
                "us": round(seconds * 1e6, 2),
                "weight_gbps": round(mat.nbytes / seconds / 1e9, 2),
                "rel_error": float(f"{rel_error(mat(x), ref):.3g}"),
            })
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON (the default; kept for symmetry with other benchmarks)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing budget per (shape, m, backend)")
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="comma-separated OUTxIN")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated activation row counts m")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = tuple(int(v) for v in args.rows.split(","))
    backends = tuple(args.backends.split(","))

    report = {
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "results": [r for o, i in shapes for r in bench_shape(o, i, rows, backends, args.seconds)],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
