"""The download bandwidth cap (`max_bytes_per_s`): a job's fetch of the demo's v1 -> v2 delta
from the session's served repository, measured (bytes the job counted / elapsed) within 10% of
the cap; a capped download stopped by a shutdown mid-wait resumes; no cap leaves it as it was.
A behaviour check of the limiter, not a speed benchmark: the cap is small enough that the
transfer takes a few seconds, whatever the machine."""
from __future__ import annotations

import threading
import time

import pytest

from agent.config import load_config
from agent.errors import UpdateStoppedError
from agent.lifecycle import FETCHING, STAGED
from agent.rate_limit import TokenBucket
from agent.telemetry import Telemetry
from agent.updater import Updater

pytest_plugins = ["release_fixtures", "agent_fixtures"]

pytestmark = pytest.mark.slow

CAP = 200_000  # bytes/s: the ~0.55 MB delta takes about 3 s


def open_updater(data_dir) -> Updater:
    config = load_config(data_dir)
    return Updater(config, Telemetry(config.telemetry_db, config.limits.telemetry_max_rows))


def test_a_capped_download_runs_within_ten_percent_of_the_cap(device_dir):
    updater = open_updater(device_dir)
    job = updater.request("st-demo", "2.0.0", hold=True, max_bytes_per_s=CAP)  # stops at staged: the fetch alone
    started = time.monotonic()
    job = updater.run(job)
    elapsed = time.monotonic() - started
    assert job.state == STAGED and job.bytes_downloaded > 2 * CAP, job
    rate = job.bytes_downloaded / elapsed
    print(f"capped at {CAP} B/s: {job.bytes_downloaded} bytes in {elapsed:.2f} s = {rate:.0f} B/s")
    assert abs(rate - CAP) <= 0.1 * CAP, (rate, job.bytes_downloaded, elapsed)


def test_without_a_cap_the_download_completes(device_dir):
    updater = open_updater(device_dir)
    job = updater.run(updater.request("st-demo", "2.0.0", hold=True))
    assert job.state == STAGED and job.max_bytes_per_s is None and job.bytes_downloaded > 2 * CAP, job


def test_a_capped_download_stopped_mid_wait_resumes(device_dir):
    updater = open_updater(device_dir)
    job = updater.request("st-demo", "2.0.0", hold=True, max_bytes_per_s=CAP)
    updater.start(job)
    threading.Event().wait(1.0)  # part of the delta is down
    updater.shutdown(timeout=30)
    assert not updater.busy()
    stopped = updater.jobs.load(job.id)
    assert stopped.state == FETCHING and 0 < stopped.bytes_downloaded, stopped
    again = open_updater(device_dir)
    assert again.boot().id == job.id
    again.join(timeout=60)
    resumed = again.jobs.load(job.id)
    assert resumed.state == STAGED and resumed.max_bytes_per_s == CAP, resumed


def test_the_bucket_refuses_a_cap_below_the_minimum_and_a_stop_ends_its_wait():
    with pytest.raises(ValueError, match="at least 1024"):
        TokenBucket(1000)
    stop = threading.Event()
    stop.set()
    bucket = TokenBucket(1024, stop)
    with pytest.raises(UpdateStoppedError):
        bucket.take(1 << 20)  # a debt of ~1000 s, cut short at once
