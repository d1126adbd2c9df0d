"""Speed and accuracy of the Q4_0 matrix-product backends (`model.kernels`), printed as JSON.

For each weight shape [out, in] and activation row count m it reports, per backend, the time of
one call (best of several timed batches: on a shared host the best batch is the least disturbed
one), the weight bytes streamed per second (the backend's own storage: Q4_0 blocks for `c`, the
repacked int4 + bf16 scales for `torch-int4`) and the relative error ||y - ref|| / ||ref||
against float32 `x @ dequantize(w).T`.

    PYTHONPATH=. python benchmarks/kernels.py --threads 2

`--sparse` instead times the sparse ReGLU kernels of the `c` backend for expert shapes DxF
(`--expert-shapes`, default the 4B model's 1536x768 and the demo's 256x256) at `--active`
(default 0.5) active rows: the dense GEMV of down [D, F] against the axpy over the active rows
of downT [F, D], the dense GEMV of up against the gathered GEMV of its active rows, and the
whole expert (`SparseReGLUExpert`, one native call) against three dense `Q4Matrix` calls plus
the torch relu/mul. Times are process CPU time per call (best batch), so with `--threads 1`
they are not inflated by other jobs on a shared host.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

from model.kernels import Q4Matrix, SparseReGLUExpert, describe  # before torch (model/runtime_env.py)
from model.kernels.build import native
from model.quant import dequantize_q4_0, quantize_q4_0

import torch

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


def cpu_time_call(fn, min_seconds: float, batches: int = 5) -> float:
    """Process CPU seconds per call of fn(): the best of `batches` batches."""
    fn()
    t0 = time.process_time()
    for _ in range(10):
        fn()
    once = max((time.process_time() - t0) / 10, 1e-7)
    reps = max(10, int(min_seconds / batches / once))
    samples = []
    for _ in range(batches):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        samples.append((time.process_time() - t0) / reps)
    return min(samples)


def bench_sparse(d: int, f: int, active: float, min_seconds: float) -> dict:
    """Sparse ReGLU kernels vs their dense counterparts for one expert shape (D, F)."""
    lib = native()
    gen = torch.Generator().manual_seed(d * 3 + f)
    gate, up, down = (quantize_q4_0(torch.randn(*shape, generator=gen) * 0.02) for shape in ((f, d), (f, d), (d, f)))
    down_t = quantize_q4_0(dequantize_q4_0(down).t().contiguous())
    x = torch.randn(1, d, generator=gen)
    # gate rows are made active with probability `active` by flipping the sign of the others' weights
    g = x @ dequantize_q4_0(gate).t()
    keep = torch.rand(f, generator=gen) < active
    flip = (g[0] > 0) != keep
    gate = quantize_q4_0(dequantize_q4_0(gate) * torch.where(flip, -1.0, 1.0).unsqueeze(1))
    gate_m, up_m, down_m = Q4Matrix(gate, "c"), Q4Matrix(up, "c"), Q4Matrix(down, "c")
    expert = SparseReGLUExpert(gate, up, down_t, kernel="c")
    out, n_active = expert(x)
    rows = (gate_m(x)[0] > 0).nonzero().flatten().to(torch.int32)
    coeffs = torch.randn(rows.numel(), generator=gen)
    y_d, y_f = torch.empty(d), torch.empty(f)
    xq = torch.empty(d // 32 * 36 + f // 32 * 36, dtype=torch.uint8)
    p = lambda t: t.data_ptr()  # noqa: E731

    def three_dense():
        a = gate_m(x).relu_().mul_(up_m(x))
        return down_m(a)

    dense = three_dense()
    times = {
        "down_dense_gemv": cpu_time_call(lambda: lib.st_q4_0_matmul(p(down), d, f, p(x), 1, p(y_d), p(xq)), min_seconds),
        "downT_axpy_active": cpu_time_call(
            lambda: lib.st_q4_0_axpy_rows(p(down_t), f, d, p(rows), p(coeffs), rows.numel(), p(y_d)), min_seconds),
        "up_dense_gemv": cpu_time_call(lambda: lib.st_q4_0_matmul(p(up), f, d, p(x), 1, p(y_f), p(xq)), min_seconds),
        "up_matvec_rows_active": cpu_time_call(
            lambda: lib.st_q4_0_matvec_rows(p(up), f, d, p(rows), rows.numel(), p(x), p(y_f), p(xq)), min_seconds),
        "expert_three_dense_calls": cpu_time_call(three_dense, min_seconds),
        "expert_sparse_fused": cpu_time_call(lambda: expert(x), min_seconds),
    }
    return {
        "expert_shape_DxF": [d, f],
        "active_rows": n_active,
        "active_fraction": round(n_active / f, 3),
        "us_cpu": {k: round(v * 1e6, 2) for k, v in times.items()},
        "ratio_axpy_vs_dense_down": round(times["downT_axpy_active"] / times["down_dense_gemv"], 3),
        "ratio_rows_vs_dense_up": round(times["up_matvec_rows_active"] / times["up_dense_gemv"], 3),
        "ratio_fused_vs_three_dense": round(times["expert_sparse_fused"] / times["expert_three_dense_calls"], 3),
        # differs by the transposed down's second rounding and the coefficient rounding
        "fused_vs_dense_rel_diff": float(f"{rel_error(out, dense):.3g}"),
    }


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


def bench_dram(out_f: int, in_f: int, total_bytes: int, batches: int = 5) -> list[dict]:
    """Matvec (m = 1) from DRAM on the `c` backend, GGML row order vs x4: enough copies of the
    matrix to fill `total_bytes` (past the last-level cache), called in rotation; the best of
    `batches` passes. Wall time per call includes the Python call (~5 us)."""
    gen = torch.Generator().manual_seed(out_f + in_f)
    blocks = quantize_q4_0(torch.randn(out_f, in_f, generator=gen) * 0.02)
    x = torch.randn(1, in_f, generator=gen)
    copies = max(2, total_bytes // blocks.numel())
    results = []
    for layout in ("rows", "x4"):
        mats = [Q4Matrix(blocks.clone(), "c", layout=layout) for _ in range(copies)]
        for mat in mats:  # touch every copy once
            mat(x)
        best = float("inf")
        for _ in range(batches):
            t0 = time.perf_counter()
            for mat in mats:
                mat(x)
            best = min(best, (time.perf_counter() - t0) / copies)
        results.append({"shape": [out_f, in_f], "m": 1, "layout": layout, "copies": copies,
                        "us": round(best * 1e6, 2), "weight_gbps": round(blocks.numel() / best / 1e9, 2)})
        del mats
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON (the default; kept for symmetry with other benchmarks)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing budget per (shape, m, backend)")
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="comma-separated OUTxIN")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated activation row counts m")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    parser.add_argument("--sparse", action="store_true", help="time the sparse ReGLU kernels instead (see above)")
    parser.add_argument("--expert-shapes", default="1536x768,256x256", help="comma-separated DxF for --sparse")
    parser.add_argument("--active", type=float, default=0.5, help="fraction of active rows for --sparse")
    parser.add_argument("--dram", action="store_true",
                        help="time m = 1 products from DRAM instead, GGML row order vs x4 (see bench_dram)")
    parser.add_argument("--dram-mib", type=int, default=768, help="bytes of matrix copies for --dram, in MiB")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sparse:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.expert_shapes.split(",")]
        print(json.dumps({
            "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "results": [bench_sparse(d, f, args.active, args.seconds) for d, f in shapes],
        }, indent=1))
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.dram:
        print(json.dumps({
            "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "kernel_path": describe(),
                        "cflags": os.environ.get("ST_KERNEL_CFLAGS", "")},
            "results": [r for o, i in shapes for r in bench_dram(o, i, args.dram_mib << 20)],
        }, indent=1))
        return
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
