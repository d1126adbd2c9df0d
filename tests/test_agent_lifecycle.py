"""The update lifecycle table, and the chain of states a job walks, including a crash in each
state (the job then resumes when the agent starts again), a crash loop in a state, the
probation of a just-activated release, and refused requests. In-process: the library the
daemon runs, against the session's real repository server."""
from __future__ import annotations

import json
import threading
import time

import pytest

from agent.config import load_config
from agent.errors import UpdateRefusedError
from agent.install import ReleaseRef
from agent.lifecycle import (
    ACTIVATING, ACTIVE, FAILED, FETCHING, FINAL, HEALTH_CHECKING, IDLE, ROLLED_BACK, STAGED, STATES, TRANSITIONS,
    VERIFYING, TransitionError, next_state,
)
from agent.telemetry import Telemetry
from agent.updater import Updater
from model.package import read_manifest
from model.packed_cache import layout_key

pytest_plugins = ["release_fixtures", "agent_fixtures"]

HAPPY_PATH = [IDLE, FETCHING, VERIFYING, STAGED, HEALTH_CHECKING, ACTIVATING, ACTIVE]


class Crash(BaseException):
    """The process dies here (not an error the updater handles)."""


def open_updater(data_dir) -> Updater:
    config = load_config(data_dir)
    return Updater(config, Telemetry(config.telemetry_db, config.limits.telemetry_max_rows))


def crash_in(updater: Updater, state: str, after=None) -> Updater:
    """Make `updater` die on entering `state` (or inside it, after calling `after(job)`)."""
    def die(job):
        if after is not None:
            after(job)
        raise Crash(state)

    updater._handlers[state] = die
    return updater


def restart(data_dir) -> dict:
    """A new agent process starts: boot resumes the unfinished job; returns it finished."""
    updater = open_updater(data_dir)
    job = updater.boot()
    assert job is not None
    updater.join(timeout=300)
    assert not updater.busy()
    return updater.jobs.load(job.id).to_dict()


def test_the_table_allows_only_the_lifecycle():
    chain = [(a, e) for (a, e) in TRANSITIONS if e not in ("error",)]
    assert {s for pair in TRANSITIONS for s in (pair[0], TRANSITIONS[pair])} == set(STATES)
    state = IDLE
    for event in ("start", "fetched", "verified", "check", "passed", "activated"):
        state = next_state(state, event)
    assert state == ACTIVE and len(chain) == 11
    for state in STATES:
        assert ((state, "error") in TRANSITIONS) == (state not in FINAL)
        if state not in FINAL:
            assert next_state(state, "error") == FAILED
    with pytest.raises(TransitionError):
        next_state(ACTIVE, "start")
    with pytest.raises(TransitionError):
        next_state(FAILED, "rolled_back")
    with pytest.raises(TransitionError):
        next_state(STAGED, "activated")  # no activation without a health check


@pytest.mark.slow
def test_a_crash_in_each_state_resumes_to_active(device_dir):
    target = "1.0.0"
    for state in (FETCHING, VERIFYING, STAGED, HEALTH_CHECKING, ACTIVATING):
        target = "2.0.0" if target == "1.0.0" else "1.0.0"
        updater = crash_in(open_updater(device_dir), state)
        job = updater.request("st-demo", target, allow_downgrade=True)
        with pytest.raises(Crash):
            updater.run(job)
        assert json.loads((device_dir / "jobs" / f"{job.id}.json").read_text())["state"] == state
        finished = restart(device_dir)
        at = HAPPY_PATH.index(state)
        assert finished["state"] == ACTIVE, finished
        assert finished["history"] == HAPPY_PATH[:at + 1] + HAPPY_PATH[at:], (state, finished["history"])
        assert load_config(device_dir) and open_updater(device_dir).install.pointer().active == ReleaseRef("st-demo", target)


@pytest.mark.slow
def test_a_crash_loop_ends_the_job(device_dir):
    # stuck before activation: failed, nothing changes
    updater = crash_in(open_updater(device_dir), VERIFYING)
    job = updater.request("st-demo", "2.0.0")
    with pytest.raises(Crash):
        updater.run(job)
    path = device_dir / "jobs" / f"{job.id}.json"
    saved = json.loads(path.read_text())
    saved["visits"][VERIFYING] = 3  # it already died there three times
    path.write_text(json.dumps(saved))
    finished = restart(device_dir)
    assert finished["state"] == FAILED and "crash loop" in finished["detail"], finished
    assert open_updater(device_dir).install.pointer().active == ReleaseRef("st-demo", "1.0.0")
    # stuck in activation after the pointer moved: rolled back to the previous release
    updater = open_updater(device_dir)
    crash_in(updater, ACTIVATING, after=lambda job: updater.install.activate(ReleaseRef(job.model, job.version)))
    job = updater.request("st-demo", "2.0.0")
    with pytest.raises(Crash):
        updater.run(job)
    assert open_updater(device_dir).install.pointer().active == ReleaseRef("st-demo", "2.0.0")
    path = device_dir / "jobs" / f"{job.id}.json"
    saved = json.loads(path.read_text())
    saved["visits"][ACTIVATING] = 3
    path.write_text(json.dumps(saved))
    finished = restart(device_dir)
    assert finished["state"] == ROLLED_BACK and finished["history"][-2:] == [ACTIVATING, ROLLED_BACK], finished
    assert open_updater(device_dir).install.pointer().active == ReleaseRef("st-demo", "1.0.0")


@pytest.mark.slow
def test_a_release_on_probation_is_rolled_back_by_crashes_or_its_first_failed_check(device_dir):
    updater = open_updater(device_dir)
    job = updater.run(updater.request("st-demo", "2.0.0"))
    assert job.state == ACTIVE and updater.install.pointer().probation
    limit = updater.limits.max_probation_boots
    for _ in range(limit):  # the daemon dies before any health check, `limit` times: still v2
        assert open_updater(device_dir).boot() is None
    assert updater.install.pointer().active == ReleaseRef("st-demo", "2.0.0")
    open_updater(device_dir).boot()  # one start too many: rolled back
    pointer = updater.install.pointer()
    assert pointer.active == ReleaseRef("st-demo", "1.0.0") and not pointer.probation
    assert updater.jobs.load(job.id).state == ROLLED_BACK

    job = updater.run(updater.request("st-demo", "2.0.0"))  # staged already: nothing to download
    assert job.state == ACTIVE and job.shards_downloaded == 0
    shard = next((device_dir / "releases" / "st-demo" / "2.0.0" / "shards").iterdir())
    shard.chmod(0o644)
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    result, rolled_back = updater.check_active()
    assert not result.passed and "sha256 mismatch" in result.detail and rolled_back
    assert updater.install.pointer().active == ReleaseRef("st-demo", "1.0.0")
    assert updater.jobs.load(job.id).state == ROLLED_BACK


def test_refused_requests(device_dir):
    updater = open_updater(device_dir)
    job = updater.run(updater.request("st-demo", "1.0.0"))  # the active release: nothing to do
    assert job.state == ACTIVE and job.history == [IDLE, ACTIVE] and job.detail == "already active"
    busy = updater.request("st-demo", "2.0.0")  # holds the update lock until it runs
    with pytest.raises(UpdateRefusedError, match="in progress"):
        open_updater(device_dir).request("st-demo", "2.0.0")
    updater.lock.release()  # the process dies: the lock goes, the unfinished job stays
    with pytest.raises(UpdateRefusedError, match=f"{busy.id} is unfinished"):
        open_updater(device_dir).request("st-demo", "2.0.0")
    (device_dir / "jobs" / f"{busy.id}.json").unlink()
    pointer = updater.install.activate(ReleaseRef("st-demo", "1.0.0"))
    assert pointer.active.version == "1.0.0"
    (device_dir / "current.json").write_text(json.dumps({"active": {"model": "st-demo", "version": "2.0.0"}}))
    with pytest.raises(UpdateRefusedError, match="allow_downgrade"):
        open_updater(device_dir).request("st-demo", "1.0.0")


def test_a_request_right_after_a_job_ends_waits_for_its_cleanup(device_dir):
    """The daemon saves a job's final state, then collects garbage under the update lock: a client
    that saw the final state and asks for the next update is served, not refused."""
    updater = open_updater(device_dir)
    cleanup_may_end = threading.Event()
    collect = updater.install.gc
    updater.install.gc = lambda **keep: (cleanup_may_end.wait(timeout=60), collect(**keep))
    job = updater.request("st-demo", "2.0.0")
    updater.start(job)
    deadline = time.monotonic() + 300
    while not updater.jobs.load(job.id).finished:
        assert time.monotonic() < deadline, "the update did not finish"
        time.sleep(0.05)
    assert updater.busy()  # final state saved; the worker is still collecting garbage
    threading.Timer(0.5, cleanup_may_end.set).start()
    following = updater.request("st-demo", "1.0.0", allow_downgrade=True)
    assert not updater.busy() and following.state == IDLE
    assert updater.run(following).state == ACTIVE


def test_garbage_collection_keeps_only_the_packed_experts_of_kept_releases(device_dir):
    """Where only the torch-int4 kernel runs, engines keep experts packed under the data dir; the
    agent's garbage collection drops the packed copies of experts no kept release has (and all of
    another torch version's), so a device's updates do not fill its disk."""
    updater = open_updater(device_dir)
    root = updater.config.packed_cache_dir
    active = read_manifest(updater.install.release_dir(updater.install.pointer().active))
    sha = active.expert_shards()[0].sha256
    kept, replaced = root / layout_key() / f"{sha}.int4", root / layout_key() / f"{'0' * 64}.int4"
    other_torch = root / "torch-0.0-avx512" / f"{sha}.int4"
    for path in (kept, replaced, other_torch):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"packed")
    assert updater.install.gc()["packed_removed"] == 2
    assert kept.exists() and not replaced.exists() and not other_torch.parent.exists()


# ---- held jobs (stage only) ----------------------------------------------------------------------
def staged_release(data_dir, version: str):
    return data_dir / "releases" / "st-demo" / version


@pytest.mark.slow
def test_a_held_job_waits_at_staged_through_restarts_then_installs_when_released(device_dir):
    updater = open_updater(device_dir)
    job = updater.run(updater.request("st-demo", "2.0.0", hold=True))
    assert job.state == STAGED and job.hold and job.history == HAPPY_PATH[:4], job
    assert updater.install.pointer().active == ReleaseRef("st-demo", "1.0.0")
    assert staged_release(device_dir, "2.0.0").is_dir()
    assert not updater.lock.held_elsewhere()  # a waiting job does not hold the update lock
    for _ in range(updater.limits.max_state_visits + 2):  # restarts: it keeps waiting, no visit counted
        restarted = open_updater(device_dir)
        assert restarted.boot() is None and not restarted.busy()
        assert restarted.waiting().id == job.id
    saved = open_updater(device_dir).jobs.load(job.id)
    assert saved.state == STAGED and saved.visits[STAGED] == 1 and saved.shards_downloaded > 0
    updater = open_updater(device_dir)
    updater.boot()
    assert updater.release(job.id).id == job.id
    updater.join(timeout=300)
    finished = updater.jobs.load(job.id)
    assert finished.state == ACTIVE and not finished.hold and finished.history == HAPPY_PATH, finished
    assert updater.install.pointer().active == ReleaseRef("st-demo", "2.0.0")
    assert updater.release(job.id) is None and updater.waiting() is None


@pytest.mark.slow
def test_a_held_job_killed_in_each_state_resumes_to_waiting_and_after_its_release_to_active(device_dir):
    for state in (FETCHING, VERIFYING):  # killed before it waits: the restart takes it on to staged, waiting
        updater = crash_in(open_updater(device_dir), state)
        job = updater.request("st-demo", "2.0.0", hold=True)
        with pytest.raises(Crash):
            updater.run(job)
        waiting = restart(device_dir)
        assert waiting["state"] == STAGED and waiting["hold"], waiting
        assert open_updater(device_dir).install.pointer().active == ReleaseRef("st-demo", "1.0.0")
        assert open_updater(device_dir).withdraw(job.id, "next round").state == FAILED
    # killed right after the release was saved: the restart installs it
    updater = open_updater(device_dir)
    job = updater.run(updater.request("st-demo", "2.0.0", hold=True))
    released = crash_in(open_updater(device_dir), STAGED)
    taken = released.request("st-demo", "2.0.0")  # the same release without hold: the waiting job, released
    assert taken.id == job.id and not taken.hold and not released.jobs.load(job.id).hold
    with pytest.raises(Crash):
        released.run(taken)
    released.lock.release()  # the process died
    finished = restart(device_dir)
    assert finished["state"] == ACTIVE and finished["history"] == HAPPY_PATH[:4] + HAPPY_PATH[3:], finished
    # killed while installing after its release: resumes to active like any job
    updater = crash_in(open_updater(device_dir), HEALTH_CHECKING)
    job = updater.run(updater.request("st-demo", "1.0.0", allow_downgrade=True, hold=True))
    assert job.waits
    with pytest.raises(Crash):
        updater.run(updater.request("st-demo", "1.0.0", allow_downgrade=True))
    assert restart(device_dir)["state"] == ACTIVE
    assert open_updater(device_dir).install.pointer().active == ReleaseRef("st-demo", "1.0.0")


@pytest.mark.slow
def test_a_request_for_another_release_withdraws_the_waiting_job(device_dir):
    updater = open_updater(device_dir)
    job = updater.run(updater.request("st-demo", "2.0.0", hold=True))
    again = updater.run(updater.request("st-demo", "2.0.0", hold=True))  # asked again with hold: still waits
    assert again.id == job.id and again.waits
    # garbage collection after another job's end keeps the waiting job's staged release
    updater._collect_garbage(job)
    assert staged_release(device_dir, "2.0.0").is_dir()
    # a bundle install, or a request for another release, withdraws it (the newest request wins)
    following = updater.run(updater.request("st-demo", "1.0.0"))
    withdrawn = updater.jobs.load(job.id)
    assert withdrawn.state == FAILED and withdrawn.history[-2:] == [STAGED, FAILED], withdrawn
    assert withdrawn.detail == "withdrawn: replaced by a request for st-demo@1.0.0"
    assert following.state == ACTIVE and following.detail == "already active"
    assert not staged_release(device_dir, "2.0.0").exists()  # collected with the withdrawn job
    with pytest.raises(UpdateRefusedError, match="bundle"):
        updater.request(None, None, bundle=device_dir / "none.bundle", hold=True)
