"""The pieces of the device's call-home loop, with an injected clock and random source: the
maintenance window read in its own time zone, the backoff sequence, the report seq kept across a
restart, the telemetry backlog sent in capped batches with nothing skipped, and the config."""
from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from agent.call_home import next_delay, pending_rows, window_open
from agent.call_home_state import CallHomeState
from agent.config import CallHomeConfig, load_config
from agent.errors import ConfigError
from agent.telemetry import Telemetry
from manifests.call_home import Window

BERLIN = ZoneInfo("Europe/Berlin")


def at(hour: int, minute: int, tz: ZoneInfo = BERLIN) -> float:
    return datetime(2024, 7, 1, hour, minute, tzinfo=tz).timestamp()


def test_window_is_read_in_its_own_time_zone_and_wraps_past_midnight():
    night = Window(22 * 60, 4 * 60, "Europe/Berlin")
    assert window_open(night, at(23, 30)) and window_open(night, at(3, 59)) and window_open(night, at(22, 0))
    assert not window_open(night, at(4, 0)) and not window_open(night, at(12, 0))
    # 21:30 UTC is 23:30 in Berlin (summer time): open, although 21:30 is outside 22:00-04:00
    assert window_open(night, at(21, 30, ZoneInfo("UTC")))
    assert not window_open(Window(22 * 60, 4 * 60, "Asia/Tokyo"), at(23, 30))  # 06:30 in Tokyo
    assert window_open(None, at(12, 0))


def test_unknown_time_zone_keeps_the_window_closed():
    assert not window_open(Window(0, 1439, "Mars/Olympus"), at(12, 0))


def test_backoff_doubles_from_poll_s_up_to_the_cap_and_jitter_only_stretches():
    config = CallHomeConfig("https://fleet:8444", poll_s=1.0, jitter=0.1, max_backoff_s=8.0)
    assert [next_delay(config, n, None, 0.0) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert next_delay(config, 3, None, 1.0) == pytest.approx(4.4)
    assert next_delay(config, 10_000, None, 0.5) == pytest.approx(8.4)  # no overflow after a long outage
    assert next_delay(config, 0, 30.0, 0.0) == 30.0  # success: the server's interval
    assert next_delay(config, 0, 30.0, 0.99) == pytest.approx(32.97)
    assert next_delay(config, 0, None, 0.0) == 1.0  # before the first answer: poll_s


def test_seq_is_saved_before_use_and_grows_across_a_restart(tmp_path):
    path = tmp_path / "call_home.json"
    first = CallHomeState(path, clock=lambda: 0.0)
    assert [first.next_seq(), first.next_seq()] == [1, 2]
    again = CallHomeState(path, clock=lambda: 0.0)  # the daemon restarted
    assert again.next_seq() == 3
    path.unlink()  # state lost: the clock in ms still keeps seq above what the server saw
    assert CallHomeState(path, clock=lambda: 1000.0).next_seq() == 1_000_000


def test_acks_and_acted_assignments_survive_a_restart(tmp_path):
    path = tmp_path / "call_home.json"
    state = CallHomeState(path)
    state.ack({"generations": 12.5})
    state.act("a1", "f" * 32)
    again = CallHomeState(path)
    assert again.acked == {"generations": 12.5} and again.acted_on("a1") and not again.acted_on("a2")
    assert again.assignment_of("f" * 32) == "a1"


def test_unreadable_state_is_an_error_not_a_reset(tmp_path):
    path = tmp_path / "call_home.json"
    path.write_text("{torn")
    with pytest.raises(ConfigError, match="unreadable"):
        CallHomeState(path)


def _generation(ts: float) -> dict:
    return {"ts": ts, "model": "st-demo", "version": "1.0.0", "prompt_tokens": 1, "completion_tokens": 1,
            "prefill_ms": 1.0, "decode_ms": 1.0, "decode_tokens_per_s": 1.0, "peak_rss_bytes": 1,
            "expert_cache_hits": 0, "expert_cache_misses": 0, "prefetch_hits": 0, "bytes_read": 0}


def test_backlog_goes_in_capped_batches_oldest_first_each_row_once(tmp_path):
    telemetry = Telemetry(tmp_path / "telemetry.db", 10_000)
    try:
        for i in range(25):
            telemetry.record("generations", _generation(100.0 + i))
        for i in range(5):
            telemetry.record("updates", {"ts": 200.0 + i, "job_id": "j", "model": "st-demo", "state": "fetching"})
        acked: dict[str, float] = {}
        sent: list[tuple[str, float]] = []
        for _ in range(10):  # bounded: 30 rows in batches of at most 10
            batch = pending_rows(telemetry, acked, 10)
            if not batch:
                break
            assert sum(len(rows) for rows in batch.values()) <= 10
            for table, rows in batch.items():
                assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
                sent += [(table, r["ts"]) for r in rows]
                acked[table] = rows[-1]["ts"]  # what the server acks: the newest it stored
        assert [ts for table, ts in sent if table == "generations"] == [100.0 + i for i in range(25)]
        assert [ts for table, ts in sent if table == "updates"] == [200.0 + i for i in range(5)]
        assert len(sent) == 30
    finally:
        telemetry.close()


def test_a_batch_cut_inside_rows_of_one_ts_leaves_them_all_for_the_next(tmp_path):
    telemetry = Telemetry(tmp_path / "telemetry.db", 10_000)
    try:
        for ts in (1.0, 2.0, 3.0, 3.0, 3.0):
            telemetry.record("generations", _generation(ts))
        first = pending_rows(telemetry, {}, 4)["generations"]
        assert [r["ts"] for r in first] == [1.0, 2.0]
        assert [r["ts"] for r in pending_rows(telemetry, {"generations": 2.0}, 4)["generations"]] == [3.0] * 3
    finally:
        telemetry.close()


@pytest.mark.parametrize("section, message", [
    ({"server_url": "http://fleet:8444"}, "server_url"),
    ({"server_url": "https://fleet:8444/somewhere"}, "server_url"),
    ({"server_url": "https://fleet:8444", "poll_s": 0}, "poll_s"),
    ({"server_url": "https://fleet:8444", "jitter": 2}, "jitter"),
    ({"server_url": "https://fleet:8444", "max_report_rows": 5000}, "max_report_rows"),
    ({"server_url": "https://fleet:8444", "max_report_rows": 2.5}, "max_report_rows"),
    ({"server_url": "https://fleet:8444", "colour": "red"}, "unknown"),
    ("https://fleet:8444", "expected an object"),
])
def test_bad_call_home_sections_are_refused(section, message):
    with pytest.raises(ConfigError, match=message):
        CallHomeConfig.from_dict(section)


def test_call_home_section_round_trips_through_agent_json(tmp_path):
    d = {"name": "pc1", "url": "https://127.0.0.1:8443", "repository_url": "http://127.0.0.1:8080", "tags": {},
         "limits": {}, "call_home": {"server_url": "https://fleet:8444/", "poll_s": 0.5}}
    (tmp_path / "agent.json").write_text(json.dumps(d))
    config = load_config(tmp_path)
    assert config.call_home == CallHomeConfig("https://fleet:8444", poll_s=0.5)
    config.save()
    assert load_config(tmp_path) == config
    del d["call_home"]
    (tmp_path / "agent.json").write_text(json.dumps(d))
    assert load_config(tmp_path).call_home is None and "call_home" not in load_config(tmp_path).to_dict()
