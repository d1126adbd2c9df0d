"""Staged rollouts: the controller that moves a fleet to a release wave by wave over the devices'
API, judges each wave on telemetry, and stops (and undoes) itself when a gate fails; and the
library API, one call per `stctl rollout` command.

Who owns what: the states, their transitions and the gate verdicts are `stctl.rollout_policy`
(pure); the records are `stctl.rollout_store` (`fleet.db`); the way to each device is
`stctl.rollout_transport` (its HTTPS API, or for a device that calls home, assignments and its
reports in fleet.db: `stctl.rollout_call_home`); this module does the I/O between them: device
calls, telemetry pulls, the clock. A rollout may mix push and call-home devices.

Rules:
- every transition is an event checked against the policy's tables and recorded by the store in
  one transaction with a `rollout_events` row; a controller holds the workspace's rollout lock
  (one controller at a time, released by the kernel when stctl dies), and `pause`/`abort` from
  another process are requests it obeys;
- exactly once, provable from the records: a device is written `requesting` (with the device's
  own clock, `mark`) before `POST /v1/updates` (call home: before its update assignment, whose
  id is stable per rollout and device), and `updating` with the job id after it. A
  device found `requesting` (stctl died around the POST) is reconciled before any new POST: the
  device's unfinished job, else a job for this release created after `mark` (found through the
  `updates` telemetry since `mark`; `mark` is later than every update row the device had
  recorded before the POST), is adopted; only if neither exists was the POST never received, and
  it is sent. A device found `rolling_back` is rolled back only if it still runs the new release
  (a rollback swaps active and previous, so a blind second one would undo the first), and once
  asked, the controller waits (bounded) for the device to show the rollback before asking again;
- a device that does not reach a final update state within the wave's `device_timeout`
  (unreachable included) is failed; the timeout counts, on the controller's monotonic clock, from
  when this controller began on the device (a resumed rollout starts it again);
- a device that does not answer while it is asked for or polled about its update (no connection,
  TLS failure, timeout, a 5xx answer) keeps its state and is recorded unreachable: since when, the
  last error in one line, the failed attempts, and `fails_at`, the wall-clock instant its timeout
  fails it (the monotonic deadline re-anchored at every attempt, so `rollout status` in another
  process counts down the real timeout). The first failed attempt appends an `unreachable` event
  and says one line; the first answer after it clears the record with a `reachable` event and one
  line (never one per poll); a device the timeout fails says in its `failure` since when it was
  unreachable and the last error. Any other error answer (4xx, a bad body) fails it at once;
- gates run after the wave's soak: health check (if asked; call home: the one the device ran in
  its update), then decode tokens/s and peak RSS on the new release from the device's telemetry
  (pulled into `fleet.db`, or reported there); the failure fraction
  (failed / finished devices of the rollout) is judged once `min_devices` have finished, during
  the updates and after the gates;
- on a failed gate the wave halts: nothing new starts, updates in flight finish, then (plan:
  `rollback`) every device of the wave that runs the new release is rolled back; a device that
  fails while the fraction holds is rolled back alone (`rollback`) or left as is (`halt`);
- abort finishes updates in flight, then rolls back every device this rollout updated;
- every wait is bounded: device calls by the client's timeouts, jobs by `device_timeout`,
  soak by its length, another controller's abort by `RolloutConfig.abort_wait_s`.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils

from common.locks import FileLock
from manifests import ManifestError
from manifests.rollout_plan import RolloutPlan, Wave, parse_plan, select_devices
from stctl import rollout_policy as policy
from stctl.device_client import ClientConfig, DeviceError, map_devices, release_of
from stctl.fleetdb import open_fleet_db
from stctl.registry import enrolled
from stctl.rollout_policy import (
    ABORT, ABORTED, ABORTING, CHANGED, COMPLETED, FAILED, GATING, HALTED, HALTING, IN_FLIGHT, PASSED, PAUSE, PAUSED,
    PENDING, REQUESTING, ROLLING_BACK, ROLLOUT_FINAL, RUNNING, SOAKING, UPDATED, UPDATING, RolloutError,
)
from stctl.rollout_store import NO_OUTAGE, RolloutStore
from stctl.rollout_transport import DeviceTransport, transport_for
from stctl.workspace import Workspace

# what one step of an update does: finished the device, moved it to its next state, or found it still working
DONE, MOVED, POLLED = "done", "moved", "polled"
# how a wave ends for the rollout: on to the next, or stop (a pause or abort request, a failed gate)
NEXT, HALT = "next", "halt"
LOCK_FILE = ".rollout.lock"


@dataclass(frozen=True)
class RolloutConfig:
    poll_s: float = 0.5  # update job polling, and pause/abort checks while soaking
    abort_wait_s: float = 1800.0  # how long `abort` waits for a running controller to finish it
    clock_margin_s: float = 2.0  # the device's Date header has whole seconds: look this far back for its newest row
    client: ClientConfig = field(default_factory=ClientConfig)


class ControllerLock(FileLock):
    """The workspace's rollout lock: held by the one stctl process driving a rollout."""

    def __init__(self, workspace: Workspace):
        super().__init__(workspace.root / LOCK_FILE)


# ---- the controller -----------------------------------------------------------------------------
class Controller:
    """Drives one rollout from whatever state `fleet.db` holds to paused, halted, aborted or completed."""

    def __init__(self, workspace: Workspace, store: RolloutStore, rollout_id: int, config: RolloutConfig,
                 say: Callable[[str], None]):
        self.ws, self.store, self.id, self.config, self.say = workspace, store, rollout_id, config, say
        row = store.rollout(rollout_id)
        self.model, self.version = row["model"], row["version"]
        self.repository_url = row["repository_url"] or None
        self.allow_downgrade = bool(row["allow_downgrade"])
        self.plan = RolloutPlan.from_json(row["plan"])
        self.row = row
        self.enrolled = {d["name"]: d for d in enrolled(workspace)}
        self._outages: dict[str, dict] = {}  # device -> its row while it is recorded unreachable
        self._announced: set[str] = set()  # devices whose outage this controller has said

    # ---- helpers ---------------------------------------------------------------------------------
    def _client(self, name: str) -> DeviceTransport:
        if name not in self.enrolled:
            raise DeviceError(name, "no longer enrolled")
        return transport_for(self.ws, self.enrolled[name], self.row, self.config.client)

    def _device(self, name: str, event: str, **values) -> dict:
        """Record a transition (and say it); a device that moves has answered, so its outage is cleared first."""
        self._answered(name)
        row = self.store.move_device(self.id, name, event, **values)
        extra = values.get("failure") or values.get("detail") or ""
        self.say(f"  {name}: {row['state']}{f' ({extra})' if extra else ''}")
        return row

    def _requested(self) -> str:
        return self.store.rollout(self.id)["requested"] or ""

    def _target(self) -> tuple[str, str]:
        return self.model, self.version

    def judge(self, wave: Wave) -> str | None:
        """Why the failure-fraction gate fails now (None while it holds or cannot be judged yet)."""
        verdict = policy.fraction_verdict(wave.gates, self.store.devices(self.id))
        return None if verdict.passed else verdict.reason

    # ---- the rollout -----------------------------------------------------------------------------
    def run(self) -> str:
        row = self.store.rollout(self.id)
        if row["state"] == ABORTING or row["requested"] == ABORT:
            return self._abort(policy.RESUME if row["state"] == ABORTING else ABORT)
        if row["state"] == HALTING:
            return self._halt(row["wave"], row["detail"], policy.RESUME)
        if row["state"] != RUNNING or row["requested"]:
            self.store.move_rollout(self.id, policy.RESUME, requested="", detail="resumed")
        for idx in range(row["wave"], len(self.plan.waves)):
            self.store.set_rollout(self.id, wave=idx)
            outcome, why = self._wave(idx)
            if outcome == PAUSE:
                self.store.move_rollout(self.id, PAUSE, requested="", detail=f"paused in wave {idx + 1}")
                self.say(f"rollout {self.id}: paused; `stctl rollout resume` continues it")
                return PAUSED
            if outcome == ABORT:
                return self._abort(ABORT)
            if outcome == HALT:
                return self._halt(idx, why, policy.GATE_FAILED)
        self.store.move_rollout(self.id, policy.COMPLETE, wave=len(self.plan.waves), detail="every wave passed")
        self.say(f"rollout {self.id}: completed; {self.model} {self.version} on every selected device")
        return COMPLETED

    def _wave(self, idx: int) -> tuple[str, str]:
        wave = self.plan.waves[idx]
        row = self.store.waves(self.id)[idx]
        state = row["state"]
        if state == FAILED:  # stctl died between judging the wave and recording the halt
            return HALT, row["detail"]
        if state in (PENDING, UPDATING):
            if state == PENDING:
                self.say(f"wave {idx + 1}/{len(self.plan.waves)} {wave.name}: "
                         f"{len(self.store.devices(self.id, idx))} device(s)")
            self.store.move_wave(self.id, idx, policy.START if state == PENDING else policy.RESUME)
            stop, why = self._update_wave(idx, wave)
            if stop:
                if stop == HALT:
                    self.store.move_wave(self.id, idx, policy.GATE_FAILED, detail=why)
                return stop, why
            state = self.store.move_wave(self.id, idx, policy.WAVE_UPDATED, soak_until=time.time() + wave.soak_s,
                                         detail=f"soak {wave.soak_s:g}s")
        if state == SOAKING:
            until = self.store.waves(self.id)[idx]["soak_until"] or 0.0
            while time.time() < until:
                if request := self._requested():
                    return request, ""
                time.sleep(min(self.config.poll_s, max(0.0, until - time.time())))
            state = self.store.move_wave(self.id, idx, policy.SOAKED)
        if state == GATING:
            self._gate_wave(idx, wave)
            why = self.judge(wave)
            if why:
                self.store.move_wave(self.id, idx, policy.GATE_FAILED, detail=why)
                return HALT, why
            if policy.rolls_back(wave):
                failed = [d["device"] for d in self.store.devices(self.id, idx) if d["state"] == FAILED]
                map_devices(lambda name: self._roll_back(name, wave.device_timeout_s), failed, wave.max_concurrent)
            self.store.move_wave(self.id, idx, policy.GATES_PASSED)
        if request := self._requested():
            return request, ""
        return NEXT, ""

    def _update_wave(self, idx: int, wave: Wave) -> tuple[str | None, str]:
        """Update the wave's devices, at most `max_concurrent` at once; stops starting new ones on a
        pause/abort request or a failed gate, and lets those in flight finish."""
        todo = [d["device"] for d in self.store.devices(self.id, idx) if d["state"] in (PENDING, *IN_FLIGHT)]
        stop, why = None, ""
        with ThreadPoolExecutor(max_workers=wave.max_concurrent, thread_name_prefix="rollout") as pool:
            running: set[Future] = set()
            for name in todo:
                while len(running) >= wave.max_concurrent:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                stop = self._requested() or None
                if stop is None and (why := self.judge(wave) or ""):
                    stop = HALT
                if stop:
                    break
                running.add(pool.submit(self._update_device, name, wave))
            for f in wait(running).done:
                f.result()
        stop = stop or self._requested() or None
        if stop is None and (why := self.judge(wave) or ""):
            stop = HALT
        return stop, why

    def _update_device(self, name: str, wave: Wave) -> None:
        """Walk one device to `updated`, `skipped` or `failed` within the wave's device timeout."""
        client = self._client(name)
        deadline = time.monotonic() + wave.device_timeout_s
        try:
            rec = self.store.device(self.id, name)
            if rec["unreachable_since"]:  # recorded by a controller that stopped: cleared at the first answer
                self._outages[name] = rec
            for _ in range(int(wave.device_timeout_s / self.config.poll_s) + 100):
                try:
                    rec, progress = self._step(client, rec)
                    self._answered(name)
                except DeviceError as e:
                    if not e.transient:
                        self._device(name, policy.ERROR, failure=str(e)[:500])
                        return
                    rec, progress = self._unreachable(rec, e, deadline), POLLED
                if progress == DONE:
                    return
                if progress == MOVED:
                    continue
                if time.monotonic() >= deadline:
                    break
                time.sleep(self.config.poll_s)
            self._time_out(rec, wave)
        finally:
            client.close()

    def _step(self, client: DeviceTransport, rec: dict) -> tuple[dict, str]:
        """One move of the update: (the device's row, DONE | MOVED | POLLED); raises DeviceError."""
        name = rec["device"]
        if rec["state"] == PENDING:
            status = client.status()
            active = release_of(status)
            if active == self._target():
                return self._device(name, policy.ALREADY_ON_RELEASE, detail=f"already on {self.version}"), DONE
            mark = client.mark(self.config.clock_margin_s)
            return self._device(name, policy.REQUEST, mark=mark, from_model=active and active[0],
                                from_version=active and active[1]), MOVED
        if rec["state"] == REQUESTING:
            job_id = client.adopt_job(self.model, self.version, rec["mark"])
            if job_id is None:
                rec = self.store.set_device(self.id, name, requests=rec["requests"] + 1)
                job_id = client.request_update(self.model, self.version, self.repository_url, self.allow_downgrade)
            return self._device(name, policy.JOB, job_id=job_id, detail=f"job {job_id[:8]}"), MOVED
        if rec["state"] == UPDATING:
            job = client.update(rec["job_id"])
            event = policy.job_event(job["state"])
            if event == policy.JOB_ACTIVE:
                return self._device(name, event, detail=f"{self.version} active"), DONE
            if event == policy.JOB_FAILED:
                return self._device(name, event, failure=f"update {job['state']}: {job.get('detail', '')}"[:500]), DONE
            return rec, POLLED
        return rec, DONE

    def _unreachable(self, rec: dict, error: DeviceError, deadline: float) -> dict:
        """Record a failed attempt (the device keeps its state); says one line when this controller
        first finds the device unreachable."""
        name = rec["device"]
        left = max(0.0, deadline - time.monotonic())
        note = f"unreachable ({error.reason}), still {rec['state']}; failed in {left:.0f}s unless it answers"
        self._outages[name] = rec = self.store.note_unreachable(self.id, name, error.reason, time.time() + left, note)
        if name not in self._announced:
            self._announced.add(name)
            self.say(f"  {name}: {note}")
        return rec

    def _answered(self, name: str) -> None:
        """The device answered: clear its outage, if it has one (an event and one line)."""
        self._announced.discard(name)
        outage = self._outages.pop(name, None)
        if outage is not None:
            note = (f"answers again (unreachable since {outage['unreachable_since']}, "
                    f"{outage['unreachable_attempts'] or 0} failed attempts)")
            self.store.clear_unreachable(self.id, name, note)
            self.say(f"  {name}: {note}")

    def _time_out(self, rec: dict, wave: Wave) -> None:
        """Fail a device that reached no final update state in time, saying so if it was unreachable."""
        self._announced.discard(rec["device"])
        outage = self._outages.pop(rec["device"], None)
        why = f"no final update state within {wave.device_timeout_s:g}s (in {rec['state']}"
        if outage is not None:
            why += (f"; unreachable since {outage['unreachable_since']}, last error: {outage['unreachable_error']}, "
                    f"{outage['unreachable_attempts']} failed attempts")
        self._device(rec["device"], policy.TIMED_OUT, failure=(why + ")")[:500], **NO_OUTAGE)

    # ---- gates -----------------------------------------------------------------------------------
    def _gate_wave(self, idx: int, wave: Wave) -> None:
        names = [d["device"] for d in self.store.devices(self.id, idx) if d["state"] == UPDATED]
        map_devices(lambda name: self._gate_device(name, wave), names, wave.max_concurrent)

    def _gate_device(self, name: str, wave: Wave) -> None:
        """Gather the device's figures (its health check first, if asked: a failed one ends it) and
        record the policy's verdict on them."""
        client = self._client(name)
        db = open_fleet_db(self.ws.fleet_db)
        try:
            health = None
            if wave.gates.health_check:
                since = self.store.device(self.id, name)["mark"] or 0.0
                result = client.health_check(self.model, self.version, since)
                health = policy.HealthResult(bool(result.get("passed")), result.get("detail", ""),
                                             bool(result.get("rolled_back")))
            values: dict = {"health": None if health is None else PASSED if health.passed else FAILED}
            if health is None or health.passed:
                client.pull_telemetry(db)
                values["decode_tokens_per_s"], values["peak_rss_bytes"] = self._figures(db, name)
            verdict = policy.device_verdict(wave.gates, policy.Figures(health, values.get("decode_tokens_per_s"),
                                                                       values.get("peak_rss_bytes")))
            if verdict.passed:
                self._device(name, policy.GATES_PASSED, **values, detail=verdict.reason)
            else:
                self._device(name, policy.GATE_FAILED, **values, failure=verdict.reason[:500])
        except DeviceError as e:
            self._device(name, policy.ERROR, failure=f"gates: {e}"[:500])
        finally:
            db.close()
            client.close()

    def _figures(self, db: sqlite_utils.Database, name: str) -> tuple[float | None, int | None]:
        """Decode tokens/s (median) and peak RSS (max) of the device on the new release since its
        update job began: from completions, else from its health checks."""
        rec = self.store.device(self.id, name)
        since = rec["mark"] or 0.0
        for table in ("generations", "health_checks"):
            rows = db.execute(f"SELECT decode_tokens_per_s, peak_rss_bytes FROM {table} WHERE device = ? AND "
                              "model = ? AND version = ? AND ts > ?", [name, self.model, self.version, since]).fetchall()
            if rows:
                return statistics.median(r[0] for r in rows), max(r[1] for r in rows)
        return None, None

    # ---- undo --------------------------------------------------------------------------------------
    def _roll_back(self, name: str, timeout_s: float) -> None:
        """Put the device back on the release it ran before this rollout, if it runs the new one."""
        rec = self.store.device(self.id, name)
        before = (rec["from_model"], rec["from_version"]) if rec["from_version"] else None
        client = self._client(name)
        deadline = time.monotonic() + timeout_s
        asked = False
        try:
            while True:
                try:
                    status = client.status()
                    active, previous = release_of(status), release_of(status, "previous")
                    if rec["state"] == ROLLING_BACK and active == before:
                        self._device(name, policy.ROLLBACK_DONE, detail=f"back on {before[1]}")
                        return
                    if active != self._target():
                        return  # never changed (or already moved on): nothing of ours to undo
                    if before is None or previous != before:
                        self.store.set_device(self.id, name, detail=f"cannot roll back: previous is "
                                                                    f"{previous and previous[1]}, not {rec['from_version']}")
                        return
                    if asked:  # a device that calls home rolls back at its next poll
                        if time.monotonic() >= deadline:
                            self.store.set_device(self.id, name,
                                                  detail=f"rollback asked; not done within {timeout_s:g}s")
                            return
                        time.sleep(self.config.poll_s)
                        continue
                    rec = self._device(name, policy.ROLL_BACK)
                    client.rollback(self.model, self.version)
                    asked = True
                except DeviceError as e:
                    if not e.unreachable or time.monotonic() >= deadline:
                        self.store.set_device(self.id, name, detail=f"rollback: {e}"[:500])
                        return
                    time.sleep(self.config.poll_s)
        finally:
            client.close()

    def _finish_in_flight(self, names: list[str]) -> None:
        """Drive devices left requesting/updating (by a killed stctl) to a final update state."""
        waves = {d["device"]: self.plan.waves[d["wave"]] for d in self.store.devices(self.id)}
        map_devices(lambda name: self._update_device(name, waves[name]), names,
                    max(w.max_concurrent for w in self.plan.waves))

    def _halt(self, idx: int, why: str, event: str) -> str:
        """Halt on wave `idx`'s failed gate (`event`: the gate failed now, or `resume` a halt a killed
        controller began)."""
        wave = self.plan.waves[idx]
        self.store.move_rollout(self.id, event, detail=why[:1000])
        self.say(f"rollout {self.id}: gate failed in wave {idx + 1} ({wave.name}): {why}")
        devices = self.store.devices(self.id, idx)
        self._finish_in_flight([d["device"] for d in devices if d["state"] in IN_FLIGHT])
        if policy.rolls_back(wave):
            names = [d["device"] for d in self.store.devices(self.id, idx) if d["state"] in CHANGED]
            map_devices(lambda name: self._roll_back(name, wave.device_timeout_s), names, wave.max_concurrent)
        self.store.move_rollout(self.id, policy.HALT_DONE, requested="", detail=why[:1000])
        self.say(f"rollout {self.id}: halted" + (" and the wave rolled back" if policy.rolls_back(wave) else ""))
        return HALTED

    def _abort(self, event: str) -> str:
        """Abort (`event`: asked now, or `resume` an abort a killed controller began)."""
        self.store.move_rollout(self.id, event, detail="abort requested")
        self.say(f"rollout {self.id}: aborting; rolling back the devices it updated")
        self._finish_in_flight([d["device"] for d in self.store.devices(self.id) if d["state"] in IN_FLIGHT])
        names = [d["device"] for d in self.store.devices(self.id) if d["state"] in CHANGED]
        timeout = max(w.device_timeout_s for w in self.plan.waves)
        map_devices(lambda name: self._roll_back(name, timeout), names, max(w.max_concurrent for w in self.plan.waves))
        self.store.move_rollout(self.id, policy.ABORT_DONE, requested="", detail="aborted")
        self.say(f"rollout {self.id}: aborted")
        return ABORTED


# ---- the library API (one call per command) -------------------------------------------------------
def create_rollout(workspace: Workspace, model: str, version: str, plan_file: str | Path,
                   repository_url: str | None = None, allow_downgrade: bool = False) -> int:
    """Validate everything (plan, release, devices, no other rollout running) and record the rollout;
    nothing is recorded and no device is contacted if any check fails."""
    path = Path(plan_file)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise RolloutError(f"{path}: cannot read the plan ({e.strerror or e})") from None
    try:
        plan = parse_plan(text, str(path))
    except ManifestError as e:
        raise RolloutError(f"{path}: {e}") from None
    store = RolloutStore(workspace.fleet_db)
    try:
        published = store.db.execute("SELECT 1 FROM releases WHERE model = ? AND version = ?", [model, version]).fetchone()
        if not published:
            raise RolloutError(f"{model} {version} is not published in this workspace; `stctl model publish` it first")
        devices = {d["name"]: d["tags"] for d in enrolled(workspace)}
        if not devices:
            raise RolloutError("no enrolled devices; `stctl device enroll` them first")
        try:
            waves = select_devices(plan, devices)
        except ManifestError as e:
            raise RolloutError(f"{path}: {e}") from None
        if (running := store.latest(unfinished_only=True)) is not None:
            raise RolloutError(f"rollout {running['id']} ({running['model']} {running['version']}) is {running['state']}; "
                               "resume or abort it first")
        return store.create({"model": model, "version": version, "plan": plan.to_json(), "plan_file": str(path),
                             "repository_url": repository_url or "", "allow_downgrade": int(allow_downgrade),
                             "state": RUNNING, "wave": 0, "requested": "", "detail": ""},
                            [(w.name, names) for w, names in zip(plan.waves, waves)])
    finally:
        store.close()


def _busy() -> RolloutError:
    return RolloutError("another stctl process (or the fleet server) is driving a rollout in this workspace; "
                        "use `stctl rollout status`, `pause` or `abort`")


def _drive(workspace: Workspace, rollout_id: int, config: RolloutConfig, say: Callable[[str], None]) -> None:
    """Be the rollout's controller until it pauses or ends (the caller holds the rollout lock)."""
    store = RolloutStore(workspace.fleet_db)
    try:
        if store.rollout(rollout_id)["state"] in ROLLOUT_FINAL:
            raise RolloutError(f"rollout {rollout_id} is {store.rollout(rollout_id)['state']}; start a new one")
        Controller(workspace, store, rollout_id, config, say).run()
    finally:
        store.close()


def run_rollout(workspace: Workspace, rollout_id: int, config: RolloutConfig = RolloutConfig(),
                say: Callable[[str], None] = lambda _m: None) -> dict:
    """Drive the rollout (this process becomes its controller) until it pauses or ends."""
    with ControllerLock(workspace).held(_busy()):
        _drive(workspace, rollout_id, config, say)
    return rollout_status(workspace, rollout_id)


def start_rollout(workspace: Workspace, model: str, version: str, plan_file: str | Path, *,
                  repository_url: str | None = None, allow_downgrade: bool = False, detach: bool = False,
                  config: RolloutConfig = RolloutConfig(), say: Callable[[str], None] = lambda _m: None) -> dict:
    """Create the rollout and drive it here; `detach`: only create it, for the fleet server
    (`stctl server serve`) to drive. The lock is taken before the rollout exists, so the server
    never starts on a rollout this process is about to drive."""
    if detach:
        rollout_id = create_rollout(workspace, model, version, plan_file, repository_url, allow_downgrade)
        say(f"rollout {rollout_id}: {model} {version}; left to the fleet server")
        return rollout_status(workspace, rollout_id)
    with ControllerLock(workspace).held(_busy()):
        rollout_id = create_rollout(workspace, model, version, plan_file, repository_url, allow_downgrade)
        say(f"rollout {rollout_id}: {model} {version}")
        _drive(workspace, rollout_id, config, say)
    return rollout_status(workspace, rollout_id)


def _pick(store: RolloutStore, rollout_id: int | None, unfinished: bool = True) -> dict:
    if rollout_id is not None:
        return store.rollout(rollout_id)
    row = store.latest(unfinished_only=unfinished)
    if row is None:
        raise RolloutError("no unfinished rollout" if unfinished else "no rollout yet")
    return row


def resume_rollout(workspace: Workspace, rollout_id: int | None = None, config: RolloutConfig = RolloutConfig(),
                   say: Callable[[str], None] = lambda _m: None, detach: bool = False) -> dict:
    """Drive the rollout here from where it stands; `detach`: only mark a paused rollout running,
    for the fleet server to drive."""
    store = RolloutStore(workspace.fleet_db)
    try:
        row = _pick(store, rollout_id)
        if row["state"] in ROLLOUT_FINAL:
            raise RolloutError(f"rollout {row['id']} is {row['state']}; start a new one")
        if detach:
            if row["state"] == PAUSED:
                store.move_rollout(row["id"], policy.RESUME, requested="", detail="resumed; left to the fleet server")
            say(f"rollout {row['id']}: left to the fleet server")
            return rollout_status(workspace, row["id"])
    finally:
        store.close()
    say(f"rollout {row['id']}: resuming ({row['state']}, wave {row['wave'] + 1})")
    return run_rollout(workspace, row["id"], config, say)


def pause_rollout(workspace: Workspace, rollout_id: int | None = None) -> dict:
    """Ask the running controller to pause (it lets updates in flight finish); pauses at once if
    no controller is running (stctl was killed)."""
    store = RolloutStore(workspace.fleet_db)
    try:
        row = _pick(store, rollout_id)
        if not policy.rollout_allows(row["state"], PAUSE):
            raise RolloutError(f"rollout {row['id']} is {row['state']}; only a running rollout pauses")
        lock = ControllerLock(workspace)
        if lock.acquire():
            try:
                store.move_rollout(row["id"], PAUSE, detail="paused (no controller was running)")
            finally:
                lock.release()
        else:
            store.set_rollout(row["id"], requested=PAUSE)
        return {"id": row["id"], **{k: store.rollout(row["id"])[k] for k in ("state", "requested")}}
    finally:
        store.close()


def abort_rollout(workspace: Workspace, rollout_id: int | None = None, config: RolloutConfig = RolloutConfig(),
                  say: Callable[[str], None] = lambda _m: None) -> dict:
    """Abort: roll back every device the rollout updated. Done here if no controller runs (or
    once the one running lets go of the lock); otherwise asks the controller and waits (bounded)
    until it has aborted."""
    store = RolloutStore(workspace.fleet_db)
    try:
        row = _pick(store, rollout_id)
        if row["state"] in ROLLOUT_FINAL:
            raise RolloutError(f"rollout {row['id']} is {row['state']}; nothing to abort")
        store.set_rollout(row["id"], requested=ABORT)
        lock = ControllerLock(workspace)
        deadline = time.monotonic() + config.abort_wait_s
        while True:  # whoever holds the lock aborts; once it is free (never taken, or let go) this process does
            if lock.acquire():
                try:
                    if store.rollout(row["id"])["state"] != ABORTED:
                        Controller(workspace, store, row["id"], config, say).run()
                finally:
                    lock.release()
                break
            if store.rollout(row["id"])["state"] == ABORTED:
                break
            if time.monotonic() >= deadline:
                raise RolloutError(f"rollout {row['id']}: the controller did not finish the abort within "
                                   f"{config.abort_wait_s:g}s; run `stctl rollout abort` again")
            time.sleep(config.poll_s)
    finally:
        store.close()
    return rollout_status(workspace, row["id"])


def _outage(device: dict, now: float) -> dict | None:
    """A device's outage as `rollout status` shows it (None while it answers): `time_left_s` is what
    remains of its device timeout until `fails_at`, the instant its controller will fail it."""
    if not device["unreachable_since"]:
        return None
    return {"since": device["unreachable_since"], "last_error": device["unreachable_error"] or "",
            "attempts": device["unreachable_attempts"] or 0,
            "time_left_s": round(max(0.0, (device["fails_at"] or now) - now), 1)}


def rollout_status(workspace: Workspace, rollout_id: int | None = None) -> dict:
    """The rollout, its waves (device counts per state) and devices; `unreachable` of a device is
    null while it answers, else `{since, last_error, attempts, time_left_s}`."""
    store = RolloutStore(workspace.fleet_db)
    try:
        row = _pick(store, rollout_id, unfinished=False)
        devices = store.devices(row["id"])
        now = time.time()
        outages = {d["device"]: _outage(d, now) for d in devices}
        waves = []
        plan = RolloutPlan.from_json(row["plan"])
        for w in store.waves(row["id"]):
            members = [d for d in devices if d["wave"] == w["idx"]]
            counts: dict[str, int] = {}
            for d in members:
                counts[d["state"]] = counts.get(d["state"], 0) + 1
            done = sum(1 for d in members if d["state"] not in (PENDING, *IN_FLIGHT))
            waves.append({"index": w["idx"], "name": w["name"], "state": w["state"], "devices": len(members),
                          "done": done, "failed": sum(1 for d in members if d["failure"]), "counts": counts,
                          "unreachable": sum(1 for d in members if outages[d["device"]]),
                          "soak_s": plan.waves[w["idx"]].soak_s, "detail": w["detail"]})
        return {"id": row["id"], "model": row["model"], "version": row["version"], "state": row["state"],
                "requested": row["requested"] or None, "wave": row["wave"], "detail": row["detail"],
                "plan_file": row["plan_file"], "created_at": row["created_at"], "updated_at": row["updated_at"],
                "waves": waves,
                "devices": [{**{k: d[k] for k in ("device", "wave", "state", "from_version", "job_id", "requests",
                                                  "decode_tokens_per_s", "peak_rss_bytes", "health", "failure",
                                                  "detail")}, "unreachable": outages[d["device"]]}
                            for d in devices]}
    finally:
        store.close()


def rollout_events(workspace: Workspace, rollout_id: int) -> list[dict]:
    store = RolloutStore(workspace.fleet_db)
    try:
        return store.events(rollout_id)
    finally:
        store.close()


__all__ = ["RolloutConfig", "RolloutError", "abort_rollout", "create_rollout", "pause_rollout", "resume_rollout",
           "rollout_events", "rollout_status", "run_rollout", "start_rollout"]
