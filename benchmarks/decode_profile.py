"""Where one decoded token's time goes: router, attention half, experts, lm_head, the rest.

    python benchmarks/decode_profile.py PACKAGE [--threads 2] [--tokens 40] [--position 64] [--split] --json

Loads the package with every weight resident, prefills `--position` tokens, then decodes the
token at that position `--tokens` times (the KV cache is rewound each time, so every run does the
same work) with a timer around each native call. With every expert resident a layer is one
native call (`st_layer_decode`); `--split` runs the three calls it stands for instead (router,
attention half, experts), timed apart. Timers add ~1 us per call.
Prints one JSON document; never asserts speed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import Engine  # noqa: E402  (before torch: model sets torch's thread policy, see model/runtime_env.py)
from model.bench import cpu_model  # noqa: E402

import torch  # noqa: E402


def timed(obj, name: str, bucket: str, spent: Counter) -> None:
    call = getattr(obj, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter_ns()
        try:
            return call(*args, **kwargs)
        finally:
            spent[bucket] += time.perf_counter_ns() - started

    setattr(obj, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--position", type=int, default=64)
    ap.add_argument("--split", action="store_true", help="time router, attention and experts apart (3 calls a layer)")
    ap.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    args = ap.parse_args()

    engine = Engine.load(args.package, threads=args.threads)
    tf = engine.transformer
    if any(b.fast is None for b in tf.blocks):
        sys.exit("decode_profile: this package's layers do not run on the native kernel (q4_0 and a C compiler needed)")
    if args.split:
        for block in tf.blocks:
            block.fast.unbind_experts()
    tf.setup_caches(args.position + 1)
    tf.forward(torch.arange(args.position) % engine.config.vocab_size)
    spent: Counter = Counter()
    for block in tf.blocks:
        timed(block.fast, "route", "router", spent)
        timed(block.fast, "attend", "attention", spent)
        timed(block.fast, "moe", "experts", spent)  # a layer's resident experts, one call
        timed(block.fast, "decode", "layers (one call each)", spent)  # the whole layer, every expert resident
    for expert in {id(s.weights): s.weights for s in tf.experts.slots}.values():
        timed(expert, "accumulate", "experts", spent)
    timed(tf, "head", "lm_head", spent)

    def one_token() -> None:
        tf.pos = args.position
        for cache in tf.caches:
            cache.length = args.position
        tf.forward(torch.tensor([1]))

    one_token()
    spent.clear()
    started = time.perf_counter()
    for _ in range(args.tokens):
        one_token()
    total_ms = (time.perf_counter() - started) / args.tokens * 1e3
    parts = {k: round(v / args.tokens / 1e6, 3) for k, v in spent.items()}
    parts["other"] = round(total_ms - sum(parts.values()), 3)
    print(json.dumps({
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "kernel": engine.kernel},
        "package": args.package, "position": args.position, "tokens": args.tokens,
        "ms_per_token": round(total_ms, 3), "tokens_per_s": round(1e3 / total_ms, 2), "ms_by_part": parts,
        "native_calls_per_layer": 1 if all(b.fast.has_experts for b in tf.blocks) else 3,
    }, indent=2))


if __name__ == "__main__":
    main()
