"""Turns at the engine: round robin over application keys, cancelled and timed-out waiters
leave at once, one turn at a time."""
from __future__ import annotations

import threading
import time

from agent.fair_queue import POLL_S, FairQueue


def queue_up(queue: FairQueue, keys: list[str]) -> tuple[list[str], list[threading.Thread]]:
    """Hold the turn, queue one waiter per entry of `keys` in that order, and record the order
    in which they are served once the turn is released."""
    assert queue.acquire("holder", threading.Event(), 1.0)
    served, threads = [], []
    for key in keys:
        def wait(key=key):
            assert queue.acquire(key, threading.Event(), 10.0)
            served.append(key)
            queue.release()
        threads.append(threading.Thread(target=wait))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while queue.waiting() < len(threads) and time.monotonic() < deadline:
            time.sleep(0.005)
    return served, threads


def test_a_key_with_many_waiters_takes_turns_with_the_others():
    queue = FairQueue()
    served, threads = queue_up(queue, ["flood"] * 4 + ["hmi", "scanner"])
    queue.release()
    for t in threads:
        t.join(10)
    assert served[:3] == ["flood", "hmi", "scanner"]  # not flood x4 first
    assert served.count("flood") == 4 and len(served) == 6


def test_the_key_served_longest_ago_goes_next():
    queue = FairQueue()
    assert queue.acquire("a", threading.Event(), 1.0)
    queue.release()  # "a" was served just now
    served, threads = queue_up(queue, ["a", "b"])
    queue.release()
    for t in threads:
        t.join(10)
    assert served == ["b", "a"]


def test_a_cancelled_waiter_leaves_without_a_turn():
    queue = FairQueue()
    assert queue.acquire("holder", threading.Event(), 1.0)
    cancel, result = threading.Event(), []
    waiter = threading.Thread(target=lambda: result.append(queue.acquire("gone", cancel, 30.0)))
    waiter.start()
    time.sleep(0.05)
    started = time.monotonic()
    cancel.set()
    waiter.join(5)
    assert result == [False] and queue.waiting() == 0
    assert time.monotonic() - started < 1.0 + POLL_S  # it did not wait for the turn or the timeout
    queue.release()
    assert queue.acquire("next", threading.Event(), 1.0)  # the turn is free, nobody holds it


def test_a_waiter_times_out_and_one_turn_runs_at_a_time():
    queue = FairQueue()
    assert queue.acquire("holder", threading.Event(), 1.0)
    assert not queue.acquire("late", threading.Event(), 0.1)
    assert queue.waiting() == 0
    queue.release()
    inside, most = [0], [0]

    def work():
        for _ in range(20):
            assert queue.acquire(threading.current_thread().name, threading.Event(), 10.0)
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.001)
            inside[0] -= 1
            queue.release()

    workers = [threading.Thread(target=work, name=f"k{i}") for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert most[0] == 1
