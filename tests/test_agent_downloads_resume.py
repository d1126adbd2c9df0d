"""Downloads that keep what they verified: a repository server in its own process is killed
mid-download, cuts connections, or answers 5xx; the device retries with backoff, resumes every
interrupted file where it stopped, keeps its partial and verified files when a job fails for a
transport reason, re-verifies leftovers before use, and stops a backoff wait at once on shutdown.
Bytes are counted by the server (every body chunk it sent) and by the device (`updates` rows)."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import DownloadError, TransportError
from agent.fetcher import FetcherConfig
from agent.telemetry import Telemetry
from agent.updater import Updater
from agent_helpers import free_port, set_limits
from faulty_repository import BLOBS, FaultyRepository
from manifests import ModelManifest
from manifests.release import blob_target, package_files
from model.package import read_manifest
from release_helpers import Device
from stctl.repository import stored_target_path

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow

CHUNK = FetcherConfig().chunk_size
FAST_RETRIES = FetcherConfig(retry_window_s=30.0, retry_first_delay_s=0.05, retry_max_delay_s=0.2)
NO_PATIENCE = FetcherConfig(retry_window_s=0.5, retry_first_delay_s=0.05, retry_max_delay_s=0.2)


def blob_path(sha256: str) -> str:
    """The URL path a device downloads the blob `sha256` from."""
    return "/targets/" + stored_target_path(blob_target(sha256), sha256)


def download_order(manifest: ModelManifest, have: set[str] = frozenset()) -> list[tuple[str, int]]:
    """(sha256, size) of the blobs a fetch of `manifest` downloads, in the order it downloads them."""
    order: dict[str, int] = {}
    for _, sha256, size in package_files(manifest):
        if sha256 not in have:
            order.setdefault(sha256, size)
    return list(order.items())


def middle_of_the_middle_file(order: list[tuple[str, int]]) -> int:
    """Blob bytes sent when the download is half-way through its middle file."""
    k = len(order) // 2
    return sum(size for _, size in order[:k]) + order[k][1] // 2


def store_files(store: Path, folder: str) -> list[Path]:
    return sorted((store / folder).iterdir())


def assert_every_blob_matches_its_name(store: Path) -> None:
    for folder in ("blobs/sha256", "incoming"):
        for blob in (store / folder).iterdir():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob


def update_rows(agent, job_id: str) -> list[dict]:
    rows = agent.get("/v1/telemetry", params={"table": "updates"}).json()["rows"]
    return [r for r in rows if r["job_id"] == job_id]


@pytest.fixture
def v2_delta(demo_packages) -> list[tuple[str, int]]:
    """The blobs an update from 1.0.0 to 2.0.0 downloads, in order."""
    v1, v2 = (read_manifest(p) for p in demo_packages)
    return download_order(v2, {sha for _, sha, _ in package_files(v1)})


@pytest.fixture
def repository(fleet, tmp_path):
    repo = FaultyRepository(fleet.workspace.repository, tmp_path / "sent.log")
    yield repo
    repo.stop()


def test_repository_killed_mid_download_and_restarted_the_same_job_completes(
        fleet, device_dir, agent_factory, repository, v2_delta):
    set_limits(device_dir, download_retry_window_s=60, download_retry_first_delay_s=0.2, download_retry_max_delay_s=1)
    delta_bytes = sum(size for _, size in v2_delta)
    repository.start(die_after=middle_of_the_middle_file(v2_delta))
    agent = agent_factory(device_dir, fleet).start()
    job_id = agent.update("2.0.0", repository_url=repository.url)
    repository.wait_killed(timeout=120)
    time.sleep(2)  # the repository host is down for a while; the device backs off and keeps trying
    repository.start()
    job = agent.wait_job(job_id)
    assert job["state"] == "active", job
    assert job["history"] == ["idle", "fetching", "verifying", "staged", "health-checking", "activating", "active"]
    interrupted, size = v2_delta[len(v2_delta) // 2]
    assert set(repository.requests(blob_path(interrupted))) == {None, f"bytes={size // 2}-"}  # resumed, not restarted
    assert repository.bytes_sent(BLOBS) == delta_bytes  # no byte of a shard sent twice
    assert job["bytes_downloaded"] == repository.bytes_sent()  # the device counted what it received, once
    assert update_rows(agent, job_id)[-1]["bytes_downloaded"] == job["bytes_downloaded"]
    assert agent.status()["active"] == {"model": "st-demo", "version": "2.0.0"}


def test_repository_down_past_the_retry_window_keeps_what_was_received_and_the_next_job_fetches_only_the_rest(
        fleet, device_dir, agent_factory, repository, v2_delta):
    set_limits(device_dir, download_retry_window_s=1, download_retry_first_delay_s=0.1, download_retry_max_delay_s=0.5)
    delta_bytes = sum(size for _, size in v2_delta)
    repository.start(die_after=middle_of_the_middle_file(v2_delta))
    agent = agent_factory(device_dir, fleet).start()
    first = agent.wait_job(agent.update("2.0.0", repository_url=repository.url))
    assert first["state"] == "failed" and first["history"][-2:] == ["fetching", "failed"], first
    assert "TransientDownloadError" in first["detail"] and "gave up" in first["detail"], first["detail"]
    store = device_dir / "store"
    [partial] = store_files(store, "partial")
    incoming = store_files(store, "incoming")
    assert [p.name for p in incoming] == sorted(sha for sha, _ in v2_delta[:len(v2_delta) // 2])
    assert_every_blob_matches_its_name(store)
    kept = partial.stat().st_size + sum(p.stat().st_size for p in incoming)
    assert 0 < kept < delta_bytes
    sent_to_first = repository.bytes_sent()
    assert update_rows(agent, first["id"])[-1]["bytes_downloaded"] == first["bytes_downloaded"] == sent_to_first

    repository.clear_log()
    repository.start()
    second = agent.wait_job(agent.update("2.0.0", repository_url=repository.url))
    assert second["state"] == "active", second
    assert repository.bytes_sent(BLOBS) == delta_bytes - kept  # only the missing bytes
    assert second["bytes_downloaded"] == repository.bytes_sent() < delta_bytes
    assert not store_files(store, "partial") and not store_files(store, "incoming")


def test_three_connection_cuts_of_one_file_still_complete_the_fetch(workspace, demo_packages, tmp_path):
    manifest = read_manifest(demo_packages[0])
    biggest = max(manifest.shards, key=lambda s: s.size)
    path, quarter = blob_path(biggest.sha256), biggest.size // 4
    repo = FaultyRepository(workspace.repository, tmp_path / "sent.log").start(cut_path=path, cut_after=quarter, cuts=3)
    device = Device(tmp_path / "device", workspace)
    try:
        release = device.client(repo.url, fetcher=FAST_RETRIES).fetch_release("st-demo", "1.0.0")
    finally:
        repo.stop()
    assert release.shards_downloaded == len(download_order(manifest))
    assert repo.requests(path) == {None: quarter, f"bytes={quarter}-": quarter, f"bytes={2 * quarter}-": quarter,
                                   f"bytes={3 * quarter}-": biggest.size - 3 * quarter}
    assert device.store.installed() >= {s.sha256 for s in manifest.shards}
    assert_every_blob_matches_its_name(device.store.root)
    assert device.nothing_unverified()


def test_5xx_is_retried_and_a_404_is_not(workspace, demo_packages, tmp_path):
    manifest = read_manifest(demo_packages[0])
    path = blob_path(manifest.shards[0].sha256)
    device = Device(tmp_path / "device", workspace)
    repo = FaultyRepository(workspace.repository, tmp_path / "sent.log")
    try:
        repo.start(status_path=path, status=503, statuses=2)
        release = device.client(repo.url, fetcher=FAST_RETRIES).fetch_release("st-demo", "1.0.0")
        assert release.manifest.version == "1.0.0"
        assert repo.statuses_sent(path) == [503, 503]
        repo.stop()
        repo.clear_log()
        v1 = {s.sha256 for s in manifest.shards}
        path2 = blob_path(next(s.sha256 for s in read_manifest(demo_packages[1]).shards if s.sha256 not in v1))
        repo.start(status_path=path2, status=404, statuses=100)
        with pytest.raises(DownloadError, match="HTTP 404") as failed:
            device.client(repo.url, fetcher=FAST_RETRIES).fetch_release("st-demo", "2.0.0")
    finally:
        repo.stop()
    assert not isinstance(failed.value, TransportError)
    assert repo.statuses_sent(path2) == [404]  # asked once: a missing file does not appear by waiting


def test_a_bit_flipped_partial_and_a_truncated_verified_blob_are_refetched_never_installed(
        workspace, demo_packages, tmp_path):
    manifest = read_manifest(demo_packages[0])
    order = download_order(manifest)
    repo = FaultyRepository(workspace.repository, tmp_path / "sent.log")
    device = Device(tmp_path / "device", workspace)
    try:
        repo.start(die_after=middle_of_the_middle_file(order))
        with pytest.raises(TransportError):
            device.client(repo.url, fetcher=NO_PATIENCE).fetch_release("st-demo", "1.0.0")
        [partial] = store_files(device.store.root, "partial")
        flipped_sha, flipped_size = order[len(order) // 2]
        held = partial.stat().st_size
        data = bytearray(partial.read_bytes())
        data[held // 2] ^= 0x01
        partial.write_bytes(bytes(data))
        truncated = store_files(device.store.root, "incoming")[0]
        os.chmod(truncated, 0o644)
        with open(truncated, "r+b") as f:
            f.truncate(truncated.stat().st_size // 2)
        repo.clear_log()
        repo.start()
        release = device.client(repo.url, fetcher=FAST_RETRIES).fetch_release("st-demo", "1.0.0")
    finally:
        repo.stop()
    assert release.manifest.version == "1.0.0"
    assert_every_blob_matches_its_name(device.store.root)
    assert device.store.installed() >= {sha for sha, _ in order}
    # the flipped partial: resumed, failed its hash, fetched whole once more; the truncated blob: fetched whole
    assert repo.requests(blob_path(flipped_sha)) == {f"bytes={held}-": flipped_size - held, None: flipped_size}
    assert repo.requests(blob_path(truncated.name)) == {None: dict(order)[truncated.name]}
    assert device.nothing_unverified()


def test_shutdown_ends_a_backoff_wait_at_once_and_leaves_the_job_to_resume(device_dir):
    set_limits(device_dir, download_retry_window_s=600, download_retry_first_delay_s=30, download_retry_max_delay_s=30)
    config = load_config(device_dir)
    telemetry = Telemetry(config.telemetry_db, config.limits.telemetry_max_rows)
    try:
        updater = Updater(config, telemetry)
        job = updater.request("st-demo", "2.0.0", repository_url=f"http://127.0.0.1:{free_port()}")  # nobody there
        updater.start(job)
        deadline = time.monotonic() + 30
        while job.state != "fetching" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # connections are refused at once: the worker is in a backoff wait (up to 30 s)
        updater.shutdown(10)
        assert not updater.busy()  # bounded liveness: it did not sit out the wait
        saved = updater.jobs.load(job.id)
        assert saved.state == "fetching" and updater.jobs.unfinished().id == job.id  # resumes at the next start
        assert updater.lock.acquire()  # the worker let go of the data dir
        updater.lock.release()
    finally:
        telemetry.close()
