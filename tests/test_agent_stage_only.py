"""Stage only, through a real `st-agent serve`: `POST /v1/updates` with `hold` fetches and
verifies the release and stops at `staged` (the old release still serves); the waiting job
survives a SIGKILL and a restart; the same request without `hold` installs it."""
from __future__ import annotations

import pytest

from agent_helpers import JOB_TIMEOUT_S, wait_for

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow


def test_a_held_update_waits_at_staged_across_a_kill_and_installs_when_released(fleet, device_dir, agent_factory,
                                                                                expected_text):
    agent = agent_factory(device_dir, fleet).start()
    job_id = agent.update("2.0.0", hold=True)
    waits = lambda: (job := agent.get(f"/v1/updates/{job_id}").json())["detail"].startswith("staged; held") and job
    job = wait_for(waits, "the held update to wait at staged", timeout=JOB_TIMEOUT_S, poll_s=0.2)
    assert job["state"] == "staged" and job["hold"], job
    status = agent.status()
    assert status["active"] == {"model": "st-demo", "version": "1.0.0"} and status["serving"] == "st-demo@1.0.0"
    assert status["update"]["id"] == job_id
    assert agent.complete()["choices"][0]["text"] == expected_text["1.0.0"]
    agent.kill()
    agent.start()
    waiting = agent.get(f"/v1/updates/{job_id}").json()
    assert waiting["state"] == "staged" and waiting["hold"] and waiting["visits"]["staged"] == 1, waiting
    assert agent.status()["active"]["version"] == "1.0.0"
    assert agent.update("2.0.0") == job_id  # the same release without hold: the waiting job goes on
    final = agent.wait_job(job_id)
    assert final["state"] == "active" and final["history"][-4:] == ["staged", "health-checking", "activating",
                                                                     "active"], final
    assert agent.complete()["choices"][0]["text"] == expected_text["2.0.0"]
    agent.stop()
