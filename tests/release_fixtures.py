"""Session fixtures of the release tests: demo packages built once, a published workspace
template, and a private copy of it per test.

Test modules load this file as a plugin (`pytest_plugins = ["release_fixtures"]`, never by
import) so the session fixtures run once per session; helpers are in release_helpers.py.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from model.build import build_demo
from model.package import read_manifest
from stctl.bootstrap import init_workspace
from stctl.repository import Repository
from stctl.workspace import Workspace, open_workspace

@pytest.fixture(scope="session")
def demo_packages(tmp_path_factory) -> tuple[Path, Path]:
    """st-demo 1.0.0 and 2.0.0 (variant 2: v1 with a quarter of its experts fine-tuned, only their shards changed)."""
    root = tmp_path_factory.mktemp("packages")
    build_demo(root / "v1", variant=1)
    build_demo(root / "v2", variant=2)
    return root / "v1", root / "v2"


@pytest.fixture(scope="session")
def demo_v3(tmp_path_factory, demo_packages) -> Path:
    """st-demo 3.0.0, never published in the template: the files of 2.0.0 under a new version."""
    path = tmp_path_factory.mktemp("packages3") / "v3"
    shutil.copytree(demo_packages[1], path)
    manifest = read_manifest(path)
    (path / "manifest.json").write_bytes(replace(manifest, version="3.0.0").to_bytes())
    return path


@pytest.fixture(scope="session")
def published_template(tmp_path_factory, demo_packages) -> Path:
    """A workspace with st-demo 1.0.0 and 2.0.0 published; copy it, never change it."""
    ws = init_workspace(tmp_path_factory.mktemp("template") / "fleet")
    repo = Repository(ws)
    repo.publish(demo_packages[0])
    repo.publish(demo_packages[1])
    return ws.root


@pytest.fixture
def workspace(tmp_path, published_template) -> Workspace:
    """A private copy of the published workspace."""
    shutil.copytree(published_template, tmp_path / "fleet")
    return open_workspace(tmp_path / "fleet")
