"""Session fixtures of the agent tests: an enrolled fleet whose repository is served on 127.0.0.1,
a device data dir with st-demo 1.0.0 installed (built once, copied per test), and a factory of
real `st-agent serve` processes stopped at the end of each test.

Test modules load this file as a plugin (`pytest_plugins = ["release_fixtures", "agent_fixtures"]`,
never by import), so session fixtures run once per session; helpers are in agent_helpers.py.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_helpers import PROMPT, Agent, Fleet, install_with_library, new_device
from release_helpers import serve
from stctl.enroll import enroll_device
from stctl.workspace import open_workspace


@pytest.fixture(scope="session")
def fleet(tmp_path_factory, published_template) -> Iterator[Fleet]:
    """A private copy of the published workspace (st-demo 1.0.0, 2.0.0), device pc1 enrolled,
    the repository served for the whole session."""
    root = tmp_path_factory.mktemp("agent-fleet")
    shutil.copytree(published_template, root / "fleet")
    ws = open_workspace(root / "fleet")
    with serve(ws.repository) as url:
        enroll_device(ws, "pc1", "https://127.0.0.1:8443", root / "pc1.enroll", url, ["line=4"])
        yield Fleet(ws, url, root / "pc1.enroll")


@pytest.fixture(scope="session")
def v1_template(fleet, tmp_path_factory) -> Path:
    """Data dir of pc1 with st-demo 1.0.0 installed; never change it, copy it (`device_dir`)."""
    data_dir = tmp_path_factory.mktemp("agent-v1") / "device"
    new_device(fleet, data_dir)
    job = install_with_library(data_dir, "1.0.0")
    assert job["state"] == "active", job
    return data_dir


@pytest.fixture
def device_dir(v1_template, tmp_path) -> Path:
    """A private copy of the data dir with st-demo 1.0.0 active."""
    shutil.copytree(v1_template, tmp_path / "device")
    return tmp_path / "device"


@pytest.fixture
def agent_factory() -> Iterator:
    """`make(data_dir, fleet)` -> Agent; every agent made is stopped at the end of the test."""
    made: list[Agent] = []

    def make(data_dir: Path, fleet: Fleet) -> Agent:
        made.append(Agent(data_dir, fleet))
        return made[-1]

    yield make
    for agent in made:
        if agent.process is not None and agent.process.poll() is None:
            agent.kill()


@pytest.fixture(scope="session")
def expected_text(demo_packages) -> dict[str, str]:
    """Greedy 4-token continuation of PROMPT for each demo version (computed in-process); they
    differ, so a completion's text tells which version answered."""
    from model import Engine

    out = {}
    for version, package in zip(("1.0.0", "2.0.0"), demo_packages):
        engine = Engine.load(package)
        stop = engine.tokenizer.stop_ids
        ids = engine.generate(engine.tokenizer.encode(PROMPT), 4, stop_ids=stop)
        out[version] = engine.tokenizer.decode([i for i in ids if i not in stop])
        engine.close()
    assert out["1.0.0"] != out["2.0.0"], out
    return out
