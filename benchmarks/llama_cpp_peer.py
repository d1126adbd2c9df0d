"""llama.cpp as the peer the engine's speed and memory are compared against.

`measure_llama_cpp` runs llama.cpp (through llama-cpp-python) on a GGUF in a child process, so the
peak RSS it reports is llama.cpp's alone, never mixed with the caller's, and the child runs with
the environment as the user had it (`peer_env`): nothing this project sets (such as the
`OMP_WAIT_POLICY` that importing `model` adds) reaches llama.cpp, which runs at its own defaults. It returns None when
llama_cpp is not installed. Timing follows the engine's: prefill is one forward over the prompt;
decode is greedy, one forward per token, timed without the argmax.

    python benchmarks/llama_cpp_peer.py --package /tmp/x/demo-v1 --threads 2 --prompt-len 64 --decode 32
    python benchmarks/llama_cpp_peer.py --gguf model.gguf --threads 2 --json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD_TIMEOUT_S = 1800.0
# Variables that change how llama.cpp's threads wait or how many there are: the report lists them.
ENV_REPORTED = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "GGML_NUMA")


def peer_env() -> dict[str, str]:
    """The environment a peer runs with: this process's, less what the `model` library added."""
    if "model.runtime_env" in sys.modules:
        return sys.modules["model.runtime_env"].foreign_env()
    return dict(os.environ)  # `model` never loaded here: nothing of ours was added


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def measure_llama_cpp(gguf_path: str | Path, threads: int, prompt_ids: list[int], n_decode: int,
                      flash_attn: bool = False, extra_kwargs: dict | None = None, madvise_random: bool = False,
                      timeout_s: float = CHILD_TIMEOUT_S) -> dict | None:
    """Prefill and decode tokens/s and peak RSS of llama.cpp on `gguf_path`; None without llama_cpp.

    `extra_kwargs` go to `llama_cpp.Llama(...)` as they are (JSON-serialisable values only), except
    `use_extra_bufts` (False = llama.cpp's `--no-repack`), which is set in the model parameters.
    `madvise_random` marks llama.cpp's mapping of the file MADV_RANDOM after loading (no
    read-ahead: under a memory cap each fault reads one page instead of a window).
    """
    if not llama_cpp_available():
        return None
    if threads < 1 or n_decode < 0 or not prompt_ids:
        raise ValueError("threads >= 1, n_decode >= 0 and a non-empty prompt are required")
    request = {"gguf_path": str(gguf_path), "threads": threads, "prompt_ids": [int(i) for i in prompt_ids],
               "n_decode": n_decode, "flash_attn": flash_attn, "extra_kwargs": extra_kwargs or {},
               "madvise_random": madvise_random}
    return _spawn_child("--child", request, timeout_s)


def child_environment(names: tuple[str, ...] = ENV_REPORTED) -> dict[str, str | None]:
    """The values of `names` in a child started exactly as the peer is (for the tests)."""
    return _spawn_child("--child-env", {"names": list(names)}, 60.0)


def _spawn_child(mode: str, request: dict, timeout_s: float) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), mode], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout_s, env=peer_env())
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"llama.cpp run failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout)


# ---- the child: everything below runs in its own process ---------------------------------------
def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _madvise_random(path: str) -> int:
    """MADV_RANDOM on every mapping of `path` in this process; returns how many bytes it covered."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target, covered = str(Path(path).resolve()), 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if libc.madvise(start, end - start, mmap.MADV_RANDOM) == 0:
                    covered += end - start
    return covered


def _run_child(req: dict) -> dict:
    import time

    import llama_cpp
    import numpy as np

    prompt, n_decode = req["prompt_ids"], req["n_decode"]
    extra = dict(req["extra_kwargs"])
    if "use_extra_bufts" in extra:  # llama.cpp's --no-repack; not a Llama() argument, so set it in the defaults
        use_extra_bufts = bool(extra.pop("use_extra_bufts"))
        defaults = llama_cpp.llama_model_default_params

        def patched_defaults():
            params = defaults()
            params.use_extra_bufts = use_extra_bufts
            return params

        llama_cpp.llama_model_default_params = patched_defaults
        llama_cpp.llama.llama_cpp.llama_model_default_params = patched_defaults
    rss_before_load = _peak_rss_bytes()
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=req["gguf_path"], n_ctx=len(prompt) + n_decode + 1, n_batch=len(prompt), n_ubatch=len(prompt),
        n_threads=req["threads"], n_threads_batch=req["threads"], flash_attn=req["flash_attn"], verbose=False,
        **extra,
    )
    load_s = time.perf_counter() - start
    advised = _madvise_random(req["gguf_path"]) if req.get("madvise_random") else 0
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    start = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - start
    decode_s, generated = 0.0, []
    for _ in range(n_decode):
        generated.append(greedy())
        start = time.perf_counter()
        llm.eval(generated[-1:])
        decode_s += time.perf_counter() - start
    return {
        "runtime": "llama.cpp", "llama_cpp_python_version": llama_cpp.__version__, "gguf_path": req["gguf_path"],
        "threads": req["threads"], "flash_attn": req["flash_attn"], "prompt_tokens": len(prompt),
        "decode_tokens": n_decode, "load_s": load_s, "prefill_ms": prefill_s * 1e3,
        "prefill_tokens_per_s": len(prompt) / prefill_s if prefill_s > 0 else 0.0,
        "decode_ms": decode_s * 1e3, "decode_tokens_per_s": n_decode / decode_s if decode_s > 0 else 0.0,
        "peak_rss_bytes": _peak_rss_bytes(), "rss_before_load_bytes": rss_before_load,
        "madvise_random_bytes": advised,
        "environment": {name: os.environ.get(name) for name in ENV_REPORTED},
        "generated_ids": generated,
    }


# ---- command line ----------------------------------------------------------------------------
def default_prompt(n: int) -> list[int]:
    """A fixed prompt of byte-range ids (every package's vocabulary covers 0-255)."""
    return [(17 * i + 5) % 256 for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure llama.cpp decode/prefill speed and peak RSS; prints JSON.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--gguf", help="a GGUF file")
    src.add_argument("--package", help="a model package directory, exported to a temporary GGUF first")
    src.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    src.add_argument("--child-env", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--flash-attn", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON (the only output format; kept for symmetry)")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_run_child(json.load(sys.stdin))))
        return 0
    if args.child_env:
        print(json.dumps({name: os.environ.get(name) for name in json.load(sys.stdin)["names"]}))
        return 0
    if not (args.gguf or args.package):
        p.error("give --gguf or --package")
    if not llama_cpp_available():
        print(json.dumps({"runtime": "llama.cpp", "skipped": "llama_cpp (llama-cpp-python) is not installed"}))
        return 0
    prompt = default_prompt(args.prompt_len)
    if args.gguf:
        result = measure_llama_cpp(args.gguf, args.threads, prompt, args.decode, args.flash_attn)
    else:
        from model.gguf_export import export_gguf

        with tempfile.TemporaryDirectory() as tmp:
            gguf_path = Path(tmp) / "model.gguf"
            export_gguf(args.package, gguf_path)
            result = measure_llama_cpp(gguf_path, args.threads, prompt, args.decode, args.flash_attn)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
