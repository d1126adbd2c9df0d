"""Fixtures of the rollout tests: `fleet3`, a workspace with d1 (ring=canary), d2 and d3 enrolled,
each a real `st-agent serve` on 127.0.0.1 with st-demo 1.0.0 active (one fleet per test module),
and `on_v1`, which puts every device back on 1.0.0 with no rollout unfinished.

Test modules load this file as a plugin (`pytest_plugins = ["release_fixtures", "agent_fixtures",
"rollout_fixtures"]`, never by import); helpers are in rollout_helpers.py.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from agent_helpers import running_agents
from rollout_helpers import DEVICES, V1, V2, Fleet3, latest_unfinished
from stctl.rollout import abort_rollout


@pytest.fixture(scope="module")
def fleet3(published_template, v1_template, tmp_path_factory) -> Iterator[Fleet3]:
    """Workspace with d1 (ring=canary), d2, d3 enrolled; each a real agent with st-demo 1.0.0 active."""
    with running_agents(published_template, v1_template, tmp_path_factory.mktemp("fleet3"), DEVICES) as (ws, _, agents):
        yield Fleet3(ws, agents)


@pytest.fixture
def on_v1(fleet3) -> dict[str, float]:
    """No rollout unfinished, every device on 1.0.0 (a device on 2.0.0 is rolled back); returns each
    device's clock (the agents run on this host: its clock)."""
    if latest_unfinished(fleet3.ws) is not None:  # a failed test left one behind
        abort_rollout(fleet3.ws)
    for name, agent in fleet3.agents.items():
        if agent.status()["active"] == V2:
            assert agent.post("/v1/rollback").status_code == 200
    assert all(v == V1 for v in fleet3.active().values()), fleet3.active()
    now = time.time()
    return {name: now for name in fleet3.agents}
