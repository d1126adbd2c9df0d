"""The platform layer both sides use: locks across processes and threads, whole-or-nothing
writes, the one duration grammar."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.durations import parse_duration_s
from common.errors import DurationError, LockHeldError
from common.files import atomic_write, read_json, writing
from common.locks import FileLock

ROOT = Path(__file__).resolve().parent.parent
HOLDER = """
import sys, time
from common.locks import FileLock
lock = FileLock(sys.argv[1])
assert lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_a_process(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_lock_held_by_another_process_is_refused_and_freed_when_it_dies(tmp_path):
    path = tmp_path / ".lock"
    holder = hold_in_a_process(path)
    try:
        lock = FileLock(path)
        assert not lock.acquire() and lock.held_elsewhere()
        with pytest.raises(LockHeldError):
            with lock:
                pass
        with pytest.raises(KeyError, match="mine"):
            with lock.held(KeyError("mine")):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire()  # the OS released the dead holder's lock
    lock.release()
    assert path.exists()  # the lock file stays


def test_two_lock_objects_in_one_process_exclude_each_other(tmp_path):
    first, second = FileLock(tmp_path / ".lock"), FileLock(tmp_path / ".lock")
    with first:
        assert not second.acquire() and not first.acquire()  # not re-entrant either
    assert second.acquire()
    second.release()


def test_a_lock_taken_in_one_thread_is_released_in_another(tmp_path):
    lock = FileLock(tmp_path / ".lock")
    assert lock.acquire()
    threading.Thread(target=lock.release).start()
    deadline = time.monotonic() + 10
    while not FileLock(tmp_path / ".lock").acquire():
        assert time.monotonic() < deadline, "the release in the other thread did not free the lock"
        time.sleep(0.01)


def test_acquire_waits_up_to_its_limit(tmp_path):
    lock = FileLock(tmp_path / ".lock")
    with FileLock(tmp_path / ".lock"):
        assert not lock.acquire(wait_s=0.2)
    assert lock.acquire(wait_s=0.2)
    lock.release()


def test_a_write_that_fails_midway_keeps_the_old_content(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, b'{"v": 1}')
    with pytest.raises(RuntimeError):
        with writing(path) as f:
            f.write(b'{"v": 2, "half')
            raise RuntimeError("disk full")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind
    with writing(path) as f:
        f.write(b'{"v": 3}')
    assert read_json(path) == {"v": 3} and read_json(tmp_path / "absent.json") is None


@pytest.mark.parametrize("value,seconds", [
    (30, 30.0), (1.5, 1.5), ("250ms", 0.25), ("90s", 90.0), (" 10m ", 600.0), ("1.5h", 5400.0), ("7d", 604800.0),
    ("45", 45.0),
])
def test_one_duration_grammar(value, seconds):
    assert parse_duration_s(value, "soak") == seconds


@pytest.mark.parametrize("value,mention", [
    ("10 minutes", "expected seconds"), ("-5s", "expected seconds"), (-1, ">= 0"), (True, "expected seconds"),
    (float("nan"), "finite"), ("1e3s", "expected seconds"), ("٣s", "expected seconds"), (None, "expected seconds"),
])
def test_bad_durations_name_where_and_what(value, mention):
    with pytest.raises(DurationError, match=mention) as e:
        parse_duration_s(value, "waves[0].soak")
    assert str(e.value).startswith("waves[0].soak: ")


def test_a_positive_duration_refuses_zero_and_callers_choose_their_error():
    with pytest.raises(ValueError, match="> 0"):
        parse_duration_s("0s", "expiry.root", positive=True, error=ValueError)
