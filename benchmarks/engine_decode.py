"""Decode/prefill speed and memory of the engine, side by side with llama.cpp in the same run.

    python benchmarks/engine_decode.py --preset smallthinker-4b-a0.6b --threads 2 --json
    python benchmarks/engine_decode.py --package DIR --scenarios in-memory,budget --json

On a shared host (a VM whose neighbours come and go) one run of each can be off by 1.5x either
way: `--rounds N` runs the engine and both llama.cpp settings N times, interleaved round by
round, and reports each one's median run by decode speed, with every round's figures beside it;
prefill ratios compare each side's median prefill over the rounds (a run with the median decode
can hold an outlying prefill).

Scenarios (each engine run is a separate `stctl model bench` process, so RSS figures are its own;
every scenario runs the default package layout, dense ReGLU, and in-memory also the sparse one):
- in-memory: every weight resident; llama.cpp on the exported GGUF with its defaults.
- budget: `--budget` (default 1GiB) for dense + experts + KV, page cache dropped first;
  llama.cpp in a memory cgroup of the same size (cgroup v1, root), with its repacked copy off,
  once with its plain mmap and once with the mapping MADV_RANDOM (ratios use its better run);
  then the engine inside the same cgroup, its budget what the cap leaves after its own runtime
  baseline (RSS after importing torch and the engine and loading the kernels, before the
  package loads), so both processes face the same cap; once more there with `--no-lookahead`.
- prefetch: simulated `--storage-mbps` storage, a budget holding ~25% of the experts, prefetch
  off, on without look-ahead (`--no-lookahead`) and on as by default (with look-ahead); reports
  compute and read time per token and the overlap efficiency (t_off - t_on) / min(compute, read)
  of each.
- skew: the budget scenario again with `--router-skew` (a Zipf stand-in for hot experts).
- int4-cache: the torch-int4 fallback kernel (hosts without a C compiler) under the budget: its packed expert cache off (every read repacked), cold (first run: each expert read
  from its shard, packed and written once) and warm (each read one packed file).
- busy: in-memory again while one other CPU-bound process (a Python busy loop) runs beside it:
  the engine, llama.cpp at its defaults and with flash attention.
The in-memory scenario also measures the machine's memory read bandwidth in the same run
(`membw.c`, threads = --threads, best of 8 passes over 1 GiB) and states the decode limit it
implies: bandwidth / the weight bytes one decoded token streams (every layer's attention,
router and top-k experts, and the head). Every child (engine and peer) starts from the user's
environment (`llama_cpp_peer.peer_env`). Prints one JSON document; never asserts speed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from llama_cpp_peer import llama_cpp_available, measure_llama_cpp, peer_env  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
CGROUP = Path("/sys/fs/cgroup/memory")
# Left free under a memory cap besides the engine's budget and runtime baseline: the code pages
# the first forward pass touches (~15 MB, tests/test_memory_budget.py) and the file pages of
# header reads; at zero headroom the cgroup reclaims torch's code pages over and over.
CAP_HEADROOM = 64 << 20
SCENARIOS = ("in-memory", "busy", "budget", "prefetch", "skew", "int4-cache")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stctl(*args: str, timeout: float = 7200, env: dict | None = None) -> dict:
    # the engine starts from the user's environment too, and sets its own defaults
    proc = subprocess.run([sys.executable, "-m", "stctl.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**peer_env(), **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"stctl {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def ensure_package(args, sparse: bool) -> Path:
    """The preset with seeded random weights, standard layout or with expert down transposed."""
    if args.package:
        return Path(args.package)
    pkg = CACHE / f"{args.preset}-seed{args.seed}{'-sparse' if sparse else ''}"
    if not (pkg / "manifest.json").exists():
        log(f"building {pkg} (one-off)")
        stctl("model", "build", "--preset", args.preset, "--random-weights", "--seed", str(args.seed),
              "--out", str(pkg), "--json", *(["--sparse-down"] if sparse else []))
    return pkg


def ensure_gguf(pkg: Path) -> Path:
    gguf = CACHE / f"{pkg.name}.gguf"
    if not gguf.exists():
        log(f"exporting {gguf}")
        stctl("model", "export-gguf", str(pkg), str(gguf), "--json")
    return gguf


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


@contextmanager
def memory_cgroup(limit_bytes: int):
    """Run children of this block inside a cgroup-v1 memory limit (this process joins it meanwhile)."""
    group = CGROUP / f"st-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        (group / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield group
        finally:
            (CGROUP / "cgroup.procs").write_text(str(os.getpid()))
    finally:
        time.sleep(0.2)
        group.rmdir()


def cgroups_available() -> bool:
    return CGROUP.is_dir() and os.geteuid() == 0


def capped(limit_bytes: int, run: Callable[[], dict]) -> dict:
    """`run()` (which starts a child process) inside a memory cgroup of `limit_bytes`, page cache
    dropped first; adds what the cgroup saw (its peak includes page cache the child read)."""
    drop_caches()
    with memory_cgroup(limit_bytes) as group:
        try:
            result = run()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            result = {"error": str(e)}
        result.update(cgroup_limit_bytes=limit_bytes, cgroup=cgroup_figures(group))
    return result


def cgroup_figures(group: Path) -> dict:
    oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    return {"max_usage_bytes": int((group / "memory.max_usage_in_bytes").read_text()),
            "limit_hits": int((group / "memory.failcnt").read_text()), "oom_kills": int(oom.get("oom_kill", 0))}


def engine_run(pkg: Path, args, *extra: str, env: dict | None = None) -> dict:
    return stctl("model", "bench", str(pkg), "--threads", str(args.threads), "--tokens", str(args.tokens),
                 "--prompt-tokens", str(args.prompt_tokens), "--json", *extra, env=env)


def engine_under_cap(pkg: Path, args, cap_bytes: int, lookahead: bool = True) -> dict:
    """The engine in a child of this script whose budget is `cap_bytes` minus its own runtime baseline."""
    request = {"package": str(pkg), "cap_bytes": cap_bytes, "threads": args.threads, "tokens": args.tokens,
               "prompt_tokens": args.prompt_tokens, "root": str(ROOT), "lookahead": lookahead,
               "headroom_bytes": args.cap_headroom}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--engine-child"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=7200, env=peer_env())
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output (killed by the OOM killer?)"]
        raise RuntimeError(f"engine run failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout)


def _engine_child(request: dict) -> dict:
    sys.path.insert(0, request["root"])
    from model.bench import run_bench
    from model.kernels import backend
    from model.memory import current_rss_bytes

    backend()  # the kernels built and loaded: part of the runtime, like torch
    baseline = current_rss_bytes()
    budget = request["cap_bytes"] - baseline - request.get("headroom_bytes", CAP_HEADROOM)
    result = run_bench(request["package"], memory_budget_bytes=budget, threads=request["threads"],
                       tokens=request["tokens"], prompt_tokens=request["prompt_tokens"],
                       lookahead=request.get("lookahead", True))
    result.update(cap_bytes=request["cap_bytes"], runtime_baseline_rss_bytes=baseline,
                  headroom_bytes=request.get("headroom_bytes", CAP_HEADROOM))
    return result


def peer_run(gguf: Path, args, cgroup_bytes: int | None = None, **kw) -> dict | None:
    if args.skip_llama or not llama_cpp_available():
        return None
    prompt = list(range(10, 10 + args.prompt_tokens))

    def run() -> dict:
        return measure_llama_cpp(gguf, args.threads, prompt, args.tokens, **kw)

    if cgroup_bytes and cgroups_available():
        return capped(cgroup_bytes, run)
    try:
        return run()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}


def memory_bandwidth(threads: int) -> dict:
    """Best read bandwidth of this machine now (`membw.c`), or why it could not be measured."""
    exe = CACHE / "membw"
    try:
        if not exe.exists():
            subprocess.run(["gcc", "-O3", "-mavx2", "-fopenmp", str(ROOT / "benchmarks" / "membw.c"), "-o", str(exe)],
                           check=True, capture_output=True, timeout=120)
        proc = subprocess.run([str(exe), "1024", "8"], capture_output=True, text=True, timeout=600, check=True,
                              env={**peer_env(), "OMP_NUM_THREADS": str(threads)})
        return json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return {"error": str(e)}


def bytes_per_token(pkg: Path) -> int:
    """Weight bytes one decoded token streams: attention + router per layer, top-k experts, head."""
    cfg = json.loads((pkg / "manifest.json").read_text())["config"]
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    q_dim, kv_dim = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def q4(rows: int, cols: int) -> int:
        return rows * cols // 32 * 18

    layer = q4(q_dim + 2 * kv_dim, d) + q4(d, q_dim) + 4 * cfg["moe_num_primary_experts"] * d
    layer += cfg["moe_num_active_primary_experts"] * 3 * q4(cfg["moe_ffn_hidden_size"], d)
    return cfg["num_hidden_layers"] * layer + q4(cfg["vocab_size"], d)


@contextmanager
def busy_neighbour():
    """One other CPU-bound process for the duration of the block (a Python busy loop)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], env=peer_env())
    try:
        time.sleep(0.5)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=30)


def interleaved(runs: dict, rounds: int) -> tuple[dict, dict]:
    """Each of `runs` (name -> a function returning one run's figures, or None) `rounds` times, one
    of each per round, so a slow spell of a shared host falls on all of them alike. Returns, per
    name, the run with the median decode speed (a whole, real run), and every round's decode and
    prefill speeds."""
    seen: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            log(f"  round {r + 1}/{rounds}: {name}")
            result = run()
            if result is not None and "decode_tokens_per_s" in result:
                seen[name].append(result)
    median = {name: (sorted(rs, key=lambda x: x["decode_tokens_per_s"])[(len(rs) - 1) // 2] if rs else None)
              for name, rs in seen.items()}
    spread = {name: {"decode_tokens_per_s": [round(x["decode_tokens_per_s"], 2) for x in rs],
                     "prefill_tokens_per_s": [round(x["prefill_tokens_per_s"], 2) for x in rs]}
              for name, rs in seen.items()}
    return median, spread


def median_prefill(spread: dict, name: str) -> dict | None:
    """{"prefill_tokens_per_s": the median over the rounds of `name`}, or None without rounds."""
    runs = sorted(spread[name]["prefill_tokens_per_s"])
    return {"prefill_tokens_per_s": runs[(len(runs) - 1) // 2]} if runs else None


def ratio(ours: dict, peer: dict | None, key: str = "decode_tokens_per_s") -> float | None:
    if not peer or key not in peer or not peer[key] or key not in ours:
        return None
    return round(ours[key] / peer[key], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smallthinker-4b-a0.6b")
    ap.add_argument("--package", help="use this package instead of building the preset")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--budget", default="1GiB")
    ap.add_argument("--cap-headroom", type=int, default=CAP_HEADROOM,
                    help="bytes an engine in a memory cgroup leaves free besides budget and runtime")
    ap.add_argument("--storage-mbps", type=float, default=500.0)
    ap.add_argument("--router-skew", type=float, default=1.0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--rounds", type=int, default=1,
                    help="in-memory: run the engine and both llama.cpp settings this many times, interleaved, "
                         "and report the median run of each (a noisy shared host needs 3 or more)")
    ap.add_argument("--skip-llama", action="store_true", help="do not run the llama.cpp peer")
    ap.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    ap.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_child:
        print(json.dumps(_engine_child(json.load(sys.stdin))))
        return
    sys.path.insert(0, str(ROOT))
    from model.memory import parse_size

    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    pkg = ensure_package(args, sparse=False)  # the default layout: every scenario, and the GGUF export
    sparse_pkg = pkg if args.package else ensure_package(args, sparse=True)  # the in-memory sparse row
    gguf = ensure_gguf(pkg) if not args.skip_llama and llama_cpp_available() else None
    budget = parse_size(args.budget)
    report: dict = {"package": str(pkg), "sparse_package": str(sparse_pkg), "threads": args.threads, "tokens": args.tokens,
                    "prompt_tokens": args.prompt_tokens, "llama_cpp": llama_cpp_available() and not args.skip_llama}

    if "in-memory" in scenarios:
        log(f"in-memory: engine (dense ReGLU, HF layout) and llama.cpp (default, flash attention), "
            f"{args.rounds} round(s)")
        median, spread = interleaved({
            "engine_dense": lambda: engine_run(pkg, args),
            "llama_cpp": lambda: peer_run(gguf, args) if gguf else None,
            "llama_cpp_flash_attn": lambda: peer_run(gguf, args, flash_attn=True) if gguf else None,
        }, max(1, args.rounds))
        dense, peer, peer_fa = median["engine_dense"], median["llama_cpp"], median["llama_cpp_flash_attn"]
        prefill = {name: median_prefill(spread, name) for name in spread}
        log("in-memory: engine (sparse ReGLU)")
        ours = engine_run(sparse_pkg, args)
        log("in-memory: memory bandwidth")
        bandwidth = memory_bandwidth(args.threads)
        per_token = bytes_per_token(pkg)
        limit = bandwidth["gb_per_s"] * 1e9 / per_token if "gb_per_s" in bandwidth else None
        report["in_memory"] = {
            "engine_dense": dense, "engine_sparse": ours, "llama_cpp": peer, "llama_cpp_flash_attn": peer_fa,
            "decode_ratio": ratio(dense, peer), "decode_ratio_flash_attn": ratio(dense, peer_fa),
            "prefill_ratio": ratio(prefill["engine_dense"], prefill["llama_cpp"], "prefill_tokens_per_s"),
            "prefill_ratio_flash_attn": ratio(prefill["engine_dense"], prefill["llama_cpp_flash_attn"],
                                              "prefill_tokens_per_s"),
            "median_prefill_tokens_per_s": {name: p and p["prefill_tokens_per_s"] for name, p in prefill.items()},
            "peak_rss_ratio": ratio(dense, peer, "peak_rss_bytes"),
            "decode_ratio_sparse": ratio(ours, peer),
            "memory_bandwidth": bandwidth, "weight_bytes_per_token": per_token,
            "bandwidth_limit_tokens_per_s": limit,
            "fraction_of_bandwidth_limit": round(dense["decode_tokens_per_s"] / limit, 3) if limit else None,
            "rounds": max(1, args.rounds), "every_round": spread,
        }
        report["machine"] = dense["machine"]

    if "busy" in scenarios:
        with busy_neighbour():
            log("busy: engine beside one CPU-bound process")
            ours = engine_run(pkg, args)
            log("busy: llama.cpp beside one CPU-bound process")
            peer = peer_run(gguf, args) if gguf else None
            peer_fa = peer_run(gguf, args, flash_attn=True) if gguf else None
        report["busy"] = {"neighbour": "one Python busy loop", "engine": ours, "llama_cpp": peer,
                          "llama_cpp_flash_attn": peer_fa, "decode_ratio": ratio(ours, peer),
                          "decode_ratio_flash_attn": ratio(ours, peer_fa)}
        report.setdefault("machine", ours["machine"])

    if "budget" in scenarios:
        log(f"budget {args.budget}: engine")
        drop_caches()
        ours = engine_run(pkg, args, "--memory-budget", str(budget))
        log(f"budget {args.budget}: llama.cpp in a memory cgroup")
        peer = peer_run(gguf, args, cgroup_bytes=budget, extra_kwargs={"use_extra_bufts": False}) if gguf else None
        log(f"budget {args.budget}: llama.cpp in a memory cgroup, its mapping MADV_RANDOM")
        drop_caches()
        peer_random = (peer_run(gguf, args, cgroup_bytes=budget, extra_kwargs={"use_extra_bufts": False},
                                madvise_random=True) if gguf else None)
        best = max((p for p in (peer, peer_random) if p and "decode_tokens_per_s" in p),
                   key=lambda p: p["decode_tokens_per_s"], default=None)
        report["budget"] = {"budget_bytes": budget, "engine": ours, "llama_cpp": peer,
                            "llama_cpp_madvise_random": peer_random, "decode_ratio": ratio(ours, best)}
        log(f"budget {args.budget}: engine in the same memory cgroup, budget = cap - its runtime baseline")
        capped_ours = (capped(budget, lambda: engine_under_cap(pkg, args, budget)) if cgroups_available()
                       else {"skipped": f"needs root and the cgroup v1 memory controller at {CGROUP}"})
        report["budget"].update(engine_in_cgroup=capped_ours, decode_ratio_in_cgroup=ratio(capped_ours, best))
        if cgroups_available():
            log(f"budget {args.budget}: engine in the same memory cgroup, without look-ahead")
            capped_plain = capped(budget, lambda: engine_under_cap(pkg, args, budget, lookahead=False))
            report["budget"].update(engine_in_cgroup_no_lookahead=capped_plain,
                                    decode_ratio_in_cgroup_no_lookahead=ratio(capped_plain, best))
        report.setdefault("machine", ours["machine"])

    if "prefetch" in scenarios:
        probe = engine_run(pkg, args, "--tokens", "2")
        quarter = probe["dense_bytes"] + probe["expert_cache_bytes"] // 4 + probe["kv_cache_bytes"] + (64 << 20)
        runs = {}
        mode_flags = {"on": ["--no-lookahead"], "off": ["--no-prefetch"], "on_lookahead": []}
        for mode, extra in mode_flags.items():
            log(f"prefetch {mode}: simulated {args.storage_mbps} MB/s, budget {quarter}")
            flags = ["--memory-budget", str(quarter), "--storage-mbps", str(args.storage_mbps)]
            runs[mode] = engine_run(pkg, args, *flags, *extra)
        off = runs["off"]
        read = off["read_ms_per_token"]
        compute = off["decode_ms_per_token"] - read

        def efficiency(run: dict) -> float | None:
            saved = off["decode_ms_per_token"] - run["decode_ms_per_token"]
            return round(saved / min(compute, read), 3) if min(compute, read) > 0 else None

        report["prefetch"] = {
            "storage_mbps_simulated": args.storage_mbps, "budget_bytes": quarter, **runs,
            "compute_ms_per_token": compute, "read_ms_per_token": read,
            "overlap_efficiency": efficiency(runs["on"]),
            "overlap_efficiency_lookahead": efficiency(runs["on_lookahead"]),
        }

    if "skew" in scenarios:
        log(f"skew {args.router_skew}: engine under {args.budget}")
        drop_caches()
        report["skew"] = {"router_skew": args.router_skew,
                          "engine": engine_run(pkg, args, "--memory-budget", str(budget),
                                               "--router-skew", str(args.router_skew)),
                          "engine_lfu": engine_run(pkg, args, "--memory-budget", str(budget),
                                                   "--router-skew", str(args.router_skew), "--policy", "lfu")}

    if "int4-cache" in scenarios:
        report["int4_cache"] = {"budget_bytes": budget}
        with tempfile.TemporaryDirectory(prefix="st-packed-") as cache:
            for mode, root in (("off", "off"), ("cold", cache), ("warm", cache)):
                log(f"int4-cache {mode}: torch-int4 kernel under {args.budget}")
                drop_caches()
                started = time.perf_counter()
                run = engine_run(pkg, args, "--memory-budget", str(budget),
                                 env={"ST_KERNEL": "torch-int4", "ST_PACKED_CACHE": root})
                report["int4_cache"][mode] = {**run, "wall_seconds": round(time.perf_counter() - started, 2)}
        report.setdefault("machine", run["machine"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
