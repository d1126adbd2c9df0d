"""The states of a device's update job, as `GET /v1/updates/{id}` names them (DESIGN.md "Device
HTTP API"): the device walks them (`agent.lifecycle`), the operator reads them (`stctl.rollout`).

Rule: these names are the contract and this is their one list; a job ends in one of `FINAL`
(`active`: the release runs; `failed` or `rolled_back`: it does not) and never leaves it, except
that an `active` job becomes `rolled_back` when its release is rolled back.
"""
from __future__ import annotations

IDLE, FETCHING, VERIFYING, STAGED = "idle", "fetching", "verifying", "staged"
HEALTH_CHECKING, ACTIVATING, ACTIVE = "health-checking", "activating", "active"
FAILED, ROLLED_BACK = "failed", "rolled_back"
STATES = (IDLE, FETCHING, VERIFYING, STAGED, HEALTH_CHECKING, ACTIVATING, ACTIVE, FAILED, ROLLED_BACK)
FINAL = frozenset({ACTIVE, FAILED, ROLLED_BACK})
UNFINISHED = tuple(s for s in STATES if s not in FINAL)
