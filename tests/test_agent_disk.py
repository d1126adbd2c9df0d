"""Too little disk for an update. The data dir lives on a tmpfs with room for v1, the agent's own
small writes and only half of the v2 delta: the job is refused before any shard is downloaded (the
room check counts the missing bytes against the free space), v1 keeps serving, and the job and its
`updates` row say why. A disk that fills up anyway during the download (another writer took the space after the
check; ENOSPC injected into the fetcher's file writes, in-process) fails the job cleanly: no
partial or unverified files are left, every blob matches its hash.

Mounting a tmpfs needs root (CAP_SYS_ADMIN); without it the room check is driven on the real
disk by a `download_disk_margin_bytes` larger than its free space."""
from __future__ import annotations

import errno
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent_helpers import install_with_library, set_limits
from model.package import read_manifest
from stctl.delta import diff_manifests

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow


# what the agent writes itself before its room check: telemetry rows (and their WAL), TUF metadata,
# the release's manifest (about 120 KiB with st-demo)
AGENT_WRITES = 256 * 1024


def allocated_bytes(root: Path) -> int:
    """Disk space the files under `root` take (whole blocks: a 2 KB shard takes 4 KiB of a tmpfs)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def assert_failed_cleanly(data_dir: Path, job: dict, reason: str) -> None:
    assert job["state"] == "failed" and job["history"][-2:] == ["fetching", "failed"], job
    assert reason in job["detail"], job["detail"]
    store = data_dir / "store"
    assert all(not any((store / d).iterdir()) for d in ("tmp", "partial", "incoming"))
    assert not (data_dir / "releases" / "st-demo" / "2.0.0").exists()
    assert not list((data_dir / "releases").glob("*/.*partial*"))
    for blob in (store / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


@pytest.fixture
def small_disk(tmp_path, v1_template, demo_packages):
    """A tmpfs holding a copy of the v1 data dir, room for the agent's own writes and half of the v2
    delta; None without root."""
    delta = diff_manifests(read_manifest(demo_packages[0]), read_manifest(demo_packages[1]))
    mount = tmp_path / "disk"
    mount.mkdir()
    size_kib = (allocated_bytes(v1_template) + AGENT_WRITES + delta.bytes_to_ship // 2) // 1024
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


def test_too_little_room_for_the_missing_bytes_refuses_the_update_before_downloading(
        small_disk, fleet, agent_factory, expected_text, device_dir, demo_packages):
    delta = diff_manifests(read_manifest(demo_packages[0]), read_manifest(demo_packages[1]))
    if small_disk is None:  # no tmpfs: the real disk, with a margin it cannot leave free
        data_dir = device_dir
        set_limits(data_dir, download_disk_margin_bytes=2 * shutil.disk_usage(data_dir).total)
    else:  # the margin out of the way: the missing bytes alone do not fit
        data_dir = small_disk
        set_limits(data_dir, download_disk_margin_bytes=1)
        assert shutil.disk_usage(data_dir).free < AGENT_WRITES + delta.bytes_to_ship
    agent = agent_factory(data_dir, fleet).start()
    job = agent.wait_job(agent.update("2.0.0"))
    assert_failed_cleanly(data_dir, job, "not enough disk space for st-demo@2.0.0")
    assert f"{delta.bytes_to_ship} bytes to download" in job["detail"]
    if small_disk is not None:  # what the check saw free: less than the missing bytes
        assert int(re.search(r"(\d+) available", job["detail"]).group(1)) < delta.bytes_to_ship, job["detail"]
    assert job["shards_downloaded"] == 0 and job["bytes_downloaded"] < delta.bytes_to_ship // 4  # metadata only
    status = agent.status()
    assert status["active"] == {"model": "st-demo", "version": "1.0.0"} and status["update"] is None
    assert agent.complete()["choices"][0]["text"] == expected_text["1.0.0"]
    rows = agent.get("/v1/telemetry", params={"table": "updates"}).json()["rows"]
    assert rows[-1]["job_id"] == job["id"] and rows[-1]["state"] == "failed"
    assert "not enough disk space" in rows[-1]["detail"]
    assert agent.stop() in (0, -15)


def test_disk_filling_up_during_the_download_fails_cleanly(device_dir, monkeypatch):
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
    job = install_with_library(device_dir, "2.0.0")
    assert_failed_cleanly(device_dir, job, "No space left")
