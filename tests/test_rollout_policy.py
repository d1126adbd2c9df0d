"""Rollout policy, pure: the transition tables of a rollout, a wave and a device are exactly the
transitions listed here (each allowed one walks, a sample of others is refused as a bug), a
device's update job state means one device event, and gate verdicts follow from the plan's
gates and a device's figures (tokens/s below the threshold, peak RSS above it, a failed health
check, the failure fraction over its maximum once `min_devices` have finished), importing
nothing that does I/O. The store applies the tables to the records: a refused event writes
nothing; and the controller names states, never spells them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from manifests import job_states
from manifests.rollout_plan import Gates, Wave
from stctl import rollout_policy as p
from stctl.rollout_policy import Figures, HealthResult, TransitionError, Verdict
from stctl.rollout_store import RolloutStore

ROOT = Path(__file__).resolve().parents[1]

# ---- the tables, written out: (state, event, next state) ------------------------------------------
ROLLOUT = [
    ("running", "pause", "paused"),
    ("paused", "resume", "running"),
    ("running", "resume", "running"),
    ("running", "gate_failed", "halting"),
    ("halting", "resume", "halting"),
    ("halting", "halted", "halted"),
    ("running", "abort", "aborting"),
    ("paused", "abort", "aborting"),
    ("halting", "abort", "aborting"),
    ("aborting", "resume", "aborting"),
    ("aborting", "aborted", "aborted"),
    ("running", "completed", "completed"),
]
WAVE = [
    ("pending", "start", "updating"),
    ("updating", "resume", "updating"),
    ("updating", "updated", "soaking"),
    ("updating", "gate_failed", "failed"),
    ("soaking", "soaked", "gating"),
    ("gating", "gates_passed", "passed"),
    ("gating", "gate_failed", "failed"),
]
DEVICE = [
    ("pending", "already_on_release", "skipped"),
    ("pending", "request", "requesting"),
    ("requesting", "job", "updating"),
    ("updating", "job_active", "updated"),
    ("updating", "job_failed", "failed"),
    ("updated", "gates_passed", "passed"),
    ("updated", "gate_failed", "failed"),
    ("pending", "timed_out", "failed"),
    ("requesting", "timed_out", "failed"),
    ("updating", "timed_out", "failed"),
    ("pending", "error", "failed"),
    ("requesting", "error", "failed"),
    ("updating", "error", "failed"),
    ("updated", "error", "failed"),
    ("updated", "roll_back", "rolling_back"),
    ("passed", "roll_back", "rolling_back"),
    ("failed", "roll_back", "rolling_back"),
    ("rolling_back", "roll_back", "rolling_back"),
    ("rolling_back", "rolled_back", "rolled_back"),
]
MACHINES = {"rollout": (p.next_rollout_state, p.ROLLOUT_TRANSITIONS, ROLLOUT, p.ROLLOUT_STATES),
            "wave": (p.next_wave_state, p.WAVE_TRANSITIONS, WAVE, p.WAVE_STATES),
            "device": (p.next_device_state, p.DEVICE_TRANSITIONS, DEVICE, p.DEVICE_STATES)}


@pytest.mark.parametrize("machine, state, event, after",
                         [(m, *row) for m, (_, _, rows, _) in MACHINES.items() for row in rows])
def test_every_allowed_transition(machine, state, event, after):
    next_state = MACHINES[machine][0]
    assert next_state(state, event) == after


@pytest.mark.parametrize("machine", MACHINES)
def test_the_tables_allow_nothing_else(machine):
    _, table, rows, states = MACHINES[machine]
    assert {(s, e): a for s, e, a in rows} == table
    assert {s for s, _, a in rows} | {a for _, _, a in rows} <= set(states)


@pytest.mark.parametrize("machine, state, event", [
    ("rollout", "completed", "resume"),  # a finished rollout stays finished
    ("rollout", "halted", "abort"),
    ("rollout", "aborted", "resume"),
    ("rollout", "paused", "pause"),
    ("rollout", "paused", "gate_failed"),  # a paused rollout judges nothing
    ("rollout", "paused", "completed"),
    ("rollout", "running", "halted"),  # halted only after halting
    ("rollout", "halting", "completed"),
    ("rollout", "aborting", "pause"),
    ("wave", "pending", "soaked"),
    ("wave", "soaking", "gate_failed"),
    ("wave", "passed", "start"),
    ("wave", "failed", "resume"),
    ("wave", "gating", "updated"),
    ("device", "pending", "job"),  # no job without the requesting record (exactly once)
    ("device", "pending", "job_active"),
    ("device", "requesting", "request"),
    ("device", "updated", "request"),  # never asked twice
    ("device", "skipped", "roll_back"),  # never changed: nothing to undo
    ("device", "pending", "roll_back"),
    ("device", "rolled_back", "roll_back"),  # a second rollback would undo the first
    ("device", "passed", "error"),
    ("device", "rolling_back", "gates_passed"),
    ("device", "failed", "rolled_back"),
    ("device", "updating", "gates_passed"),
])
def test_refused_transitions_raise(machine, state, event):
    with pytest.raises(TransitionError, match=f"{machine}: event '{event}' is not allowed in state '{state}'"):
        MACHINES[machine][0](state, event)


@pytest.mark.parametrize("machine, start, events, states", [
    ("device", "pending", ["request", "job", "job_active", "gates_passed"],
     ["requesting", "updating", "updated", "passed"]),
    ("device", "pending", ["request", "job", "job_active", "gate_failed", "roll_back", "rolled_back"],
     ["requesting", "updating", "updated", "failed", "rolling_back", "rolled_back"]),
    ("device", "updated", ["roll_back", "roll_back", "rolled_back"],  # asked again after a kill
     ["rolling_back", "rolling_back", "rolled_back"]),
    ("wave", "pending", ["start", "resume", "updated", "soaked", "gates_passed"],
     ["updating", "updating", "soaking", "gating", "passed"]),
    ("rollout", "running", ["pause", "resume", "gate_failed", "resume", "abort", "resume", "aborted"],
     ["paused", "running", "halting", "halting", "aborting", "aborting", "aborted"]),
])
def test_chains_of_states(machine, start, events, states):
    next_state, state, walked = MACHINES[machine][0], start, []
    for event in events:
        state = next_state(state, event)
        walked.append(state)
    assert walked == states


# ---- the device's job states ------------------------------------------------------------------------
def test_job_states_mean_one_device_event_each():
    assert {s: p.job_event(s) for s in job_states.STATES} == {
        "idle": None, "fetching": None, "verifying": None, "staged": None, "health-checking": None,
        "activating": None, "active": "job_active", "failed": "job_failed", "rolled_back": "job_failed"}
    assert p.job_event("some-state-of-a-newer-agent") is None  # still working: polled until its timeout


def test_the_agent_walks_the_shared_job_states():
    from agent import lifecycle

    assert lifecycle.STATES == job_states.STATES and lifecycle.FINAL == job_states.FINAL


# ---- gate verdicts -----------------------------------------------------------------------------------
GATES = Gates(min_decode_tokens_per_s=5.0, max_peak_rss_bytes=1000, health_check=True)
HEALTHY = HealthResult(True)


@pytest.mark.parametrize("gates, figures, verdict", [
    (GATES, Figures(HEALTHY, 6.0, 900), Verdict(True, "6.0 tokens/s, peak RSS 900")),
    (GATES, Figures(HEALTHY, 5.0, 1000), Verdict(True, "5.0 tokens/s, peak RSS 1000")),  # thresholds included
    (GATES, Figures(HEALTHY, 4.9, 900), Verdict(False, "decode 4.9 tokens/s < gate 5")),
    (GATES, Figures(HEALTHY, None, 900), Verdict(False, "decode none tokens/s < gate 5")),  # no figure fails
    (GATES, Figures(HEALTHY, 6.0, 1001), Verdict(False, "peak RSS 1001 bytes > gate 1000")),
    (GATES, Figures(HEALTHY, 6.0, None), Verdict(False, "peak RSS None bytes > gate 1000")),
    (GATES, Figures(HEALTHY, 1.0, 5000), Verdict(False, "decode 1.0 tokens/s < gate 5")),  # tokens/s first
    (GATES, Figures(HealthResult(False, "golden output differs"), 6.0, 900),
     Verdict(False, "health check failed: golden output differs")),
    (GATES, Figures(HealthResult(False, "hash mismatch", rolled_back=True)),
     Verdict(False, "health check failed: hash mismatch (the device rolled back)")),
    (GATES, Figures(None, 6.0, 900), Verdict(False, "health check failed: not run")),
    (Gates(health_check=False), Figures(), Verdict(True, "none tokens/s, peak RSS None")),  # nothing asked
    (Gates(health_check=False, max_peak_rss_bytes=10), Figures(None, None, 11),
     Verdict(False, "peak RSS 11 bytes > gate 10")),
])
def test_device_verdict(gates, figures, verdict):
    assert p.device_verdict(gates, figures) == verdict


def dev(name: str, state: str, failure: str = "") -> dict:
    return {"device": name, "state": state, "failure": failure}


@pytest.mark.parametrize("gates, devices, passed, reason", [
    (Gates(max_failure_fraction=0.25, min_devices=2), [dev("d1", "failed", "boom"), dev("d2", "updating")],
     True, "1 finished device(s), fewer than 2: not judged yet"),
    (Gates(max_failure_fraction=0.25, min_devices=2), [dev("d1", "failed", "boom"), dev("d2", "passed")],
     False, "1 of 2 finished devices failed (50% > 25%): d1: boom"),
    (Gates(max_failure_fraction=0.5, min_devices=2), [dev("d1", "failed", "boom"), dev("d2", "passed")],
     True, "1 of 2 finished devices failed"),  # at the maximum, not over it
    (Gates(max_failure_fraction=0.0, min_devices=1), [dev("d1", "rolled_back", "slow"), dev("d2", "pending")],
     False, "1 of 1 finished devices failed (100% > 0%): d1: slow"),  # rolled back after failing: failed
    (Gates(max_failure_fraction=0.0, min_devices=2), [dev("d1", "skipped"), dev("d2", "rolled_back"),
                                                      dev("d3", "updated"), dev("d4", "requesting")],
     True, "0 of 2 finished devices failed"),  # updated is not finished until its gates
    (Gates(max_failure_fraction=0.0), [], True, "0 finished device(s), fewer than 1: not judged yet"),
    (Gates(max_failure_fraction=0.1, min_devices=1),
     [dev(f"d{i}", "failed", f"e{i}") for i in range(5)], False,
     "5 of 5 finished devices failed (100% > 10%): d0: e0; d1: e1; d2: e2"),  # the first three named
])
def test_fraction_verdict(gates, devices, passed, reason):
    assert p.fraction_verdict(gates, devices) == Verdict(passed, reason)


def test_on_gate_failure_rollback_or_halt():
    assert p.rolls_back(Wave("w", on_gate_failure="rollback")) and not p.rolls_back(Wave("w", on_gate_failure="halt"))


# ---- the store applies the tables ----------------------------------------------------------------------
def test_the_store_refuses_a_transition_the_table_does_not_allow(tmp_path):
    store = RolloutStore(tmp_path / "fleet.db")
    try:
        rid = store.create({"model": "m", "version": "2", "plan": "{}", "plan_file": "p", "repository_url": "",
                            "allow_downgrade": 0, "state": "running", "wave": 0, "requested": "", "detail": ""},
                           [("w", ["d1"])])
        assert store.move_device(rid, "d1", "request", mark=1.0)["state"] == "requesting"
        before = (store.device(rid, "d1"), store.rollout(rid), store.waves(rid), store.events(rid))
        with pytest.raises(TransitionError):
            store.move_device(rid, "d1", "job_active", detail="skips updating")
        with pytest.raises(TransitionError):
            store.move_rollout(rid, "halted")
        with pytest.raises(TransitionError):
            store.move_wave(rid, 0, "soaked")
        with pytest.raises(TransitionError):
            store.set_device(rid, "d1", state="passed")  # no way around the tables
        with pytest.raises(TransitionError):
            store.set_rollout(rid, state="completed")
        assert (store.device(rid, "d1"), store.rollout(rid), store.waves(rid), store.events(rid)) == before
        assert store.move_rollout(rid, "pause") == "paused"
        assert [(e["device"], e["state"]) for e in store.events(rid)] == \
            [(None, "running"), ("d1", "requesting"), (None, "paused")]
    finally:
        store.close()


# ---- one place for state names -------------------------------------------------------------------------
STATE_NAMES = set(p.ROLLOUT_STATES) | set(p.WAVE_STATES) | set(p.DEVICE_STATES) | set(job_states.STATES)


def _literals(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [v for elt in node.elts for v in _literals(elt)]
    return []


@pytest.mark.parametrize("module", ["stctl/rollout.py", "stctl/rollout_store.py", "stctl/device_client.py",
                                    "stctl/fleet_health.py"])
def test_states_are_compared_and_set_by_name_not_by_literal(module):
    """`x == "soaking"`, `x in ("failed", "rolled_back")` or `state="gating"` outside the policy would
    be a second copy of a state machine."""
    found = []
    for node in ast.walk(ast.parse((ROOT / module).read_text())):
        if isinstance(node, ast.Compare):
            found += [(node.lineno, v) for operand in (node.left, *node.comparators) for v in _literals(operand)]
        elif isinstance(node, ast.keyword) and node.arg == "state":
            found += [(node.value.lineno, v) for v in _literals(node.value)]
    assert [(line, v) for line, v in found if v in STATE_NAMES] == []


def test_the_policy_imports_nothing_that_does_io():
    tree = ast.parse((ROOT / "stctl" / "rollout_policy.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names} | \
        {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "collections.abc", "dataclasses", "manifests", "manifests.rollout_plan",
                        "stctl.errors"}, imported
