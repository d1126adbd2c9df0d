"""A staged rollout to N real agents on 127.0.0.1, printed as JSON: rollout wall time, bytes the
repository served (against N x delta and N x full), and stctl's peak RSS.

Setup (not timed): a fresh workspace; st-demo 1.0.0 and 2.0.0 built and published; the
repository served by the embedded server with a byte counter; N devices enrolled (tags
`ring=canary` for the first, `ring=main` for the rest), each initialized from its own enrollment
with 1.0.0 installed (installed once through the agent library, the blobs then hard-linked into
every device's store: blobs are immutable and content-addressed) and run as a real
`st-agent serve` process (the full agent: the engine loads; one torch thread each).

Timed: `stctl rollout start --model st-demo --version 2.0.0 --plan PLAN --json` as a subprocess
(its peak RSS from getrusage after it exits): canary (1 device, soak 1s) -> the rest
(`--concurrency` at once), gated on the devices' decode tokens/s from their install-time health
checks (`health_check = false`: the benchmark measures the rollout, not N more health checks).
Every update is the real path: TUF metadata, changed shards over HTTP, verify, stage, health
check, activate.

The agent has no light mode, so each agent costs ~300-350 MB RSS and a few CPU seconds to start;
`--devices` larger than memory allows is refused (`--force` overrides).

    PYTHONPATH=. python benchmarks/rollout_scale.py --devices 50 --json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.config import load_config
from agent.enrollment import init_data_dir
from agent.telemetry import Telemetry
from agent.updater import Updater
from model.build import build_demo
from model.package import read_manifest
from stctl.agent_process import AgentProcesses, free_ports, wait_ready
from stctl.bootstrap import init_workspace
from stctl.delta import diff_manifests
from stctl.enroll import enroll_device
from stctl.fleetdb import open_fleet_db
from stctl.repository import Repository
from stctl.serve import RepositoryHandler, make_server

AGENT_RSS_ESTIMATE = 360 * 2**20
START_TIMEOUT_S = 900.0
PLAN = """
max_concurrent = {concurrency}
device_timeout = "10m"
[gates]
min_decode_tokens_per_s = 0.1
health_check = false
max_failure_fraction = 0.0
[[waves]]
name = "canary"
tags = {{ ring = "canary" }}
count = 1
soak = "1s"
[[waves]]
name = "rest"
percent = 100
"""


class CountingHandler(RepositoryHandler):
    served = 0
    lock = threading.Lock()

    def copyfile(self, source, outputfile):
        with CountingHandler.lock:
            CountingHandler.served += self._remaining
        super().copyfile(source, outputfile)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def stctl_command() -> list[str]:
    script = Path(sys.executable).with_name("stctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "stctl.cli"]


_PEAK_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                 "sys.stderr.write(r.stderr); sys.stdout.write(r.stdout); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); "
                 "sys.exit(r.returncode)")


def run_measured(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, int]:
    """Run `cmd`; returns its result and its peak RSS (bytes), from getrusage in a wrapper process
    whose only child it is."""
    r = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *cmd], capture_output=True, text=True, timeout=timeout)
    *errors, peak = r.stderr.rstrip("\n").split("\n")
    return subprocess.CompletedProcess(cmd, r.returncode, r.stdout, "\n".join(errors)), int(peak)


def install_template(enrollment: Path, data_dir: Path, version: str) -> None:
    init_data_dir(enrollment, data_dir)
    config = load_config(data_dir)
    telemetry = Telemetry(config.telemetry_db, config.limits.telemetry_max_rows)
    try:
        updater = Updater(config, telemetry)
        job = updater.run(updater.request("st-demo", version))
        if job.state != "active":
            raise SystemExit(f"installing the template failed: {job.state} {job.detail}")
    finally:
        telemetry.close()


def clone_device(template: Path, enrollment: Path, data_dir: Path) -> None:
    """A device with its own identity (from `enrollment`) and the template's installed release."""
    init_data_dir(enrollment, data_dir)
    own = {rel: (data_dir / rel).read_bytes() for rel in ("tls/device.crt", "tls/device.key", "agent.json")}
    shutil.rmtree(data_dir)
    shutil.copytree(template, data_dir, ignore=shutil.ignore_patterns("store", "releases"))
    for folder in ("store", "releases"):  # immutable blobs: hard links
        shutil.copytree(template / folder, data_dir / folder, copy_function=os.link)
    for rel, data in own.items():
        (data_dir / rel).write_bytes(data)


def run(devices: int, concurrency: int, work: Path, say) -> dict:
    ws = init_workspace(work / "fleet")
    repo = Repository(ws)
    for variant in (1, 2):
        build_demo(work / f"v{variant}", variant=variant)
        repo.publish(work / f"v{variant}")
    v1, v2 = read_manifest(work / "v1"), read_manifest(work / "v2")
    delta = diff_manifests(v1, v2)
    server = make_server(ws.repository, "127.0.0.1", 0, handler=CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    processes = AgentProcesses(grace_s=60.0, env={"OMP_NUM_THREADS": "1"})
    try:
        say(f"enrolling {devices} devices")
        ports = free_ports(devices)
        names = [f"pc{i:03d}" for i in range(devices)]
        for i, (name, port) in enumerate(zip(names, ports)):
            enroll_device(ws, name, f"https://127.0.0.1:{port}", work / f"{name}.enroll", url,
                          ["ring=canary" if i == 0 else "ring=main"])
        template = work / "template"
        install_template(work / f"{names[0]}.enroll", template, "1.0.0")
        for name in names:
            clone_device(template, work / f"{name}.enroll", work / "devices" / name)
        say(f"starting {devices} agents")
        started = time.monotonic()
        for name, port in zip(names, ports):
            processes.start(["serve", "--data-dir", str(work / "devices" / name), "--listen", f"127.0.0.1:{port}"],
                            work / f"{name}.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        for port, process in zip(ports, processes.running):
            wait_ready(process, f"https://127.0.0.1:{port}", ws.pki_dir / "ca.crt", max(1.0, deadline - time.monotonic()))
        agents_start_s = time.monotonic() - started
        say(f"{devices} agents ready in {agents_start_s:.0f}s; rolling out 2.0.0")

        plan = work / "plan.toml"
        plan.write_text(PLAN.format(concurrency=concurrency))
        CountingHandler.served = 0
        started = time.monotonic()
        rollout, stctl_peak_rss = run_measured(stctl_command() + [
            "rollout", "start", "--model", "st-demo", "--version", "2.0.0", "--plan", str(plan),
            "--workspace", str(ws.root), "--json"], timeout=3600)
        wall = time.monotonic() - started
        _, stctl_idle_rss = run_measured(stctl_command() + ["rollout", "status", "--workspace", str(ws.root), "--json"],
                                         timeout=300)
        served = CountingHandler.served
        status = json.loads(rollout.stdout) if rollout.stdout.strip() else {"state": "error",
                                                                             "detail": rollout.stderr[-500:]}
        db = open_fleet_db(ws.fleet_db)
        downloaded = db.execute("SELECT SUM(b) FROM (SELECT MAX(bytes_downloaded) AS b FROM updates "
                                "WHERE to_version = '2.0.0' GROUP BY device, job_id)").fetchone()[0] or 0
        db.close()
        updated = sum(1 for d in status.get("devices", []) if d["state"] == "passed")
        return {
            "devices": devices, "agent_mode": "full (engine loaded; no light mode exists)",
            "concurrency": concurrency, "rollout_state": status["state"], "devices_updated": updated,
            "devices_updated_once": sum(1 for d in status.get("devices", []) if d["requests"] == 1),
            "rollout_wall_s": round(wall, 2), "seconds_per_device": round(wall / devices, 3),
            "agents_start_s": round(agents_start_s, 1),
            "repository_bytes_served": served, "devices_bytes_downloaded": downloaded,
            "delta_bytes_per_device": delta.bytes_to_ship, "full_bytes_per_device": v2.total_bytes,
            "n_x_delta": devices * delta.bytes_to_ship, "n_x_full": devices * v2.total_bytes,
            "served_vs_n_x_full": round(served / (devices * v2.total_bytes), 4),
            "stctl_peak_rss_bytes": stctl_peak_rss,
            "stctl_status_peak_rss_bytes": stctl_idle_rss,  # the same imports, no rollout: the baseline
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "mem_available_bytes_at_end": mem_available()},
            "waves": [{"name": w["name"], "state": w["state"], "devices": w["devices"]} for w in status.get("waves", [])],
        }
    finally:
        processes.stop_all()
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=50, help="Agents to start (default 50).")
    parser.add_argument("--concurrency", type=int, default=8, help="Devices updated at once (plan max_concurrent).")
    parser.add_argument("--work-dir", type=Path, default=None, help="Keep files here (default: a temp dir, removed).")
    parser.add_argument("--force", action="store_true", help="Start the agents even if memory looks too small.")
    parser.add_argument("--json", action="store_true", help="Print only the JSON result.")
    args = parser.parse_args()
    if args.devices < 2:
        parser.error("--devices must be >= 2 (a canary and the rest)")
    fits = mem_available() // AGENT_RSS_ESTIMATE
    if args.devices > fits and not args.force:
        parser.error(f"{args.devices} agents need ~{args.devices * AGENT_RSS_ESTIMATE / 2**30:.1f} GiB; about {fits} "
                     "fit in the memory available now (--force to try anyway)")
    say = (lambda _m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="rollout-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.devices, args.concurrency, work, say)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
