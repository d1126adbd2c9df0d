"""The update lifecycle: an explicit table of states and events, and the jobs that walk it.

    idle --start--> fetching --fetched--> verifying --verified--> staged --check--> health-checking
    health-checking --passed--> activating --activated--> active
    idle --already_active--> active
    any unfinished state --error--> failed;  health-checking --check_failed--> failed
    activating --gave_up--> rolled_back;  active --rolled_back--> rolled_back
    staged --withdrawn--> failed  (a held job that a newer request replaced)

A job may be held (`hold`, "stage only"): it walks the table up to `staged` and waits there,
fetched and verified, nothing activated, until it is released (`hold` cleared and saved, then
`check` as usual) or withdrawn. Waiting is not a state of its own (the API's state list is
fixed): it is `staged` with `hold` set; nothing runs while a job waits, and a wait is no visit.

Rules: a job moves only along `TRANSITIONS`; the job (its state, counters and detail) is saved
at every transition with an atomic write + fsync, so after a crash it resumes from the state it
was in; entering a state more than `max_state_visits` times (a crash loop) ends the job:
`failed` before activation, `rolled_back` in activation. `active`, `failed` and `rolled_back`
are final, except that an `active` job is marked `rolled_back` when its release is rolled back.
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from agent.errors import AgentError
from common.files import atomic_write_json, read_json
from manifests.job_states import (  # the state names are the API's: one list, shared with stctl
    ACTIVATING, ACTIVE, FAILED, FETCHING, FINAL, HEALTH_CHECKING, IDLE, ROLLED_BACK, STAGED, STATES, UNFINISHED,
    VERIFYING,
)

TRANSITIONS: dict[tuple[str, str], str] = {
    (IDLE, "start"): FETCHING,
    (IDLE, "already_active"): ACTIVE,
    (FETCHING, "fetched"): VERIFYING,
    (VERIFYING, "verified"): STAGED,
    (STAGED, "check"): HEALTH_CHECKING,
    (HEALTH_CHECKING, "passed"): ACTIVATING,
    (HEALTH_CHECKING, "check_failed"): FAILED,
    (ACTIVATING, "activated"): ACTIVE,
    (ACTIVATING, "gave_up"): ROLLED_BACK,
    (ACTIVE, "rolled_back"): ROLLED_BACK,
    (STAGED, "withdrawn"): FAILED,
    **{(state, "error"): FAILED for state in UNFINISHED},
}
assert {s for pair in TRANSITIONS for s in (pair[0], TRANSITIONS[pair])} <= set(STATES), "a state outside the API's list"
# the event that ends a job stuck in a state (entered too often)
LOOP_EXIT = {state: ("gave_up" if state == ACTIVATING else "error") for state in UNFINISHED}

_JOB_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)


class TransitionError(AgentError):
    """An event that the lifecycle table does not allow in the job's state."""


def next_state(state: str, event: str) -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"event {event!r} is not allowed in state {state!r}") from None


@dataclass
class Job:
    """One update: what to install, from where, and how far it got."""

    id: str
    model: str
    version: str
    from_version: str | None
    source: str  # a repository URL, or "bundle:<path>"
    allow_downgrade: bool = False
    hold: bool = False  # stage only: wait at `staged` until released
    max_bytes_per_s: int | None = None  # the bandwidth cap of its downloads (None: none)
    state: str = IDLE
    detail: str = ""
    visits: dict[str, int] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # every state entered, in order
    manifest_sha256: str | None = None
    bytes_downloaded: int = 0
    bytes_total: int = 0
    shards_downloaded: int = 0
    created: float = 0.0
    updated: float = 0.0

    @classmethod
    def new(cls, model: str, version: str, from_version: str | None, source: str, allow_downgrade: bool,
            hold: bool = False, max_bytes_per_s: int | None = None) -> Job:
        now = time.time()
        return cls(uuid.uuid4().hex, model, version, from_version, source, allow_downgrade, hold, max_bytes_per_s,
                   created=now, updated=now, history=[IDLE])

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    @property
    def waits(self) -> bool:
        """Held at `staged`: fetched and verified, waiting to be released (or withdrawn)."""
        return self.state == STAGED and self.hold

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class JobStore:
    """`jobs/<id>.json`, one file per job, each replaced atomically."""

    def __init__(self, folder: Path, keep: int):
        self.folder = folder
        self.keep = keep
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise KeyError(job_id)
        return self.folder / f"{job_id}.json"

    def save(self, job: Job) -> None:
        job.updated = time.time()
        atomic_write_json(self.path(job.id), job.to_dict())

    def load(self, job_id: str) -> Job:
        d = read_json(self.path(job_id))
        if d is None:
            raise KeyError(job_id)
        return Job.from_dict(d)

    def all(self) -> list[Job]:
        """Every job on disk, oldest first (unreadable files are skipped)."""
        jobs = []
        for path in self.folder.glob("*.json"):
            try:
                jobs.append(Job.from_dict(read_json(path)))
            except (ValueError, TypeError, AttributeError):
                continue
        return sorted(jobs, key=lambda j: (j.created, j.id))

    def unfinished(self) -> Job | None:
        return next((j for j in reversed(self.all()) if not j.finished), None)

    def prune(self) -> None:
        """Keep the newest `keep` finished jobs."""
        finished = [j for j in self.all() if j.finished]
        for job in finished[:-self.keep] if len(finished) > self.keep else []:
            self.path(job.id).unlink(missing_ok=True)


def transition(job: Job, event: str, store: JobStore, detail: str = "") -> Job:
    """Apply `event`: the new state is saved before anything of it runs."""
    job.state = next_state(job.state, event)
    return enter(job, store, detail)


def enter(job: Job, store: JobStore, detail: str = "") -> Job:
    """Count an entry into the job's current state (also on resume after a crash) and save."""
    job.visits[job.state] = job.visits.get(job.state, 0) + 1
    job.history.append(job.state)
    if detail:
        job.detail = detail
    store.save(job)
    return job


def over_visits(job: Job, cap: int) -> bool:
    return not job.finished and job.visits.get(job.state, 0) > cap
