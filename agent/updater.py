"""The update worker: runs jobs through the lifecycle table with the release client, the blob
store, the installation, the health check and (in the daemon) the serving engine holder.

Rules:
- one update at a time per data dir, across processes (an exclusive lock on `.update.lock`,
  held from the request to the job's end, or until it waits at staged), and a new job is refused
  while an unfinished one exists (it resumes when the daemon starts), unless that one waits;
- a held job (stage only, `Job.hold`) stops at `staged` and waits there without the lock: a
  rollback, a health check or a bundle install may run meanwhile, and garbage collection keeps
  its staged release. A restart leaves it waiting (not counted as a visit). `release` lets it go
  on (the cleared hold is saved before anything runs, so a crash after that installs it); a
  `request` for the same release takes the waiting job (released, or still held if it asks for
  that), one for another release (or a bundle) withdraws it first: it ends `failed`, "withdrawn";
- every state's work is idempotent, so a job killed at any instant resumes from its saved state:
  fetching resumes downloads, verifying re-materializes, health-checking re-checks, activating
  re-applies the same pointer;
- a release is activated only after its health check passed, with the engine that passed;
- a job that ends releases its scratch files first (temp files always; a full disk frees its
  space), then saves its final state, then collects garbage (keeping the active and previous
  releases' blobs). Its resume data (partial downloads, verified blobs not yet installed) stays
  for the next job when the job ended in a way that leaves it valid: a transport failure (the
  repository unreachable through the retry window), a release the repository does not have, or
  nothing to do (already active, a rollback); what stays untouched for
  `download_leftovers_max_age_s` is collected then. Any other end frees it: a verification
  failure, a full disk or too little room, a store error, a failed health check, success;
- `shutdown` makes a job under way stop at its next backoff wait or chunk: it stays in its
  state (nothing lost) and resumes when the daemon starts again;
- a release that fails its first health check after activation, or whose daemon keeps dying
  before that check (`max_probation_boots`), is rolled back automatically;
- a job's `max_bytes_per_s` caps the rate of its downloads (`agent.rate_limit`); a waiting job
  taken by a new request keeps its own;
- every fetch also brings the fleet CA's CRL when the repository (or bundle) has one; it is
  taken before the release is fetched (`agent.revocation`: a refused CRL is logged, the job goes on);
- every transition writes one `updates` row.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from agent.blobstore import BlobStore
from agent.config import DeviceConfig, Limits
from agent.errors import (
    AgentError, InstallError, ReleaseNotFoundError, TransportError, UpdateRefusedError, UpdateStoppedError,
)
from agent.fetcher import FetcherConfig
from common.locks import FileLock
from agent.health import HealthResult, check_release
from agent.install import Installation, Pointer, ReleaseRef
from agent.lifecycle import (
    ACTIVATING, ACTIVE, FETCHING, FINAL, HEALTH_CHECKING, IDLE, LOOP_EXIT, STAGED, STATES, VERIFYING, Job, JobStore,
    enter, next_state, over_visits, transition,
)
from agent.revocation import DeviceCrl
from agent.serving import Serving, close_engine, load_engine
from agent.telemetry import Telemetry
from agent.tuf_client import ClientConfig, ReleaseClient, verify_bundle
from manifests import ManifestError
from manifests.enrollment import check_repository_url
from manifests.model_manifest import parse_version
from model.errors import ModelError
from model.kernels import describe as describe_kernels

log = logging.getLogger("st-agent.updater")
BUNDLE_SOURCE = "bundle:"
FINISHING_WAIT_S = 60.0  # how long a request waits for a finished job's garbage collection
_HANDLED = (AgentError, ModelError, ManifestError, OSError)
_RESUME_DATA_STAYS_VALID = (TransportError, ReleaseNotFoundError)  # failures that leave partials and blobs good
_NOTHING_DONE = ("already_active", "rolled_back")  # endings of a job that fetched nothing now


@dataclass
class Progress:
    done: int = 0
    total: int = 0
    label: str = ""


class Updater:
    """Update jobs, rollbacks and health checks of one data dir (`serving` is None outside the daemon)."""

    def __init__(self, config: DeviceConfig, telemetry: Telemetry, serving: Serving | None = None):
        self.config, self.telemetry, self.serving = config, telemetry, serving
        self.limits = config.limits
        self.store = BlobStore(config.store_dir)
        self.install = Installation(config, self.store)
        self.jobs = JobStore(config.jobs_dir, config.limits.jobs_kept)
        self.crl = DeviceCrl(config)  # takes the CRL every fetch brings (agent.revocation)
        self.lock = FileLock(config.update_lock)  # the data dir's one update at a time
        self.progress: dict[str, Progress] = {}
        self.finished_by_state: dict[str, int] = {}
        self._engines: dict = {}  # job id -> the engine that passed its health check
        self._worker: threading.Thread | None = None
        self._worker_job: Job | None = None
        self._parked = False  # the worker's job stopped at staged to wait (its thread is ending)
        self._hold_guard = threading.Lock()  # between parking and a release of the worker's job
        self._stop = threading.Event()
        self._handlers = {IDLE: self._begin, FETCHING: self._fetch, VERIFYING: self._verify,
                          STAGED: lambda job: "check", HEALTH_CHECKING: self._check, ACTIVATING: self._activate}

    # ---- requests ------------------------------------------------------------------------------
    def request(self, model: str | None, version: str | None, repository_url: str | None = None,
                allow_downgrade: bool = False, bundle: Path | None = None, hold: bool = False,
                max_bytes_per_s: int | None = None) -> Job:
        """Create a job, or take the waiting one of the same release (the lock is taken and held
        until the job ends or waits; run it with `run` or `start`). `hold`: stop at staged."""
        if bundle is None:
            target = ReleaseRef(model, version)
            try:
                url = check_repository_url(repository_url or self.config.repository_url)
            except ManifestError as e:
                raise UpdateRefusedError(str(e)) from None
            self._check_downgrade(target, allow_downgrade)
            source = url
        elif hold:
            raise UpdateRefusedError("a bundle install cannot be held at staged")
        else:
            model, version, source = "", "", BUNDLE_SOURCE + str(Path(bundle).resolve())
        self._await_finishing_worker()
        if not self.lock.acquire():
            raise UpdateRefusedError("another update, rollback or bundle install is in progress on this device")
        try:
            if (pending := self.jobs.unfinished()) is not None and pending.waits:
                if bundle is None and (pending.model, pending.version) == (model, version):
                    return self._take(pending, hold)
                self._step(pending, "withdrawn", f"withdrawn: replaced by a request for "
                                                 f"{f'{model}@{version}' if bundle is None else 'a bundle'}")
            elif pending is not None:
                raise UpdateRefusedError(f"update {pending.id} is unfinished ({pending.state}); it resumes when "
                                         "the agent starts")
            active = self.install.pointer().active
            job = Job.new(model, version, active.version if active else None, source, allow_downgrade, hold,
                          max_bytes_per_s)
            self.jobs.save(job)
            self._record(job)
        except BaseException:
            self.lock.release()
            raise
        return job

    def _take(self, job: Job, hold: bool) -> Job:
        """The waiting `job` asked for again (the caller holds the lock): held still, or released."""
        if not hold:
            job.hold = False
            job.detail = "released to install"
            self.jobs.save(job)
            self._record(job)
        return job

    def waiting(self) -> Job | None:
        """The job that waits at staged (no worker runs it), if any."""
        if self.busy() and not self._parked:
            return None
        job = self.jobs.unfinished()
        return job if job is not None and job.waits else None

    def held(self) -> Job | None:
        """The held job: the worker's (it stops at staged) or the one waiting there."""
        worker = self._worker_job
        if self.busy() and worker is not None and worker.hold and not self._parked:
            return worker
        return self.waiting()

    def release(self, job_id: str) -> Job | None:
        """Let the held job `job_id` go on to install: the worker's passes staged, a waiting one is
        taken and started. None: no such held job."""
        with self._hold_guard:
            worker = self._worker_job
            if self.busy() and worker is not None and worker.id == job_id and worker.hold and not self._parked:
                worker.hold = False  # saved at its next transition; a crash before it: it waits, released again
                return worker
        waiting = self.waiting()
        if waiting is None or waiting.id != job_id:
            return None
        job = self.request(waiting.model, waiting.version, waiting.source, waiting.allow_downgrade,
                           max_bytes_per_s=waiting.max_bytes_per_s)
        self.start(job)
        return job

    def withdraw(self, job_id: str, reason: str) -> Job | None:
        """End the waiting job `job_id` without installing it (`failed`, "withdrawn: ..."). None: no
        such waiting job."""
        self._await_finishing_worker()
        with self.lock.held(UpdateRefusedError("an update is in progress")):
            job = self.waiting()
            if job is None or job.id != job_id:
                return None
            self._step(job, "withdrawn", f"withdrawn: {reason}")
            return job

    def _check_downgrade(self, target: ReleaseRef, allow: bool) -> None:
        active = self.install.pointer().active
        if allow or active is None or active.model != target.model:
            return
        if parse_version(target.version) < parse_version(active.version):
            raise UpdateRefusedError(f"{target} is older than the active {active}; set allow_downgrade to install it")

    def _await_finishing_worker(self) -> None:
        """A job that already reports its final state (or that waits) still holds the lock while it
        collects garbage (or ends its thread): a request seen after that state waits for the worker
        to end instead of being refused."""
        if self.busy() and self._worker_job is not None and (self._worker_job.finished or self._parked):
            self.join(FINISHING_WAIT_S)

    def start(self, job: Job) -> None:
        """Run `job` in a background thread (the daemon)."""
        self._worker_job, self._parked = job, False
        self._worker = threading.Thread(target=self.run, args=(job,), name=f"update-{job.id[:8]}", daemon=True)
        self._worker.start()

    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def join(self, timeout: float) -> None:
        if self._worker is not None:
            self._worker.join(timeout)

    def shutdown(self, timeout: float) -> None:
        """Stop the job under way at its next backoff wait or chunk (it resumes at the next start)
        and wait up to `timeout` for the worker to end."""
        self._stop.set()
        self.join(timeout)

    # ---- the job loop ----------------------------------------------------------------------------
    def run(self, job: Job) -> Job:
        """Walk `job` to a final state (the caller holds the lock; it is released at the end)."""
        try:
            bound = len(STATES) * (self.limits.max_state_visits + 1)
            for _ in range(bound):
                if job.finished or self._stop.is_set() or self._parks(job):
                    break
                if over_visits(job, self.limits.max_state_visits):
                    self._give_up(job)
                    continue
                error = None
                try:
                    event, detail = self._handlers[job.state](job), ""
                except UpdateStoppedError as e:
                    log.info("update %s stopped in %s (%s); it resumes at the next start", job.id, job.state, e)
                    self.jobs.save(job)
                    break
                except _HANDLED as e:
                    error, event, detail = e, LOOP_EXIT[job.state], f"{job.state}: {e}"
                    log.warning("update %s failed in %s: %s", job.id, job.state, e)
                    if job.state == ACTIVATING:  # the pointer may have moved: move it back
                        self._undo_activation(job)
                self._step(job, event, detail, error)
            return job
        finally:
            self.progress.pop(job.id, None)
            self._drop_engine(job.id)
            self.lock.release()

    def _parks(self, job: Job) -> bool:
        """Whether `job` stops here to wait at staged (saved as waiting; the lock is released)."""
        with self._hold_guard:
            if not job.waits:
                return False
            self._parked = True
        job.detail = "staged; held until released to install"
        self.jobs.save(job)
        self._record(job)
        log.info("update %s is staged and waits to be released", job.id)
        return True

    def _step(self, job: Job, event: str, detail: str = "", error: BaseException | None = None) -> None:
        if next_state(job.state, event) in FINAL:  # first: frees the space a full disk needs to save the state
            if isinstance(error, _RESUME_DATA_STAYS_VALID) or (error is None and event in _NOTHING_DONE):
                self.install.clean_temp()
                self.store.collect_stale(self.limits.download_leftovers_max_age_s)
            else:
                self.install.clean_scratch()
        transition(job, event, self.jobs, detail)
        self._record(job)
        if job.finished:
            self.finished_by_state[job.state] = self.finished_by_state.get(job.state, 0) + 1
            self._collect_garbage(job)

    def _record(self, job: Job) -> None:
        self.telemetry.record("updates", {"job_id": job.id, "model": job.model, "from_version": job.from_version,
                                          "to_version": job.version, "state": job.state, "detail": job.detail,
                                          "bytes_downloaded": job.bytes_downloaded, "bytes_total": job.bytes_total})

    def _give_up(self, job: Job) -> None:
        state, visits = job.state, job.visits.get(job.state, 0)
        if state == ACTIVATING:
            self._undo_activation(job)
        self._step(job, LOOP_EXIT[state], f"{state}: entered {visits} times (crash loop); gave up")

    def _collect_garbage(self, job: Job) -> None:
        try:
            waiting = self.jobs.unfinished()
            keep = frozenset({_ref(waiting)} if waiting is not None and waiting.waits else ())
            self.install.gc(also_keep=keep)
            self.jobs.prune()
        except _HANDLED as e:
            log.warning("garbage collection after %s: %s", job.id, e)

    def _drop_engine(self, job_id: str) -> None:
        engine = self._engines.pop(job_id, None)
        if engine is not None:
            close_engine(engine)

    # ---- the states ----------------------------------------------------------------------------
    def _begin(self, job: Job) -> str:
        active = self.install.pointer().active
        if job.model and active == ReleaseRef(job.model, job.version):
            job.detail = "already active"
            return "already_active"
        return "start"

    def _fetch(self, job: Job) -> str:
        progress = self.progress[job.id] = Progress()

        def report(done: int, total: int, label: str) -> None:
            progress.done, progress.total, progress.label = done, total, label

        trusted_root = self.config.trusted_root.read_bytes()
        config = client_config(self.limits, job.max_bytes_per_s)
        try:
            if job.source.startswith(BUNDLE_SOURCE):
                release = verify_bundle(job.source[len(BUNDLE_SOURCE):], trusted_root, self.config.bundle_tuf_dir,
                                        self.store, report, config, on_crl=self.crl.offer)
                job.model, job.version = release.manifest.name, release.manifest.version
                self._check_downgrade(ReleaseRef(job.model, job.version), job.allow_downgrade)
            else:
                client = ReleaseClient(self.config.tuf_dir, job.source, trusted_root, self.store, report, config,
                                       stop=self._stop, on_crl=self.crl.offer)
                release = client.fetch_release(job.model, job.version)
        finally:
            job.bytes_downloaded += progress.done  # what this try transferred, failed or not
        job.manifest_sha256 = self.store.put(release.manifest_bytes)
        job.bytes_total = release.bytes_total
        job.shards_downloaded += release.shards_downloaded
        return "fetched"

    def _verify(self, job: Job) -> str:
        with self.store.open(job.manifest_sha256) as f:
            manifest_bytes = f.read()
        ref, _ = self.install.stage(manifest_bytes)
        if ref != ReleaseRef(job.model, job.version):
            raise InstallError(f"the fetched manifest is {ref}, not {job.model}@{job.version}")
        return "verified"

    def _check(self, job: Job) -> str:
        folder = self.install.release_dir(ReleaseRef(job.model, job.version))
        result, engine = check_release(folder, self.config, self.telemetry, keep_engine=self.serving is not None)
        if not result.passed:
            job.detail = f"health check failed: {result.detail}"
            return "check_failed"
        self._drop_engine(job.id)
        if engine is not None:
            self._engines[job.id] = engine
        return "passed"

    def _activate(self, job: Job) -> str:
        ref = ReleaseRef(job.model, job.version)
        pointer = self.install.activate(ref)
        if self.serving is not None and self.serving.current() != (ref.model, ref.version):
            engine = self._engines.pop(job.id, None) or load_engine(self.install.release_dir(ref), self.config)
            self.serving.swap(engine, ref.model, ref.version)
        job.detail = "activated" + ("; on probation until its first health check passes" if pointer.probation else "")
        return "activated"

    def _undo_activation(self, job: Job) -> None:
        pointer = self.install.pointer()
        if pointer.active == ReleaseRef(job.model, job.version) and pointer.previous is not None:
            self._switch_to(self.install.rollback())

    # ---- rollback and health ------------------------------------------------------------------
    def _switch_to(self, pointer: Pointer) -> None:
        if self.serving is not None and pointer.active is not None and \
                self.serving.current() != (pointer.active.model, pointer.active.version):
            self.serving.swap(load_engine(self.install.release_dir(pointer.active), self.config),
                              pointer.active.model, pointer.active.version)

    def _roll_back(self, reason: str) -> Pointer:
        """Swap to the previous release (the caller holds the lock); marks the job that installed
        the release being left `rolled_back`."""
        leaving = self.install.pointer().active
        pointer = self.install.rollback()
        self._switch_to(pointer)
        job = next((j for j in reversed(self.jobs.all()) if j.state == ACTIVE and leaving == _ref(j)), None)
        if job is not None:
            self._step(job, "rolled_back", reason)
        else:
            self.telemetry.record("updates", {"job_id": "", "model": leaving.model, "from_version": leaving.version,
                                              "to_version": pointer.active.version, "state": "rolled_back",
                                              "detail": reason})
        return pointer

    def rollback(self, reason: str = "rollback requested") -> Pointer:
        with self.lock.held(UpdateRefusedError("an update is in progress; roll back after it ends")):
            return self._roll_back(reason)

    def check_active(self) -> tuple[HealthResult, bool]:
        """Health-check the active release: a pass ends its probation, a failure on probation rolls
        it back. Returns (result, rolled back?)."""
        pointer = self.install.pointer()
        if pointer.active is None:
            raise InstallError("no release is active")
        result, _ = check_release(self.install.release_dir(pointer.active), self.config, self.telemetry)
        if result.passed:
            self.install.confirm()
            return result, False
        if not pointer.probation or not self.lock.acquire():
            return result, False
        try:
            self._roll_back(f"first health check after activation failed: {result.detail}")
        finally:
            self.lock.release()
        return result, True

    # ---- the daemon's start ----------------------------------------------------------------------
    def boot(self) -> Job | None:
        """Recover after a start (or a crash): count a probation boot (rolling back a crash loop),
        load the active engine, and resume an unfinished job in the background (one that waits at
        staged keeps waiting: None)."""
        if not self.lock.acquire():
            raise UpdateRefusedError("another process holds this data dir's update lock (a bundle install?)")
        try:
            self.install.clean_temp()
            pointer = self.install.count_probation_boot()
            if pointer.probation and pointer.probation_boots > self.limits.max_probation_boots:
                pointer = self._roll_back(f"{pointer.active} kept crashing on probation "
                                          f"({pointer.probation_boots - 1} starts); rolled back")
            try:
                self._switch_to(pointer)
            except ModelError as e:  # the active release no longer loads (a shard fails its hash)
                if pointer.previous is None:
                    raise
                self._roll_back(f"{pointer.active} failed to load: {e}")
        except BaseException:
            self.lock.release()
            raise
        job = self.jobs.unfinished()
        if job is None or job.waits:
            self.lock.release()
            return None
        enter(job, self.jobs, "resumed after a restart")
        self._record(job)
        self.start(job)
        return job

    def sync_pointer(self) -> None:
        """Serve what the pointer names (another process, `st-agent bundle install`, may have moved it)."""
        if self.busy() or not self.lock.acquire():
            return
        try:
            self._switch_to(self.install.pointer())
        finally:
            self.lock.release()

    def status(self) -> dict:
        pointer = self.install.pointer()
        job = self.jobs.unfinished()
        serving = self.serving.current() if self.serving is not None else None
        return {"device": self.config.name, "active": pointer.active and pointer.active.to_dict(),
                "previous": pointer.previous and pointer.previous.to_dict(), "probation": pointer.probation,
                "update": job_view(job, self.progress.get(job.id)) if job is not None else None,
                "serving": "@".join(serving) if serving else None, "kernel": describe_kernels() if serving else None}


def client_config(limits: Limits, max_bytes_per_s: int | None = None) -> ClientConfig:
    """The release client's limits from the device's (and a job's bandwidth cap)."""
    return ClientConfig(disk_margin_bytes=limits.download_disk_margin_bytes, fetcher=FetcherConfig(
        socket_timeout=limits.download_socket_timeout_s, retry_window_s=limits.download_retry_window_s,
        retry_first_delay_s=limits.download_retry_first_delay_s, retry_max_delay_s=limits.download_retry_max_delay_s,
        max_bytes_per_s=max_bytes_per_s))


def _ref(job: Job) -> ReleaseRef | None:
    try:
        return ReleaseRef(job.model, job.version)
    except InstallError:
        return None


def job_view(job: Job, progress: Progress | None = None) -> dict:
    view = {k: v for k, v in job.to_dict().items() if k != "source"}
    view["source"] = "bundle" if job.source.startswith(BUNDLE_SOURCE) else job.source
    if progress is not None:
        view["progress"] = {"done": progress.done, "total": progress.total, "label": progress.label}
    return view
