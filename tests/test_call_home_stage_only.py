"""Download now, install in the window: the call-home loop's `follow` with an injected clock, a
real updater, the session's served repository and a real data dir (no fleet server: the
assignment is handed to `follow` as a poll's answer would). A closed window with `download_now`
starts a held job at once; it waits at staged until a poll inside the window releases it; a
held job whose assignment the server withdrew is withdrawn."""
from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agent.call_home import CallHome
from agent.config import load_config
from agent.install import ReleaseRef
from agent.lifecycle import ACTIVE, FAILED, STAGED
from agent.telemetry import Telemetry
from agent.updater import Updater
from manifests.call_home import Assignment, Window

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow

NIGHT = Window(22 * 60, 4 * 60, "Europe/Berlin")
NOON, MIDNIGHT = (datetime(2024, 7, 1, h, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp() for h in (12, 23))


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def calling_device(device_dir):
    """(CallHome with an injected clock at noon, its Updater) on a data dir with a call_home section."""
    path = device_dir / "agent.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "call_home": {"server_url": "https://127.0.0.1:1"}}))
    config = load_config(device_dir)
    telemetry = Telemetry(config.telemetry_db, config.limits.telemetry_max_rows)
    updater = Updater(config, telemetry)
    yield CallHome(config, updater, telemetry, clock=Clock(NOON)), updater
    updater.join(timeout=300)
    telemetry.close()


def update(assignment_id: str, version: str = "2.0.0", **fields) -> Assignment:
    return Assignment(assignment_id, "update", "st-demo", version, window=NIGHT, **fields)


def test_a_closed_window_with_download_now_stages_at_once_and_the_open_window_installs(calling_device):
    caller, updater = calling_device
    assignment = update("a1")
    assert caller.follow(assignment) == "staged only"
    updater.join(timeout=300)
    job = updater.waiting()
    assert job is not None and job.state == STAGED and job.hold and job.shards_downloaded > 0
    assert updater.install.pointer().active == ReleaseRef("st-demo", "1.0.0")
    assert caller.state.assignment_of(job.id) == "a1"
    report, _ = caller.report()
    assert (report.job.id, report.job.state, report.job.assignment_id) == (job.id, STAGED, "a1")
    assert caller.follow(assignment) == "window closed"  # polls before the window: it keeps waiting
    caller.clock.now = MIDNIGHT
    assert caller.follow(assignment) == "released"
    updater.join(timeout=300)
    finished = updater.jobs.load(job.id)
    assert finished.state == ACTIVE and not finished.hold, finished
    assert updater.install.pointer().active == ReleaseRef("st-demo", "2.0.0")
    assert caller.follow(assignment) == "nothing"


def test_without_download_now_a_closed_window_downloads_nothing(calling_device):
    caller, updater = calling_device
    assert caller.follow(update("a1", download_now=False)) == "window closed"
    assert updater.jobs.unfinished() is None and not updater.busy()


def test_a_held_job_is_withdrawn_when_its_assignment_is_replaced(calling_device):
    caller, updater = calling_device
    assert caller.follow(update("a1")) == "staged only"
    updater.join(timeout=300)
    job = updater.waiting()
    assert caller.follow(None) == "nothing"  # unassigned: the staged release will not be installed
    withdrawn = updater.jobs.load(job.id)
    assert withdrawn.state == FAILED and withdrawn.detail.startswith("withdrawn: its assignment a1"), withdrawn
    assert updater.install.pointer().active == ReleaseRef("st-demo", "1.0.0")
    # a new update assignment with a closed window: held again; one for another release replaces it
    assert caller.follow(update("a2")) == "staged only"
    updater.join(timeout=300)
    first = updater.waiting()
    assert caller.follow(update("a3", version="1.0.0")) == "already on that release"
    assert updater.jobs.load(first.id).state == FAILED
