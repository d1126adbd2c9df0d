"""How fast this disk delivers whole expert files the way the expert store reads them.

    python benchmarks/expert_reads.py PACKAGE --json

One O_DIRECT `preadv` per expert file into an aligned buffer (`model.direct_io`), page cache
dropped first (as root), with 1 and 2 reader threads (the store runs 2; `--readers` for others). The result is the I/O
ceiling of decoding under a memory budget: tokens/s <= MB/s / (MB of experts missed per token).
Prints one JSON document; never asserts speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def read_all(files: list[Path], readers: int) -> dict:
    from model.direct_io import WholeFileReader, align_up, aligned_bytes

    sizes = {f: f.stat().st_size for f in files}
    work = iter(files)
    lock = threading.Lock()
    direct: list[bool] = []

    def reader() -> None:
        image = aligned_bytes(align_up(max(sizes.values())))
        image.zero_()  # resident before the clock starts, as the store's slots are
        files_reader = WholeFileReader()
        while True:
            with lock:
                path = next(work, None)
            if path is None:
                direct.append(bool(files_reader.direct))
                return
            files_reader.read(path, sizes[path], image)

    threads = [threading.Thread(target=reader) for _ in range(readers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    total = sum(sizes.values())
    return {"readers": readers, "files": len(files), "bytes": total, "seconds": round(seconds, 3),
            "mb_per_s": round(total / seconds / 1e6, 1), "o_direct": all(direct)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", help="a model package directory")
    ap.add_argument("--files", type=int, default=400, help="expert files to read per run")
    ap.add_argument("--readers", default="1,2", help="reader thread counts to run, e.g. 1,2,4")
    ap.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    args = ap.parse_args()
    from model.bench import cpu_model
    from model.package import read_manifest

    pkg = Path(args.package)
    experts = [pkg / e.file for e in read_manifest(pkg).expert_shards()]
    runs = []
    for i, readers in enumerate(int(r) for r in args.readers.split(",")):
        start = i * args.files % len(experts)
        chosen = experts[start:start + args.files]  # other files each run: none comes from an earlier run's cache
        dropped = drop_caches()
        runs.append({**read_all(chosen, readers), "page_cache_dropped": dropped})
    print(json.dumps({"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "system": platform.platform()},
                      "package": str(pkg), "expert_file_bytes": experts[0].stat().st_size, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
