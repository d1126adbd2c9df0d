"""`stctl demo`: the main job on the built-in default, end to end, in a temporary directory.

Rule: the demo uses only public library calls (the same ones the commands use), cleans up
everything it started, and reports figures it measured in this run.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from model import Engine
from model.build import build_demo
from model.health import check_golden

DEMO_PROMPTS = ("Line 4 torque check:", "Conveyor B status report:", "Shift handover notes:")


def run_demo(work_dir: Path | None = None, *, tokens: int = 24, say: Callable[[str], None] = print,
             progress=None) -> dict:
    """Build demo v1 and v2, check their golden outputs, generate, and compare what a delta ships."""
    owned = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="stctl-demo-")) if owned else Path(work_dir)
    try:
        say(f"workspace: {root}")
        packages = {}
        for variant in (1, 2):
            out = root / f"st-demo-v{variant}"
            manifest = build_demo(out, variant=variant, progress=progress)
            packages[manifest.version] = (out, manifest)
            say(f"built st-demo {manifest.version}: {len(manifest.shards)} shards, {manifest.total_bytes} bytes")
        (_, old), (_, new) = packages.values()
        old_blobs = {s.sha256 for s in old.shards}
        changed = [s for s in new.shards if s.sha256 not in old_blobs]
        result: dict = {"versions": [], "bytes_shipped": sum(s.size for s in changed),
                        "bytes_full": new.total_bytes, "changed_shards": len(changed)}
        say(f"delta 1.0.0 -> 2.0.0: {len(changed)} changed shards, {result['bytes_shipped']} of "
            f"{result['bytes_full']} bytes")
        for version, (path, manifest) in packages.items():
            engine = Engine.load(path)
            health = check_golden(engine, manifest.health)
            completions = []
            for prompt in DEMO_PROMPTS:
                ids = engine.tokenizer.encode(prompt)
                out = list(engine.generate(ids, tokens, temperature=0.8, seed=7))
                completions.append({"prompt": prompt, "text": engine.tokenizer.decode(out), **engine.last_stats})
            tps = sorted(c["decode_tokens_per_s"] for c in completions)[len(completions) // 2]
            rss = max(c["peak_rss_bytes"] for c in completions)
            result["versions"].append({"version": version, "health_passed": health.passed,
                                       "decode_tokens_per_s": tps, "peak_rss_bytes": rss,
                                       "completions": completions})
            say(f"st-demo {version}: health {'passed' if health.passed else 'FAILED'}, "
                f"decode {tps:.1f} tok/s, peak RSS {rss / 2**20:.0f} MiB")
        return result
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
