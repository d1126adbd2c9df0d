"""stctl killed in each state a rollout, a wave or a device can be in, then resumed.

Each row of the table leaves `fleet.db` as a controller killed in that state leaves it, and the
devices as it left them (the POST sent or not, the job running or done, the rollback done or
not); `resume_rollout` (what `stctl rollout resume` calls) then drives the rollout to the end
that state calls for, every device ends on the right release, and each was asked for its update
exactly once: the update jobs created on it since its mark (its own clock) and the POSTs the
records count. Real agents on 127.0.0.1 (rollout_fixtures.py); the SIGKILL of a real `stctl`
mid-rollout is in test_rollout_e2e.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rollout_helpers import V1, V2, Fleet3
from stctl.fleetdb import open_fleet_db
from stctl.rollout import RolloutConfig, create_rollout, resume_rollout

pytest_plugins = ["release_fixtures", "agent_fixtures", "rollout_fixtures"]

pytestmark = pytest.mark.slow

POLICY = """
max_concurrent = 3
device_timeout = "2m"
on_gate_failure = "rollback"
[gates]
health_check = false
"""
LINE4 = POLICY + """
[[waves]]
name = "line4"
tags = { line = "4" }
"""  # d1 and d2
CANARY_THEN_D2 = POLICY + """
[[waves]]
name = "canary"
tags = { ring = "canary" }
[[waves]]
name = "rest"
tags = { line = "4" }
"""  # d1, then d2
EVERYONE = POLICY + """
[[waves]]
name = "all"
percent = 100
"""  # d1, d2, d3


@dataclass
class Killed:
    """The records and devices of rollout `rid` as the killed controller left them."""

    fleet: Fleet3
    rid: int
    marks: dict[str, float]
    jobs: dict[str, str] = field(default_factory=dict)  # device -> the update job it was asked for

    def _write(self, table: str, key, values: dict) -> None:
        db = open_fleet_db(self.fleet.ws.fleet_db)
        try:
            db[table].update(key, values)
        finally:
            db.close()

    def rollout(self, **values) -> None:
        self._write("rollouts", self.rid, values)

    def wave(self, idx: int, **values) -> None:
        self._write("rollout_waves", (self.rid, idx), values)

    def device(self, name: str, state: str, **values) -> None:
        """`name` in `state` (past pending): its mark and release before recorded, and past
        requesting its job and the one POST that made it."""
        asked = {"mark": self.marks[name], "from_model": V1["model"], "from_version": V1["version"]}
        if state != "requesting":
            asked.update(job_id=self.jobs[name], requests=1)
        self._write("rollout_devices", (self.rid, name), {"state": state, **asked, **values})

    def post(self, name: str) -> str:
        """The controller's POST /v1/updates (its job may still run)."""
        self.jobs[name] = self.fleet.agents[name].update(V2["version"])
        return self.jobs[name]

    def install(self, name: str) -> None:
        """The controller's POST, and the device's job done: 2.0.0 active."""
        job = self.fleet.agents[name].wait_job(self.post(name))
        assert job["state"] == "active", job

    def roll_back_on_device(self, name: str) -> None:
        assert self.fleet.agents[name].post("/v1/rollback").status_code == 200


# ---- what a killed controller left, one function per state ----------------------------------------
def requesting_post_never_sent(k: Killed) -> None:
    k.device("d1", "requesting")  # killed before it counted and sent the POST


def requesting_post_arrived(k: Killed) -> None:
    k.post("d1")  # the device got the POST; the answer (its job id) was never recorded
    k.device("d1", "requesting", requests=1)


def updating(k: Killed) -> None:
    k.post("d1")
    k.device("d1", "updating")


def updated_while_the_wave_updates(k: Killed) -> None:
    k.install("d1")
    k.device("d1", "updated")
    k.wave(0, state="updating")


def soaking(k: Killed) -> None:
    for name in ("d1", "d2"):
        k.install(name)
        k.device(name, "updated")
    k.wave(0, state="soaking", soak_until=time.time())


def gating_one_device_judged(k: Killed) -> None:
    for name in ("d1", "d2"):
        k.install(name)
    k.device("d1", "passed", detail="judged before the kill")
    k.device("d2", "updated")
    k.wave(0, state="gating")


def wave_passed_next_not_begun(k: Killed) -> None:
    k.install("d1")
    k.device("d1", "passed")
    k.wave(0, state="passed")


def pause_requested(k: Killed) -> None:
    k.rollout(requested="pause")  # asked of the controller that died: resume clears it


def wave_failed_halt_not_recorded(k: Killed) -> None:
    k.install("d1")
    k.device("d1", "failed", failure="decode 0.1 tokens/s < gate 5")
    k.wave(0, state="failed", detail="1 of 1 finished devices failed")


def halting_one_rolled_back_one_not(k: Killed) -> None:
    for name in ("d1", "d2"):
        k.install(name)
    k.roll_back_on_device("d1")  # done on the device; killed before recording it
    k.device("d1", "rolling_back", failure="decode 0.1 tokens/s < gate 5")
    k.device("d2", "failed", failure="decode 0.2 tokens/s < gate 5")
    k.wave(0, state="failed")
    k.rollout(state="halting", detail="2 of 2 finished devices failed")


def aborting(k: Killed) -> None:
    k.install("d1")
    k.device("d1", "rolling_back")  # recorded, killed before the rollback reached the device
    k.post("d2")
    k.device("d2", "updating")  # in flight: finishes, then is rolled back
    k.wave(0, state="updating")
    k.rollout(state="aborting", detail="abort requested")


# (state killed in, plan, what the killed controller left, rollout's end, each device's (state, POSTs),
#  update jobs per device, active release per device)
CASES = [
    ("device requesting, POST never sent", LINE4, requesting_post_never_sent, "completed",
     {"d1": ("passed", 1), "d2": ("passed", 1)}, {"d1": 1, "d2": 1, "d3": 0}, {"d1": V2, "d2": V2, "d3": V1}),
    ("device requesting, POST arrived", LINE4, requesting_post_arrived, "completed",
     {"d1": ("passed", 1), "d2": ("passed", 1)}, {"d1": 1, "d2": 1, "d3": 0}, {"d1": V2, "d2": V2, "d3": V1}),
    ("device updating", LINE4, updating, "completed",
     {"d1": ("passed", 1), "d2": ("passed", 1)}, {"d1": 1, "d2": 1, "d3": 0}, {"d1": V2, "d2": V2, "d3": V1}),
    ("device updated, wave updating", LINE4, updated_while_the_wave_updates, "completed",
     {"d1": ("passed", 1), "d2": ("passed", 1)}, {"d1": 1, "d2": 1, "d3": 0}, {"d1": V2, "d2": V2, "d3": V1}),
    ("wave soaking", LINE4, soaking, "completed",
     {"d1": ("passed", 1), "d2": ("passed", 1)}, {"d1": 1, "d2": 1, "d3": 0}, {"d1": V2, "d2": V2, "d3": V1}),
    ("wave gating", LINE4, gating_one_device_judged, "completed",
     {"d1": ("passed", 1), "d2": ("passed", 1)}, {"d1": 1, "d2": 1, "d3": 0}, {"d1": V2, "d2": V2, "d3": V1}),
    ("wave passed, next not begun", CANARY_THEN_D2, wave_passed_next_not_begun, "completed",
     {"d1": ("passed", 1), "d2": ("passed", 1)}, {"d1": 1, "d2": 1, "d3": 0}, {"d1": V2, "d2": V2, "d3": V1}),
    ("running, a pause requested", LINE4, pause_requested, "completed",
     {"d1": ("passed", 1), "d2": ("passed", 1)}, {"d1": 1, "d2": 1, "d3": 0}, {"d1": V2, "d2": V2, "d3": V1}),
    ("wave failed, halt not recorded", CANARY_THEN_D2, wave_failed_halt_not_recorded, "halted",
     {"d1": ("rolled_back", 1), "d2": ("pending", 0)}, {"d1": 1, "d2": 0, "d3": 0}, {"d1": V1, "d2": V1, "d3": V1}),
    ("halting, device rolling_back", LINE4, halting_one_rolled_back_one_not, "halted",
     {"d1": ("rolled_back", 1), "d2": ("rolled_back", 1)}, {"d1": 1, "d2": 1, "d3": 0},
     {"d1": V1, "d2": V1, "d3": V1}),  # d1 not rolled back twice: a second rollback would put it on 2.0.0
    ("aborting", EVERYONE, aborting, "aborted",
     {"d1": ("rolled_back", 1), "d2": ("rolled_back", 1), "d3": ("pending", 0)}, {"d1": 1, "d2": 1, "d3": 0},
     {"d1": V1, "d2": V1, "d3": V1}),
]


@pytest.mark.parametrize("killed_in, plan, leave, end, devices, jobs, active", CASES, ids=[c[0] for c in CASES])
def test_killed_in_state_resumes_to_its_end_updating_each_device_once(fleet3, on_v1, tmp_path: Path, killed_in,
                                                                      plan, leave, end, devices, jobs, active):
    ws = fleet3.ws
    rid = create_rollout(ws, "st-demo", "2.0.0", fleet3.plan(tmp_path, plan))
    killed = Killed(fleet3, rid, on_v1)
    leave(killed)

    result = resume_rollout(ws, rid, config=RolloutConfig(poll_s=0.1))

    assert result["state"] == end, (killed_in, result["detail"], result["devices"])
    assert {d["device"]: (d["state"], d["requests"]) for d in result["devices"]} == devices, result["devices"]
    assert {name: len(j) for name, j in fleet3.jobs_since(on_v1).items()} == jobs
    for name, job in killed.jobs.items():  # the job it was asked for is the one recorded (adopted, not re-sent)
        assert next(d["job_id"] for d in result["devices"] if d["device"] == name) == job
    assert fleet3.active() == active
