"""Rollout policy: the states of a rollout, of its waves and of their devices, the transitions
allowed between them, and the verdicts of the gates.

    Rollout:  running --pause--> paused --resume--> running
              running --gate_failed--> halting --halted--> halted
              running|paused|halting --abort--> aborting --aborted--> aborted
              running --completed--> completed
              running|halting|aborting --resume--> itself (a controller takes over after a kill)
    Wave:     pending --start--> updating --updated--> soaking --soaked--> gating --gates_passed--> passed
              updating|gating --gate_failed--> failed;  updating --resume--> updating
    Device:   pending --request--> requesting --job--> updating --job_active--> updated --gates_passed--> passed
              pending --already_on_release--> skipped
              updating --job_failed--> failed;  updated --gate_failed--> failed
              pending|requesting|updating --timed_out--> failed;  ...|updated --error--> failed
              updated|passed|failed|rolling_back --roll_back--> rolling_back --rolled_back--> rolled_back

Rules: a state changes only along these tables (`next_rollout_state`, `next_wave_state`,
`next_device_state`); an event a table does not allow in a state raises `TransitionError`, a bug
of the controller, never an operator's mistake. Gate verdicts are functions of the plan's gates
and figures (`device_verdict`, `fraction_verdict`). Pure: names, tables and functions of their
arguments; no I/O, no clock. The device's job states are `manifests.job_states`, read here only.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from manifests import job_states
from manifests.rollout_plan import Gates, Wave
from stctl.errors import StctlError

# ---- states ---------------------------------------------------------------------------------------
# a rollout
RUNNING, PAUSED, HALTING, HALTED = "running", "paused", "halting", "halted"
ABORTING, ABORTED, COMPLETED = "aborting", "aborted", "completed"
ROLLOUT_STATES = (RUNNING, PAUSED, HALTING, HALTED, ABORTING, ABORTED, COMPLETED)
ROLLOUT_FINAL = (HALTED, ABORTED, COMPLETED)
# a wave (pending, updating, passed and failed are also device states: the same names)
PENDING, UPDATING, SOAKING, GATING, PASSED, FAILED = "pending", "updating", "soaking", "gating", "passed", "failed"
WAVE_STATES = (PENDING, UPDATING, SOAKING, GATING, PASSED, FAILED)
# a device of a rollout
REQUESTING, UPDATED, SKIPPED = "requesting", "updated", "skipped"
ROLLING_BACK, ROLLED_BACK = "rolling_back", "rolled_back"
DEVICE_STATES = (PENDING, REQUESTING, UPDATING, UPDATED, PASSED, SKIPPED, FAILED, ROLLING_BACK, ROLLED_BACK)
IN_FLIGHT = (REQUESTING, UPDATING)  # asked for an update whose end is not recorded yet
CHANGED = (UPDATED, PASSED, FAILED, ROLLING_BACK)  # may run the new release: candidates for a rollback

# what an operator asks of a running controller (`rollouts.requested`), and the rollout's events that do it
PAUSE, ABORT = "pause", "abort"
# events of a device's outage in `rollout_events` (not states: the device keeps its own)
UNREACHABLE, REACHABLE = "unreachable", "reachable"

# ---- events and transitions -----------------------------------------------------------------------
RESUME, GATE_FAILED = "resume", "gate_failed"  # shared by the rollout and wave tables
HALT_DONE, ABORT_DONE, COMPLETE = "halted", "aborted", "completed"
START, WAVE_UPDATED, SOAKED, GATES_PASSED = "start", "updated", "soaked", "gates_passed"
ALREADY_ON_RELEASE, REQUEST, JOB = "already_on_release", "request", "job"
JOB_ACTIVE, JOB_FAILED, TIMED_OUT, ERROR = "job_active", "job_failed", "timed_out", "error"
ROLL_BACK, ROLLBACK_DONE = "roll_back", "rolled_back"

ROLLOUT_TRANSITIONS: dict[tuple[str, str], str] = {
    (RUNNING, PAUSE): PAUSED,
    (PAUSED, RESUME): RUNNING,
    (RUNNING, RESUME): RUNNING,  # a controller starts on a running rollout (clears a request left behind)
    (RUNNING, GATE_FAILED): HALTING,
    (HALTING, RESUME): HALTING,
    (HALTING, HALT_DONE): HALTED,
    (RUNNING, ABORT): ABORTING,
    (PAUSED, ABORT): ABORTING,
    (HALTING, ABORT): ABORTING,
    (ABORTING, RESUME): ABORTING,
    (ABORTING, ABORT_DONE): ABORTED,
    (RUNNING, COMPLETE): COMPLETED,
}

WAVE_TRANSITIONS: dict[tuple[str, str], str] = {
    (PENDING, START): UPDATING,
    (UPDATING, RESUME): UPDATING,
    (UPDATING, WAVE_UPDATED): SOAKING,
    (UPDATING, GATE_FAILED): FAILED,  # the failure fraction failed while its devices updated
    (SOAKING, SOAKED): GATING,
    (GATING, GATES_PASSED): PASSED,
    (GATING, GATE_FAILED): FAILED,
}

DEVICE_TRANSITIONS: dict[tuple[str, str], str] = {
    (PENDING, ALREADY_ON_RELEASE): SKIPPED,
    (PENDING, REQUEST): REQUESTING,  # its clock's mark is recorded before the POST
    (REQUESTING, JOB): UPDATING,  # the job id, adopted or from a new POST
    (UPDATING, JOB_ACTIVE): UPDATED,
    (UPDATING, JOB_FAILED): FAILED,
    (UPDATED, GATES_PASSED): PASSED,
    (UPDATED, GATE_FAILED): FAILED,
    **{(state, TIMED_OUT): FAILED for state in (PENDING, *IN_FLIGHT)},
    **{(state, ERROR): FAILED for state in (PENDING, *IN_FLIGHT, UPDATED)},  # a refusal or a bad answer
    **{(state, ROLL_BACK): ROLLING_BACK for state in CHANGED},  # again from rolling_back: asked once more
    (ROLLING_BACK, ROLLBACK_DONE): ROLLED_BACK,
}


class RolloutError(StctlError):
    """A rollout cannot start, resume, pause or abort (bad plan, unpublished release, ...)."""


class TransitionError(RolloutError):
    """An event that a transition table does not allow in the current state (a bug)."""


def _next(table: dict[tuple[str, str], str], what: str, state: str, event: str) -> str:
    try:
        return table[(state, event)]
    except KeyError:
        raise TransitionError(f"{what}: event {event!r} is not allowed in state {state!r}") from None


def next_rollout_state(state: str, event: str) -> str:
    return _next(ROLLOUT_TRANSITIONS, "rollout", state, event)


def next_wave_state(state: str, event: str) -> str:
    return _next(WAVE_TRANSITIONS, "wave", state, event)


def next_device_state(state: str, event: str) -> str:
    return _next(DEVICE_TRANSITIONS, "device", state, event)


def rollout_allows(state: str, event: str) -> bool:
    return (state, event) in ROLLOUT_TRANSITIONS


def job_event(job_state: str) -> str | None:
    """The device event a job state means: `job_active`, `job_failed`, or None while it works."""
    if job_state == job_states.ACTIVE:
        return JOB_ACTIVE
    if job_state in job_states.FINAL:  # failed, or rolled back by the device itself
        return JOB_FAILED
    return None


def rolls_back(wave: Wave) -> bool:
    """Whether a failed gate of `wave` rolls its devices back (plan: `on_gate_failure`), else only halts."""
    return wave.on_gate_failure == "rollback"


# ---- gate verdicts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class HealthResult:
    """What a device's health check of the new release said (`POST /v1/health-checks`)."""

    passed: bool
    detail: str = ""
    rolled_back: bool = False  # the device rolled itself back because it failed


@dataclass(frozen=True)
class Figures:
    """A device on the new release since its update began: its health check (None: not run),
    decode tokens/s (median) and peak RSS (max) from its telemetry (None: no rows)."""

    health: HealthResult | None = None
    decode_tokens_per_s: float | None = None
    peak_rss_bytes: int | None = None


@dataclass(frozen=True)
class Verdict:
    """A gate's judgement: `reason` says why it failed, or what passed."""

    passed: bool
    reason: str


def device_verdict(gates: Gates, figures: Figures) -> Verdict:
    """Judge one device: its health check (if the gates ask for one), then decode tokens/s, then
    peak RSS; a threshold the telemetry has no figure for fails."""
    health, tps, rss = figures.health, figures.decode_tokens_per_s, figures.peak_rss_bytes
    if gates.health_check and (health is None or not health.passed):
        if health is None:
            return Verdict(False, "health check failed: not run")
        return Verdict(False, f"health check failed: {health.detail}"
                              f"{' (the device rolled back)' if health.rolled_back else ''}")
    if gates.min_decode_tokens_per_s is not None and (tps is None or tps < gates.min_decode_tokens_per_s):
        return Verdict(False, f"decode {fmt_rate(tps)} tokens/s < gate {gates.min_decode_tokens_per_s:g}")
    if gates.max_peak_rss_bytes is not None and (rss is None or rss > gates.max_peak_rss_bytes):
        return Verdict(False, f"peak RSS {rss} bytes > gate {gates.max_peak_rss_bytes}")
    return Verdict(True, f"{fmt_rate(tps)} tokens/s, peak RSS {rss}")


def finished(device: Mapping) -> bool:
    """A device of the rollout whose outcome counts for the failure fraction: failed, or done with it."""
    return bool(device["failure"]) or device["state"] in (PASSED, SKIPPED, ROLLED_BACK)


def fraction_verdict(gates: Gates, devices: Iterable[Mapping]) -> Verdict:
    """Judge the failure fraction (failed / finished devices of the whole rollout; rows with
    `device`, `state`, `failure`): it holds until `min_devices` have finished."""
    done = [d for d in devices if finished(d)]
    failed = [d for d in done if d["failure"]]
    if len(done) < gates.min_devices or not done:
        return Verdict(True, f"{len(done)} finished device(s), fewer than {gates.min_devices}: not judged yet")
    fraction = len(failed) / len(done)
    if fraction > gates.max_failure_fraction:
        return Verdict(False, f"{len(failed)} of {len(done)} finished devices failed ({fraction:.0%} > "
                              f"{gates.max_failure_fraction:.0%}): " +
                       "; ".join(f"{d['device']}: {d['failure']}" for d in failed[:3]))
    return Verdict(True, f"{len(failed)} of {len(done)} finished devices failed")


def fmt_rate(value: float | None) -> str:
    return "none" if value is None else f"{value:.1f}"
