"""The device calls home: it polls the fleet server (`stctl server serve`), reports its status,
its update job and its telemetry, and follows the assignment the answer carries.

Rules:
- it runs only when agent.json has a `call_home` section (`CallHomeConfig`), in one thread of
  the daemon that waits for the agent to have started; it never blocks the API, every failure is
  logged and never ends the daemon, and `stop` (an Event) ends it at its next wait;
- one poll: take the next `seq` (saved first, `agent.call_home_state`), build a
  `manifests.call_home.PollReport` (pointer: active, previous, probation; the unfinished job,
  else the newest, with the assignment that started it; the telemetry rows newer than the
  server's acks, oldest first, at most `max_report_rows`, fewer if the body would pass
  `MAX_REPORT_BYTES`), POST it over mTLS with the device's own certificate, read at most
  `MAX_ANSWER_BYTES` of the answer, parse the `PollAnswer`, save its acks, follow its assignment;
- the next poll comes after the server's `poll_after_s` (before the first answer: `poll_s`);
  while polls fail (no connection, an HTTP error status, a malformed answer) the delay doubles
  from `poll_s` up to `max_backoff_s`; every delay is stretched by a random fraction up to
  `jitter`, so a fleet that restarted together does not poll together;
- an assignment is acted on once (its id is saved), only while its window (daily, in the
  window's time zone, read from the injected clock) is open: `update` starts an update job
  through the `Updater` unless the device already runs that release or a job is under way (then
  the next poll tries again); `rollback` rolls back when the active release is the one named.
  The release is still fetched and verified by TUF from the repository.
- "download now, install in the window": an `update` with `download_now` seen while its window
  is closed starts a held job at once (`Job.hold`: fetched and verified, it waits at staged);
  the first answered poll that carries the same assignment inside its window releases it. A
  held job whose assignment the server no longer gives (another one, or none) is withdrawn
  once it waits; a new `update` assignment of the same release takes the waiting job over
  (nothing is downloaded again), one of another release withdraws it through its request. An
  outage that spans the whole window leaves it waiting for the next window.
- the assignment's `max_bytes_per_s` is the job's bandwidth cap (`agent.rate_limit`).
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests

from agent.call_home_state import CallHomeState
from agent.config import CallHomeConfig, DeviceConfig
from agent.errors import AgentError
from agent.lifecycle import Job
from agent.telemetry import Telemetry
from agent.updater import Updater
from manifests import ManifestError
from manifests.call_home import MAX_REPORT_BYTES, Assignment, JobReport, PollAnswer, PollReport, Release, Window
from manifests.telemetry import TELEMETRY_TABLES
from model.errors import ModelError

log = logging.getLogger("st-agent.call-home")
POLL_PATH = "/v1/call-home/poll"
MAX_ANSWER_BYTES = 256 * 1024
READY_WAIT_S = 0.2  # how often the loop looks whether the agent has started
_FOLLOW_ERRORS = (AgentError, ModelError, ManifestError, OSError)


class CallHomeError(AgentError):
    """A poll failed: the server unreachable, an HTTP error status, or a malformed answer."""


def window_open(window: Window | None, now: float) -> bool:
    """Whether `now` (epoch seconds) lies in `window`, read in the window's time zone (no window: open).
    A zone this device does not know keeps the window closed."""
    if window is None:
        return True
    try:
        local = datetime.fromtimestamp(now, ZoneInfo(window.tz))
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("time zone %r is unknown on this device; the window stays closed", window.tz)
        return False
    return window.contains(local.hour * 60 + local.minute)


def next_delay(config: CallHomeConfig, failures: int, poll_after_s: float | None, u: float) -> float:
    """Seconds to the next poll after `failures` failed polls in a row (0: the last succeeded,
    answering `poll_after_s`); `u` in [0, 1) picks the jitter."""
    if failures == 0:
        base = config.poll_s if poll_after_s is None else poll_after_s
    else:
        base = min(config.max_backoff_s, config.poll_s * 2.0 ** min(failures - 1, 64))
    return base * (1.0 + config.jitter * u)


def pending_rows(telemetry: Telemetry, acked: dict[str, float], limit: int) -> dict[str, list[dict]]:
    """Per table, the rows newer than its ack, oldest first, at most `limit` in all. A batch cut by
    the limit ends before its last `ts` (unless that is all of it), so the ack of what was sent
    never skips a row of the same `ts` left behind."""
    rows: dict[str, list[dict]] = {}
    for table in TELEMETRY_TABLES:
        if limit <= 0:
            break
        batch = telemetry.query(table, since=acked.get(table), limit=limit)
        if len(batch) == limit:
            batch = [r for r in batch if r["ts"] < batch[-1]["ts"]] or batch
        if batch:
            rows[table] = batch
            limit -= len(batch)
    return rows


def _read_capped(response: requests.Response, cap: int) -> bytes:
    data = b""
    for chunk in response.iter_content(64 * 1024):
        data += chunk
        if len(data) > cap:
            raise CallHomeError(f"the answer is larger than {cap} bytes")
    return data


def _error_message(status: int, body: bytes) -> str:
    try:
        return f"HTTP {status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"


class CallHome:
    """The poll loop of one device (`run` in a thread; `poll_once` is one poll)."""

    def __init__(self, config: DeviceConfig, updater: Updater, telemetry: Telemetry,
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random):
        if config.call_home is None:
            raise CallHomeError("this device has no call_home section in its config")
        self.config, self.settings = config, config.call_home
        self.updater, self.telemetry, self.clock, self.rand = updater, telemetry, clock, rand
        self.state = CallHomeState(config.call_home_state, clock)
        self.failures = 0
        self._warned: set[str] = set()
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or CA bundle from the environment
        self.session.verify = str(config.ca_cert)
        self.session.cert = (str(config.device_cert), str(config.device_key))

    # ---- the report ------------------------------------------------------------------------
    def _job(self) -> JobReport | None:
        jobs = self.updater.jobs
        job: Job | None = jobs.unfinished() or next(iter(reversed(jobs.all())), None)
        if job is None:
            return None
        progress = self.updater.progress.get(job.id)
        return JobReport(id=job.id, state=job.state, model=job.model, version=job.version,
                         assignment_id=self.state.assignment_of(job.id),
                         bytes_downloaded=job.bytes_downloaded + (progress.done if progress else 0),
                         bytes_total=max(job.bytes_total, progress.total if progress else 0), detail=job.detail[:500])

    def report(self) -> tuple[PollReport, bytes]:
        """The next report and its body (its seq is taken and saved here)."""
        pointer = self.updater.install.pointer()
        release = lambda ref: ref and Release(ref.model, ref.version)  # noqa: E731
        status = {"active": release(pointer.active), "previous": release(pointer.previous),
                  "probation": pointer.probation, "job": self._job()}
        limit = self.settings.max_report_rows
        seq = self.state.next_seq()
        while True:
            report = PollReport(self.config.name, seq, self.clock(), telemetry=pending_rows(
                self.telemetry, self.state.acked, limit), **status)
            body = json.dumps(report.to_dict()).encode()
            if len(body) <= MAX_REPORT_BYTES or limit == 1:
                return report, body
            limit //= 2

    # ---- one exchange ------------------------------------------------------------------------
    def send(self, body: bytes) -> PollAnswer:
        url = self.settings.server_url + POLL_PATH
        try:
            with self.session.post(url, data=body, headers={"Content-Type": "application/json"}, stream=True,
                                   timeout=self.settings.timeout_s) as response:
                data = _read_capped(response, MAX_ANSWER_BYTES)
        except requests.RequestException as e:
            raise CallHomeError(f"{url}: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            raise CallHomeError(f"{url}: {_error_message(response.status_code, data)}")
        try:
            return PollAnswer.parse(json.loads(data))
        except ValueError as e:  # ManifestError is a ValueError, as is bad JSON
            raise CallHomeError(f"{url}: malformed answer ({e})") from None

    def poll_once(self) -> float:
        """One poll; the seconds to wait before the next."""
        try:
            _, body = self.report()
            answer = self.send(body)
        except CallHomeError as e:
            return self._failed(str(e))
        self.failures = 0
        self.state.ack(answer.acked)
        try:
            self.follow(answer.assignment)
        except _FOLLOW_ERRORS as e:
            self._warn_once(f"{answer.assignment.id}:{e}", f"assignment {answer.assignment.id}: {e}")
        return next_delay(self.settings, 0, answer.poll_after_s, self.rand())

    def _failed(self, reason: str) -> float:
        self.failures += 1
        delay = next_delay(self.settings, self.failures, None, self.rand())
        log.warning("calling home failed (%d in a row): %s; next try in %.1f s", self.failures, reason, delay)
        return delay

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    # ---- the assignment ------------------------------------------------------------------------
    def follow(self, assignment: Assignment | None) -> str:
        """Act on `assignment` if it is due; returns what happened (for the log and the tests)."""
        held = self.updater.held()
        held_for = held and self.state.assignment_of(held.id)
        same_release = assignment is not None and assignment.action == "update" and held is not None and \
            (assignment.model, assignment.version) == (held.model, held.version)  # its request takes the job
        if held_for and held_for != (assignment and assignment.id) and held.waits and not same_release and \
                self.updater.withdraw(held.id, f"its assignment {held_for} was replaced by the fleet server"):
            log.info("assignment %s: its held update %s withdrawn", held_for, held.id)
        if assignment is None:
            return "nothing"
        in_window = window_open(assignment.window, self.clock())
        if self.state.acted_on(assignment.id):
            if held_for != assignment.id:
                return "nothing"
            if not in_window:
                return "window closed"
            self.updater.release(held.id)
            log.info("assignment %s: window open, update %s released to install", assignment.id, held.id)
            return "released"
        if not in_window and not (assignment.action == "update" and assignment.download_now):
            return "window closed"
        active = self.updater.install.pointer().active
        on_it = active is not None and (active.model, active.version) == (assignment.model, assignment.version)
        if assignment.action == "rollback":
            if not on_it:
                return "not on that release"
            self.updater.rollback(f"rollback assigned by the fleet server ({assignment.id})")
            self.state.act(assignment.id)
            log.info("assignment %s: rolled back from %s@%s", assignment.id, assignment.model, assignment.version)
            return "rolled back"
        if on_it:
            return "already on that release"
        if self.updater.busy() or (self.updater.jobs.unfinished() is not None and self.updater.waiting() is None):
            return "busy"
        job = self.updater.request(assignment.model, assignment.version, assignment.repository_url,
                                   assignment.allow_downgrade, hold=not in_window,
                                   max_bytes_per_s=assignment.max_bytes_per_s)
        try:
            self.state.act(assignment.id, job.id)
        finally:
            self.updater.start(job)
        started = "started" if in_window else "started to download now and wait for the window"
        log.info("assignment %s: update %s to %s@%s %s", assignment.id, job.id, job.model, job.version, started)
        return "update started" if in_window else "staged only"

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event, ready: threading.Event | None = None) -> None:
        """Poll until `stop` is set (waiting first for `ready`, the agent's start)."""
        try:
            while ready is not None and not ready.is_set():
                if stop.wait(READY_WAIT_S):
                    return
            while not stop.is_set():
                try:
                    delay = self.poll_once()
                except Exception as e:  # noqa: BLE001 - a bug or a full disk must not end the loop
                    delay = self._failed(f"{type(e).__name__}: {e}")
                stop.wait(delay)
        finally:
            self.session.close()


def start_call_home(config: DeviceConfig, updater: Updater, telemetry: Telemetry, stop: threading.Event,
                    ready: threading.Event) -> threading.Thread | None:
    """The daemon's call-home thread (None when the config has no `call_home` section)."""
    if config.call_home is None:
        return None

    def main() -> None:
        try:
            caller = CallHome(config, updater, telemetry)
        except AgentError as e:
            log.error("calling home is off: %s", e)
            return
        log.info("calling home to %s", config.call_home.server_url)
        caller.run(stop, ready)

    thread = threading.Thread(target=main, name="call-home", daemon=True)
    thread.start()
    return thread
