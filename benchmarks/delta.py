"""Bytes shipped by a delta update, publish time and verify throughput, printed as JSON.

Builds st-demo 1.0.0 and 2.0.0 (variant 2 changes a quarter of the expert shards; or pass
`--packages V1 V2`), publishes both into a fresh workspace (timed), serves the repository on
127.0.0.1 and measures what a device moves:
- `delta_bytes`: a device holding 1.0.0 updates to 2.0.0 (every byte received: metadata,
  manifest, changed shards), against `full_bytes` (a fresh device fetching 2.0.0) and against
  `zstd_patch_bytes`, `zstd -19 --long --patch-from` of 1.0.0's shards concatenated into one
  model file applied to 2.0.0's (the best a whole-file binary delta does, without resume or
  per-shard verification); `bundle_delta_bytes` is the offline bundle for the same update;
- `verify_gb_per_s`: python-tuf's `TargetFile.verify_length_and_hashes` over 2.0.0's shard bytes
  (what the client runs on every download) against plain `hashlib.sha256` on the same bytes.

    PYTHONPATH=. python benchmarks/delta.py --json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tuf.api.metadata import TargetFile

from agent.blobstore import BlobStore
from agent.tuf_client import ReleaseClient
from manifests.release import package_files
from model.build import build_demo
from model.package import read_manifest
from stctl.bootstrap import init_workspace
from stctl.bundle import export_bundle
from stctl.delta import diff_manifests
from stctl.repository import Repository
from stctl.serve import make_server

MIN_TIMED_SECONDS = 0.5


def concatenated(package: Path, out: Path) -> Path:
    with open(out, "wb") as f:
        for file, _, _ in package_files(read_manifest(package)):
            f.write((package / file).read_bytes())
    return out


def zstd_patch_bytes(old: Path, new: Path, work: Path) -> int | None:
    if shutil.which("zstd") is None:
        return None
    patch = work / "patch.zst"
    subprocess.run(["zstd", "-q", "-f", "-19", "--long=27", f"--patch-from={old}", str(new), "-o", str(patch)],
                   check=True, capture_output=True)
    return patch.stat().st_size


def throughput(fn, blobs: list[bytes]) -> float:
    """GB/s of `fn` over every blob, best of repeated passes lasting at least MIN_TIMED_SECONDS in total."""
    total = sum(len(b) for b in blobs)
    best, spent = float("inf"), 0.0
    while spent < MIN_TIMED_SECONDS:
        start = time.perf_counter()
        for blob in blobs:
            fn(blob)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return total / best / 1e9


def fetch(ws, url: str, device: Path, versions: list[str]):
    store = BlobStore(device / "store")
    root = (ws.metadata_dir / "1.root.json").read_bytes()
    return [ReleaseClient(device / "tuf", url, root, store).fetch_release("st-demo", v) for v in versions]


def run(packages: tuple[Path, Path] | None, work: Path) -> dict:
    if packages is None:
        packages = (work / "v1", work / "v2")
        build_demo(packages[0], variant=1)
        build_demo(packages[1], variant=2)
    ws = init_workspace(work / "fleet")
    repo = Repository(ws)
    publish_s = []
    for package in packages:
        start = time.perf_counter()
        repo.publish(package)
        publish_s.append(time.perf_counter() - start)
    server = make_server(ws.repository, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _, update = fetch(ws, url, work / "device-a", ["1.0.0", "2.0.0"])
        (full,) = fetch(ws, url, work / "device-b", ["2.0.0"])
    finally:
        server.shutdown()
        server.server_close()
    old, new = read_manifest(packages[0]), read_manifest(packages[1])
    delta = diff_manifests(old, new)
    bundle = export_bundle(ws, "st-demo", "2.0.0", work / "v2.bundle", from_version="1.0.0")
    old_file, new_file = concatenated(packages[0], work / "v1.bin"), concatenated(packages[1], work / "v2.bin")
    patch = zstd_patch_bytes(old_file, new_file, work)
    blobs = [(packages[1] / file).read_bytes() for file, _, _ in package_files(new)]
    infos = {id(b): TargetFile.from_data("blob", b) for b in blobs}
    tuf_gbps = throughput(lambda b: infos[id(b)].verify_length_and_hashes(b), blobs)
    sha_gbps = throughput(lambda b: hashlib.sha256(b).digest(), blobs)
    return {
        "model_bytes": new.total_bytes,
        "shards": len(new.shards),
        "changed_shards": len(delta.changed_shards),
        "changed_shard_bytes": delta.bytes_to_ship,
        "delta_bytes": update.bytes_downloaded,
        "delta_metadata_bytes": update.metadata_bytes,
        "full_bytes": full.bytes_downloaded,
        "zstd_patch_bytes": patch,
        "bundle_delta_bytes": bundle["bundle_bytes"],
        "delta_vs_full": round(update.bytes_downloaded / full.bytes_downloaded, 4),
        "delta_vs_zstd_patch": round(update.bytes_downloaded / patch, 4) if patch else None,
        "publish_seconds": {"v1": round(publish_s[0], 3), "v2": round(publish_s[1], 3)},
        "verify_gb_per_s": {"tuf_verify_length_and_hashes": round(tuf_gbps, 3), "sha256": round(sha_gbps, 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", nargs=2, type=Path, metavar=("V1", "V2"),
                        help="Use these packages instead of building the demo.")
    parser.add_argument("--json", action="store_true", help="Print only the JSON result.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="delta-bench-") as tmp:
        result = run(tuple(args.packages) if args.packages else None, Path(tmp))
    if not args.json:
        print(f"v1 -> v2: {result['delta_bytes']} bytes shipped of {result['full_bytes']} "
              f"({result['delta_vs_full']:.1%}); zstd --patch-from: {result['zstd_patch_bytes']}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
