"""The call-home formats (`manifests.call_home`): what parses, what round-trips, what is refused."""
from __future__ import annotations

import re

import pytest

from manifests import ManifestError
from manifests.call_home import MAX_ROWS_PER_REPORT, Assignment, PollAnswer, PollReport, Window

REPORT = {"device": "pc1", "seq": 7, "sent_at": 1796700000.5, "active": {"model": "st-demo", "version": "1.0.0"},
          "previous": None, "probation": False,
          "job": {"id": "a" * 32, "state": "fetching", "model": "st-demo", "version": "2.0.0",
                  "assignment_id": "r1-pc1", "bytes_downloaded": 10, "bytes_total": 100},
          "telemetry": {"updates": [{"ts": 1796700000.0, "job_id": "a" * 32, "state": "fetching", "extra": 1}]}}
ASSIGNMENT = {"id": "r1-pc1", "action": "update", "model": "st-demo", "version": "2.0.0",
              "repository_url": "https://repo.plant:8080", "window": {"start_minute": 1320, "end_minute": 240,
                                                                      "tz": "Europe/Berlin"},
              "download_now": True, "max_bytes_per_s": 1_000_000}


def test_a_report_parses_and_round_trips():
    report = PollReport.parse(REPORT)
    assert report.job.assignment_id == "r1-pc1" and report.active.version == "1.0.0"
    assert "extra" not in report.telemetry["updates"][0]  # rows keep only their table's columns
    assert PollReport.parse(report.to_dict()) == report


def test_an_answer_with_an_assignment_round_trips():
    answer = PollAnswer.parse({"poll_after_s": 30, "assignment": ASSIGNMENT, "acked": {"updates": 1796700000.0}})
    assert answer.assignment.window.tz == "Europe/Berlin" and answer.poll_after_s == 30.0
    assert PollAnswer.parse(answer.to_dict()) == answer


@pytest.mark.parametrize("minute,inside", [(1319, False), (1320, True), (0, True), (239, True), (240, False)])
def test_a_window_past_midnight(minute, inside):
    assert Window(1320, 240, "UTC").contains(minute) is inside


@pytest.mark.parametrize("change,mention", [
    ({"device": "../etc"}, "report.device"), ({"seq": -1}, "report.seq"), ({"seq": True}, "report.seq"),
    ({"sent_at": float("nan")}, "report.sent_at"), ({"extra": 1}, "report.extra: unknown key"),
    ({"telemetry": {"sqlite_master": []}}, "unknown table"),
    ({"telemetry": {"updates": [{"state": "x"}]}}, "updates[0].ts"),
    ({"telemetry": {"updates": [{"ts": 1.0}] * (MAX_ROWS_PER_REPORT + 1)}}, "more than"),
    ({"job": {"id": "x", "state": "active"}}, "report.job.model: required"),
])
def test_malformed_reports_are_refused_naming_the_field(change, mention):
    with pytest.raises(ManifestError, match=re.escape(mention)):
        PollReport.parse({**REPORT, **change})


@pytest.mark.parametrize("change,mention", [
    ({"action": "format-disk"}, "assignment.action"), ({"max_bytes_per_s": 10}, "at least 1024"),
    ({"window": {"start_minute": 60, "end_minute": 60, "tz": "UTC"}}, "must differ"),
    ({"window": {"start_minute": 1440, "end_minute": 60, "tz": "UTC"}}, "must differ"),
    ({"download_now": "yes"}, "download_now"),
])
def test_malformed_assignments_are_refused(change, mention):
    with pytest.raises(ManifestError, match=mention):
        Assignment.parse({**ASSIGNMENT, **change})


def test_an_answer_must_ask_for_a_sane_poll_interval():
    for bad in (0, 0.5, 10**6, "30"):
        with pytest.raises(ManifestError, match="poll_after_s"):
            PollAnswer.parse({"poll_after_s": bad})
