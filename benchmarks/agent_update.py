"""The device agent under an update: v1 -> v2 update time, completion latency during the switch,
agent RSS idle and while serving the demo model.

    python benchmarks/agent_update.py --json
    python benchmarks/agent_update.py --workdir /tmp/agent-bench --threads 1 --clients 2 --json

Builds demo v1 and v2 (cached under --workdir), publishes them to a fresh workspace, serves the
repository in-process, enrolls a device and runs a real `st-agent serve` process over mTLS. Then:
create an application key for the clients (`stctl device app-key create`'s library call), sent
with every completion; install v1; sample idle RSS; stream completions from `--clients` clients
continuously while the device updates to v2 (each completion is labelled before / during / after
by when it ran relative to the update job); report latencies (time to first token, total) per phase and the agent's RSS.
RSS comes from /proc/<pid>/status of the agent process (Linux). Prints one JSON document; never
asserts speed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Line 4 torque check:"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def packages(workdir: Path) -> tuple[Path, Path]:
    from model.build import build_demo

    v1, v2 = workdir / "demo-v1", workdir / "demo-v2"
    for path, variant in ((v1, 1), (v2, 2)):
        if not path.exists():
            log(f"building {path.name}")
            build_demo(path, variant=variant)
    return v1, v2


def session(pki: Path, operator: bool) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # $REQUESTS_CA_BUNDLE would replace `verify`
    s.verify = str(pki / "ca.crt")
    if operator:
        s.cert = (str(pki / "operator.crt"), str(pki / "operator.key"))
    return s


def stream_once(client: requests.Session, url: str, max_tokens: int) -> dict:
    start = time.monotonic()
    first = None
    # ignore_eos: every completion is max_tokens long (the trained model would end a record early)
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    r = client.post(url + "/v1/completions", json=body, stream=True, timeout=300)
    r.raise_for_status()
    fingerprint = None
    for line in r.iter_lines():
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            fingerprint = chunk["system_fingerprint"]
            first = first or time.monotonic()
    end = time.monotonic()
    return {"start": start, "end": end, "ttft_ms": ((first or end) - start) * 1e3, "total_ms": (end - start) * 1e3,
            "fingerprint": fingerprint}


def wait_job(s: requests.Session, url: str, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = s.get(f"{url}/v1/updates/{job_id}", timeout=60).json()
        if job["state"] in ("active", "failed", "rolled_back"):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"update {job_id} not finished in {timeout}s")


def summary(samples: list[dict]) -> dict:
    if not samples:
        return {"completions": 0}
    ttft = [s["ttft_ms"] for s in samples]
    total = [s["total_ms"] for s in samples]
    return {"completions": len(samples), "ttft_ms_median": statistics.median(ttft), "ttft_ms_max": max(ttft),
            "total_ms_median": statistics.median(total), "total_ms_max": max(total)}


def run(workdir: Path, threads: int, clients: int, max_tokens: int, after_s: float) -> dict:
    from agent.enrollment import init_data_dir
    from stctl.app_keys import create_app_key
    from stctl.bootstrap import init_workspace
    from stctl.enroll import enroll_device
    from stctl.repository import Repository
    from stctl.serve import make_server

    v1, v2 = packages(workdir)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    ws = init_workspace(run_dir / "fleet")
    for package in (v1, v2):
        Repository(ws).publish(package)
    server = make_server(ws.repository, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    repo_url = f"http://127.0.0.1:{server.server_address[1]}"
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    enroll_device(ws, "bench", url, run_dir / "bench.enroll", repo_url)  # fleet.db knows where it listens
    data_dir = run_dir / "device"
    init_data_dir(run_dir / "bench.enroll", data_dir)
    agent_json = json.loads((data_dir / "agent.json").read_text())
    agent_json["limits"]["threads"] = threads
    (data_dir / "agent.json").write_text(json.dumps(agent_json))
    script = Path(sys.executable).with_name("st-agent")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]
    launched = time.monotonic()
    agent = subprocess.Popen(cmd + ["serve", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    operator, app = session(ws.pki_dir, True), session(ws.pki_dir, False)
    try:
        deadline = time.monotonic() + 300
        while True:  # 503 `loading` until the release is loaded, no answer before it listens
            try:
                if app.get(url + "/healthz", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or agent.poll() is not None:
                raise RuntimeError("st-agent did not start")
            time.sleep(0.1)
        startup_s = time.monotonic() - launched
        app.headers["Authorization"] = f"Bearer {create_app_key(ws, 'bench-clients', ['bench'])['key']}"
        idle_no_model = rss_bytes(agent.pid)
        log("installing v1")
        t0 = time.monotonic()
        first = wait_job(operator, url, operator.post(url + "/v1/updates", json={"model": "st-demo", "version": "1.0.0"},
                                                      timeout=60).json()["id"])
        install_s = time.monotonic() - t0
        time.sleep(1.0)
        idle_v1 = rss_bytes(agent.pid)

        samples: list[dict] = []
        errors: list[str] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    samples.append(stream_once(app, url, max_tokens))
                except Exception as e:  # counted, reported
                    errors.append(repr(e))

        workers = [threading.Thread(target=client) for _ in range(clients)]
        for w in workers:
            w.start()
        time.sleep(after_s)
        serving_v1 = rss_bytes(agent.pid)
        log("updating to v2")
        update_start = time.monotonic()
        job_id = operator.post(url + "/v1/updates", json={"model": "st-demo", "version": "2.0.0"}, timeout=60).json()["id"]
        second = wait_job(operator, url, job_id)
        update_end = time.monotonic()
        time.sleep(after_s)
        stop.set()
        for w in workers:
            w.join(timeout=600)
        peak = rss_bytes(agent.pid, "VmHWM")
        serving_v2 = rss_bytes(agent.pid)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
        server.shutdown()
    before = [s for s in samples if s["end"] <= update_start]
    during = [s for s in samples if s["end"] > update_start and s["start"] < update_end]
    after = [s for s in samples if s["start"] >= update_end]
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "benchmark": "agent_update", "threads": threads, "clients": clients, "max_tokens": max_tokens,
        "agent_startup_s": round(startup_s, 3),
        "install_v1": {"seconds": round(install_s, 3), "bytes_downloaded": first["bytes_downloaded"],
                       "shards_downloaded": first["shards_downloaded"]},
        "update_v1_to_v2": {"state": second["state"], "seconds": round(update_end - update_start, 3),
                            "bytes_downloaded": second["bytes_downloaded"], "bytes_total": second["bytes_total"],
                            "shards_downloaded": second["shards_downloaded"]},
        "completion_latency": {"before": summary(before), "during_switch": summary(during), "after": summary(after),
                               "failed": len(errors),
                               "served_by": sorted({s["fingerprint"] for s in samples if s["fingerprint"]})},
        "rss_bytes": {"idle_no_model": idle_no_model, "idle_v1": idle_v1, "serving_v1": serving_v1,
                      "serving_v2": serving_v2, "peak": peak},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "agent",
                        help="where demo packages are cached and runs happen")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the agent's engines")
    parser.add_argument("--clients", type=int, default=2, help="concurrent streaming clients")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per completion")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of load before and after the update")
    parser.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = run(args.workdir, args.threads, args.clients, args.max_tokens, args.after)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
