"""A full disk during the download of an update: the data dir lives on a tmpfs with room for v1
and only half of the v2 delta. The update must fail cleanly: v1 keeps serving, no partial files
are left, every blob matches its hash, and the job and telemetry record the failure.

Mounting a tmpfs needs root (CAP_SYS_ADMIN); without it the same path runs in-process with
ENOSPC injected into the fetcher's file writes."""
from __future__ import annotations

import errno
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from agent_helpers import install_with_library
from model.package import read_manifest
from stctl.delta import diff_manifests

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def assert_failed_cleanly(data_dir: Path, job: dict) -> None:
    assert job["state"] == "failed" and job["history"][-2:] == ["fetching", "failed"], job
    assert "No space left" in job["detail"] or "ENOSPC" in job["detail"], job["detail"]
    store = data_dir / "store"
    assert all(not any((store / d).iterdir()) for d in ("tmp", "partial", "incoming"))
    assert not (data_dir / "releases" / "st-demo" / "2.0.0").exists()
    assert not list((data_dir / "releases").glob("*/.*partial*"))
    for blob in (store / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


@pytest.fixture
def small_disk(tmp_path, v1_template, demo_packages):
    """A tmpfs holding a copy of the v1 data dir plus half of the v2 delta; None without root."""
    delta = diff_manifests(read_manifest(demo_packages[0]), read_manifest(demo_packages[1]))
    mount = tmp_path / "disk"
    mount.mkdir()
    size_kib = (tree_bytes(v1_template) + 512 * 1024 + delta.bytes_to_ship // 2) // 1024
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        yield None
        return
    try:
        shutil.copytree(v1_template, mount / "device", copy_function=shutil.copy2)
        yield mount / "device"
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_full_disk_during_download_fails_cleanly(small_disk, fleet, agent_factory, expected_text, device_dir,
                                                 monkeypatch):
    if small_disk is None:  # no tmpfs: inject ENOSPC into the fetcher's writes, in-process
        _injected_enospc(device_dir, monkeypatch)
        return
    agent = agent_factory(small_disk, fleet).start()
    job = agent.wait_job(agent.update("2.0.0"))
    assert_failed_cleanly(small_disk, job)
    status = agent.status()
    assert status["active"] == {"model": "st-demo", "version": "1.0.0"} and status["update"] is None
    assert agent.complete()["choices"][0]["text"] == expected_text["1.0.0"]
    rows = agent.get("/v1/telemetry", params={"table": "updates"}).json()["rows"]
    assert rows[-1]["job_id"] == job["id"] and rows[-1]["state"] == "failed"
    assert agent.stop() in (0, -15)


def _injected_enospc(data_dir: Path, monkeypatch) -> None:
    import agent.fetcher as fetcher

    real_open = open
    budget = {"bytes": 200_000}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            budget["bytes"] -= len(data)
            if budget["bytes"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def full_open(path, mode="r", *args, **kw):
        f = real_open(path, mode, *args, **kw)
        return FullDisk(f) if "w" in mode or "+" in mode else f

    monkeypatch.setattr(fetcher, "open", full_open, raising=False)
    job = install_with_library(data_dir, "2.0.0")
    assert_failed_cleanly(data_dir, job)
