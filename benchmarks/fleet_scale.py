"""The fleet server under many calling-home devices: poll and report load, jittered.

    python benchmarks/fleet_scale.py --devices 1000 --poll-s 10 --seconds 60 --json

What runs: a fresh workspace with `--devices` devices enrolled (real device certificates), the
real fleet server as its own process (`stctl server serve`, so its RSS and CPU are its own), and
light devices in this process: each polls `POST /v1/call-home/poll` over mTLS with its own
certificate, a new TLS connection per poll (as a device polling every few minutes would), with
a report carrying its status and one telemetry row, every `--poll-s` seconds stretched by a
random jitter of up to 10% and started at a random offset (no synchronised herd). The light
devices skip the engine and the update path: this measures the server's poll and report path
only; a rollout to light devices is not exercised (the update path needs real agents:
benchmarks/rollout_scale.py runs those).

Prints one JSON document: requests/s served, latency percentiles, errors, the per-second request
histogram (shows whether polls bunch), the server's peak RSS and CPU seconds, and the machine.
Never asserts anything.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from manifests.enrollment import Enrollment  # noqa: E402
from stctl.agent_process import free_ports  # noqa: E402
from stctl.bootstrap import init_workspace  # noqa: E402
from stctl.enroll import enroll_device  # noqa: E402


def stctl_command() -> list[str]:
    script = Path(sys.executable).with_name("stctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "stctl.cli"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def proc_figures(pid: int) -> dict:
    """Peak RSS (VmHWM) and CPU seconds of a live process (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"peak_rss_bytes": hwm, "cpu_s": round((int(fields[11]) + int(fields[12])) / ticks, 2)}


def enroll_all(ws, devices: int, server_url: str, work: Path) -> list[tuple[str, str, str]]:
    """(name, cert file, key file) of each enrolled device."""
    out = []
    for i in range(devices):
        name = f"pc{i:04d}"
        path = work / f"{name}.enroll"
        enroll_device(ws, name, "https://127.0.0.1:1", path, "http://127.0.0.1:1", server_url=server_url)
        e = Enrollment.from_bytes(path.read_bytes())
        cert, key = work / f"{name}.crt", work / f"{name}.key"
        cert.write_text(e.device_cert_pem)
        key.write_text(e.device_key_pem)
        out.append((name, str(cert), str(key)))
    return out


def wait_up(url: str, ca: str, server: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the fleet server exited with {server.returncode}")
        try:
            with requests.Session() as s:
                s.trust_env = False
                if s.get(f"{url}/healthz", verify=ca, timeout=2).status_code == 200:
                    return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise SystemExit("the fleet server did not come up")


def run_load(url: str, ca: str, devices: list[tuple[str, str, str]], poll_s: float, seconds: float,
             workers: int, seed: int) -> dict:
    """Every device polls every poll_s (+ up to 10% jitter) from a random start, for `seconds`."""
    rnd = random.Random(seed)
    start = time.monotonic()
    due = [(start + rnd.uniform(0, poll_s), i) for i in range(len(devices))]
    heapq.heapify(due)
    seqs = [0] * len(devices)
    lock = threading.Lock()
    latencies: list[float] = []
    started_at: list[float] = []
    errors: dict[str, int] = {}
    end = start + seconds

    def poll(i: int) -> None:
        name, cert, key = devices[i]
        seqs[i] += 1
        now = time.time()
        body = {"device": name, "seq": seqs[i], "sent_at": now, "active": {"model": "st-demo", "version": "1.0.0"},
                "telemetry": {"generations": [{"ts": now, "model": "st-demo", "version": "1.0.0",
                                               "prompt_tokens": 8, "completion_tokens": 16,
                                               "decode_tokens_per_s": 40.0, "peak_rss_bytes": 300_000_000}]}}
        t0 = time.monotonic()
        outcome = None
        try:
            with requests.Session() as s:  # a new TLS connection per poll
                s.trust_env = False
                r = s.post(f"{url}/v1/call-home/poll", json=body, cert=(cert, key), verify=ca, timeout=30)
                outcome = None if r.status_code == 200 else f"http {r.status_code}"
        except requests.RequestException as e:
            outcome = type(e).__name__
        with lock:
            started_at.append(t0 - start)
            if outcome is None:
                latencies.append(time.monotonic() - t0)
            else:
                errors[outcome] = errors.get(outcome, 0) + 1

    def worker() -> None:
        while True:
            with lock:
                if not due:
                    return
                when, i = heapq.heappop(due)
                if when >= end:
                    return
            delay = when - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            poll(i)
            with lock:
                heapq.heappush(due, (when + poll_s * (1 + rnd.uniform(0, 0.1)), i))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    per_second = [0] * (int(elapsed) + 1)
    for t in started_at:
        per_second[int(t)] += 1
    lat = sorted(latencies)
    q = (lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1)) if lat else (lambda p: None)
    steady = per_second[int(poll_s):-1] or per_second
    return {"polls_ok": len(latencies), "errors": errors, "seconds": round(elapsed, 1),
            "requests_per_s": round(len(started_at) / elapsed, 1),
            "expected_requests_per_s": round(len(devices) / (poll_s * 1.05), 1),
            "latency_ms": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": q(1.0)},
            "per_second_requests": per_second,
            "per_second_after_first_interval": {"min": min(steady), "median": statistics.median(steady),
                                                "max": max(steady)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--poll-s", type=float, default=10.0, help="each device's poll interval")
    ap.add_argument("--seconds", type=float, default=40.0, help="how long the load runs")
    ap.add_argument("--workers", type=int, default=32, help="threads making the polls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-scale-"))
    ws = init_workspace(work / "fleet")
    port = free_ports()[0]
    url = f"https://127.0.0.1:{port}"
    started = time.monotonic()
    devices = enroll_all(ws, args.devices, url, work)
    enroll_s = time.monotonic() - started
    server = subprocess.Popen(stctl_command() + ["server", "serve", "--listen", f"127.0.0.1:{port}", "--workspace",
                                                 str(ws.root), "--poll-interval", str(args.poll_s)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ca = str(ws.pki_dir / "ca.crt")
        wait_up(url, ca, server)
        idle = proc_figures(server.pid)
        load = run_load(url, ca, devices, args.poll_s, args.seconds, args.workers, args.seed)
        busy = proc_figures(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps({
        "benchmark": "fleet_scale", "devices": args.devices, "poll_s": args.poll_s, "workers": args.workers,
        "enroll_s": round(enroll_s, 1), **load,
        "server": {"peak_rss_bytes": busy["peak_rss_bytes"], "idle_rss_bytes": idle["peak_rss_bytes"],
                   "cpu_s_under_load": round(busy["cpu_s"] - idle["cpu_s"], 2),
                   "cpu_share_of_one_core": round((busy["cpu_s"] - idle["cpu_s"]) / load["seconds"], 2)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "cpu": cpu_name()},
        "note": "light devices: poll and report path only (no engine, no update); load generator in the same machine",
    }, indent=2))


if __name__ == "__main__":
    main()
