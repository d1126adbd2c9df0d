"""`stctl demo`: the main job on the built-in default, end to end, in a temporary directory.

A fleet workspace; st-demo 1.0.0 and 2.0.0 built and published; the repository served on
127.0.0.1; three devices enrolled with tags and run as real `st-agent serve` processes, each
given an application key of its own (`stctl device app-key create`'s library call); 1.0.0
installed everywhere by a one-wave rollout; completions on every device, each sending its
device's key; 2.0.0 rolled out canary (one device) -> the rest, gated on health, decode tokens/s
and peak RSS; completions again and one chat (`POST /v1/chat/completions`) about line 7, the
material 2.0.0 was fine-tuned on; the devices' telemetry pulled into fleet.db and shown as the
fleet table.

Rules: the demo uses only public library calls and the `st-agent` command (the same ones an
operator uses); every process it starts is stopped at the end, also on Ctrl-C or SIGTERM; every
wait is bounded; the figures it reports were measured in this run.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import manifests
from model.build import build_demo
from model.demo_checkpoint import golden_prompts
from stctl.agent_process import AgentProcessError, AgentProcesses, agent_command, free_ports, wait_ready
from stctl.app_keys import create_app_key
from stctl.bootstrap import init_workspace
from stctl.device_client import ClientConfig, DeviceClient, map_devices
from stctl.enroll import enroll_device
from stctl.errors import StctlError
from stctl.registry import fleet_table
from stctl.repository import Repository
from stctl.rollout import start_rollout
from stctl.serve import make_server
from stctl.telemetry_pull import pull_fleet, show

# the starts of held-out records (never trained on): the trained demo model continues them
# (golden_prompts: a torque check, a shift handover, a conveyor status report)
DEMO_PROMPTS = tuple(golden_prompts()[:3])
# a chat request for a record of line 7, the material 2.0.0 learned (1.0.0 never saw one)
CHAT_REQUEST = "Write the cell voltage check for Line 7, station S3 cell stacker."
DEVICES = {"line4-pc1": ["ring=canary", "line=4"], "line4-pc2": ["ring=main", "line=4"],
           "line5-pc1": ["ring=main", "line=5"]}
EXAMPLES = Path(manifests.__file__).parent / "examples"
INSTALL_PLAN, UPGRADE_PLAN = EXAMPLES / "all-at-once.toml", EXAMPLES / "canary-then-rest.toml"
DEMO_APP_KEY = "demo-app"  # the name of each device's application key (telemetry shows it)
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


class DemoError(StctlError):
    """The demo could not bring its fleet up (an agent did not start, a rollout did not complete)."""


@contextmanager
def _interrupts_stop_the_demo() -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM end the demo (so the cleanup runs), only in the main thread. The
    handler raises KeyboardInterrupt and also sets the returned event: an interrupt that lands in
    a finalizer or callback, where Python prints and drops the exception, still stops the demo
    at its next message (`say` checks the event)."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def interrupt(_signum, _frame):
        stopped.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _complete_everywhere(ws, tokens: int, say: Callable, app_keys: dict[str, str]) -> list[dict]:
    """Completions on every device, each with that device's application key (`app_keys`: device ->
    key); each is printed as a person reads it: the prompt, then the model's continuation.
    Returns them as {device, release, prompt, text}."""
    config = ClientConfig(completion_timeout_s=300.0)
    answers: list[dict] = []

    def complete(device: dict) -> None:
        client = DeviceClient.for_device(ws, device, config)
        try:
            for prompt in DEMO_PROMPTS:
                out = client.complete(prompt, max_tokens=tokens, app_key=app_keys[device["name"]], temperature=0.8,
                                      seed=7)
                text = out["choices"][0]["text"]
                answers.append({"device": device["name"], "release": out.get("system_fingerprint"),
                                "prompt": prompt, "text": text})
                record = "\n".join(f"      {line}" for line in f"{prompt}[{text}]".splitlines())
                say(f"  {device['name']} ({out.get('system_fingerprint')}), the model's words in [ ]:\n{record}")
        finally:
            client.close()

    from stctl.enroll import list_devices

    map_devices(complete, list_devices(ws), len(DEVICES))
    return answers


def _chat_once(ws, say: Callable, app_keys: dict[str, str]) -> dict:
    """One chat on the first device: a request for a line 7 record, the material 2.0.0 was
    fine-tuned on; printed as the conversation a person reads. Returns {device, release, request, text, finish_reason}."""
    from stctl.enroll import list_devices

    device = list_devices(ws)[0]
    client = DeviceClient.for_device(ws, device, ClientConfig(completion_timeout_s=300.0))
    try:
        out = client.chat([{"role": "user", "content": CHAT_REQUEST}], max_tokens=96, app_key=app_keys[device["name"]])
    finally:
        client.close()
    text = out["choices"][0]["message"]["content"]
    reply = "\n".join(f"      {line}" for line in text.splitlines())
    say(f"  {device['name']} ({out.get('system_fingerprint')}), POST /v1/chat/completions:\n"
        f"      user: {CHAT_REQUEST}\n      assistant:\n{reply}")
    return {"device": device["name"], "release": out.get("system_fingerprint"), "request": CHAT_REQUEST, "text": text,
            "finish_reason": out["choices"][0]["finish_reason"]}


def run_demo(work_dir: Path | None = None, *, tokens: int = 40, say: Callable = print, progress=None) -> dict:
    """Run the fleet demo (see the module docstring); returns the figures it measured."""
    from rich.table import Table

    owned = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="stctl-demo-")) if owned else Path(work_dir)
    processes = AgentProcesses(STOP_TIMEOUT_S, {"OMP_NUM_THREADS": "1"})  # 3 agents share 2 cores
    server = None
    started = time.monotonic()
    try:
        with _interrupts_stop_the_demo() as stopped:
            say = _stops_when(stopped, say)
            say(f"workspace: {root}")
            ws = init_workspace(root / "fleet")
            repo = Repository(ws)
            manifests_by_version = {}
            for variant in (1, 2):
                manifest = build_demo(root / f"st-demo-v{variant}", variant=variant, progress=progress)
                report = repo.publish(root / f"st-demo-v{variant}")
                manifests_by_version[manifest.version] = manifest
                say(f"built and published st-demo {manifest.version}: {report.shards} shards, "
                    f"{report.bytes_new} new of {report.bytes_full} bytes")
            server = make_server(ws.repository, "127.0.0.1", 0)
            threading.Thread(target=server.serve_forever, name="repository", daemon=True).start()
            repository_url = f"http://127.0.0.1:{server.server_address[1]}"
            say(f"repository served at {repository_url}")

            agents = {}
            for name, tags in DEVICES.items():
                url = f"https://127.0.0.1:{free_ports()[0]}"
                enrollment = root / f"{name}.enroll"
                enroll_device(ws, name, url, enrollment, repository_url, tags)
                data_dir = root / "devices" / name
                init = subprocess.run(agent_command() + ["init", "--enroll", str(enrollment), "--data-dir",
                                                          str(data_dir)], capture_output=True, text=True, timeout=120)
                if init.returncode != 0:
                    raise DemoError(f"st-agent init {name}: {init.stderr.strip()[-300:]}")
                log = root / f"{name}.log"
                process = processes.start(["serve", "--data-dir", str(data_dir), "--listen",
                                           url.removeprefix("https://")], log)
                agents[name] = (process, url, log)
            for name, (process, url, log) in agents.items():
                try:
                    wait_ready(process, url, ws.pki_dir / "ca.crt", START_TIMEOUT_S, log)
                except AgentProcessError as e:
                    raise DemoError(f"agent {name}: {e}") from None
                say(f"agent {name} ({', '.join(DEVICES[name])}) serving at {url}")
            app_keys = {name: create_app_key(ws, DEMO_APP_KEY, [name])["key"] for name in agents}
            say(f"application key {DEMO_APP_KEY!r} created on each device (a key of its own, the device keeps only "
                "its sha256); every completion below sends it as Authorization: Bearer")

            say("install st-demo 1.0.0 on every device (one wave)")
            first = start_rollout(ws, "st-demo", "1.0.0", INSTALL_PLAN, say=say)
            if first["state"] != "completed":
                raise DemoError(f"installing 1.0.0 ended {first['state']}: {first['detail']}")
            say("completions on 1.0.0 (the prompts start held-out records, which the model never saw)")
            answers = _complete_everywhere(ws, tokens, say, app_keys)

            say(f"roll out st-demo 2.0.0: canary -> rest, gated ({UPGRADE_PLAN.name})")
            second = start_rollout(ws, "st-demo", "2.0.0", UPGRADE_PLAN, say=say)
            say("completions on every device after the rollout")
            answers += _complete_everywhere(ws, tokens, say, app_keys)
            say("a chat with the fine-tuned model")
            chat = _chat_once(ws, say, app_keys)

            pull_fleet(ws)
            fleet = fleet_table(ws)
            summary = show(ws)
            shipped = _bytes_downloaded(ws, "2.0.0")
            full = manifests_by_version["2.0.0"].total_bytes

            table = Table("device", "tags", "release", "decode tok/s", "peak RSS", "health", title="fleet")
            for d in fleet:
                table.add_row(d["name"], ",".join(f"{k}={v}" for k, v in d["tags"].items()),
                              f"{d['model']}@{d['version']}", f"{d['last_decode_tokens_per_s'] or 0:.1f}",
                              f"{(d['last_peak_rss_bytes'] or 0) / 2**20:.0f} MiB", d["last_health"] or "-")
            say(table)
            per_version = Table("device", "release", "completions", "median tok/s", "p95 peak RSS", "failures",
                                title="telemetry per device and version")
            for r in summary:
                per_version.add_row(r["device"], f"{r['model']}@{r['version']}", str(r["completions"]),
                                    f"{r['median_decode_tokens_per_s'] or 0:.1f}",
                                    f"{(r['p95_peak_rss_bytes'] or 0) / 2**20:.0f} MiB", str(r["failures"]))
            say(per_version)
            say(f"rollout of 2.0.0: {second['state']}; shipped {shipped} bytes to {len(DEVICES)} devices "
                f"instead of {full * len(DEVICES)} (full packages)")
            return {
                "devices": [{"name": d["name"], "tags": d["tags"], "version": d["version"],
                             "decode_tokens_per_s": d["last_decode_tokens_per_s"],
                             "peak_rss_bytes": d["last_peak_rss_bytes"], "last_health": d["last_health"]}
                            for d in fleet],
                "rollout": {"state": second["state"], "waves": [
                    {"name": w["name"], "state": w["state"], "devices": [
                        d["device"] for d in second["devices"] if d["wave"] == w["index"]]} for w in second["waves"]]},
                "bytes_shipped": shipped, "bytes_full": full * len(DEVICES),
                "requests_by_key": _requests_by_key(ws), "answers": answers, "chat": chat,
                "telemetry": summary, "seconds": round(time.monotonic() - started, 1),
            }
    finally:
        processes.stop_all()
        if server is not None:
            server.shutdown()
            server.server_close()
        if owned:
            shutil.rmtree(root, ignore_errors=True)


def _stops_when(stopped: threading.Event, say: Callable) -> Callable:
    """`say` that first raises KeyboardInterrupt once the demo was interrupted."""

    def checked(message) -> None:
        if stopped.is_set():
            raise KeyboardInterrupt
        say(message)

    return checked


def _requests_by_key(ws) -> list[dict]:
    """Completions per device, application key and outcome (the pulled `requests` telemetry)."""
    from stctl.fleetdb import open_fleet_db

    db = open_fleet_db(ws.fleet_db)
    try:
        rows = db.execute("SELECT device, key, outcome, COUNT(*) FROM requests GROUP BY device, key, outcome "
                          "ORDER BY device, key, outcome").fetchall()
        return [{"device": r[0], "key": r[1], "outcome": r[2], "requests": r[3]} for r in rows]
    finally:
        db.close()


def _bytes_downloaded(ws, version: str) -> int:
    """Bytes the devices downloaded for their update jobs to `version` (from the pulled telemetry)."""
    from stctl.fleetdb import open_fleet_db

    db = open_fleet_db(ws.fleet_db)
    try:
        rows = db.execute("SELECT device, job_id, MAX(bytes_downloaded) FROM updates WHERE to_version = ? "
                          "GROUP BY device, job_id", [version]).fetchall()
        return sum(r[2] or 0 for r in rows)
    finally:
        db.close()
