"""The fleet server's device side (`POST /v1/call-home/poll`) and its assignments API, over real TLS
with real fleet certificates: what a device reports is stored once, what it may not do is
refused and recorded, and a device only ever gets its own assignment."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests

from manifests.call_home import PollAnswer
from manifests.enrollment import Enrollment
from stctl.enroll import enroll_device
from stctl.fleet_server import ServerConfig, bind, build_server
from stctl.fleetdb import open_fleet_db
from stctl.revocation import revoke_device
from stctl.telemetry_pull import store_rows

pytest_plugins = ["release_fixtures"]

MAX_REPORT = 16 * 1024  # small, so an oversized body fits in the socket buffers


class Fleet:
    """A workspace with enrolled devices and its fleet server running on 127.0.0.1."""

    def __init__(self, ws, root: Path):
        self.ws, self.root = ws, root
        self.server = build_server(ws, "127.0.0.1", config=ServerConfig(max_report_bytes=MAX_REPORT))
        self.sock = bind("127.0.0.1", 0)
        self.base = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):  # bounded: the server starts in well under the 20 s this allows
            if self.server.started:
                break
            time.sleep(0.1)
        assert self.server.started

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def enroll(self, name: str, server_url: str | None = None) -> tuple[str, str]:
        out = self.root / f"{name}.enrollment.json"
        enroll_device(self.ws, name, "https://127.0.0.1:8443", out, "http://127.0.0.1:8080", server_url=server_url)
        e = Enrollment.from_bytes(out.read_bytes())
        (self.root / f"{name}.crt").write_text(e.device_cert_pem)
        (self.root / f"{name}.key").write_text(e.device_key_pem)
        return str(self.root / f"{name}.crt"), str(self.root / f"{name}.key")

    def operator(self) -> tuple[str, str]:
        return str(self.ws.pki_dir / "operator.crt"), str(self.ws.pki_dir / "operator.key")

    def session(self, cert: tuple[str, str] | None) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.ws.pki_dir / "ca.crt")
        s.cert = cert
        return s

    def poll(self, cert, report: dict | bytes) -> requests.Response:
        body = report if isinstance(report, bytes) else json.dumps(report).encode()
        return self.session(cert).post(f"{self.base}/v1/call-home/poll", data=body,
                                       headers={"Content-Type": "application/json"}, timeout=30)

    def rows(self, sql: str, args=()) -> list[tuple]:
        db = open_fleet_db(self.ws.fleet_db)
        try:
            return list(db.execute(sql, args))
        finally:
            db.close()

    def count(self, table: str) -> int:
        return self.rows(f"SELECT COUNT(*) FROM [{table}]")[0][0]


@pytest.fixture
def fleet(workspace, tmp_path):
    f = Fleet(workspace, tmp_path)
    yield f
    f.stop()


GEN = {"ts": 1000.5, "model": "st-demo", "version": "1.0.0", "prompt_tokens": 5, "completion_tokens": 7,
       "prefill_ms": 1.0, "decode_ms": 2.0, "decode_tokens_per_s": 31.5, "peak_rss_bytes": 123,
       "expert_cache_hits": 1, "expert_cache_misses": 2, "prefetch_hits": 0, "bytes_read": 9}
HEALTH = {"ts": 1001.0, "model": "st-demo", "version": "1.0.0", "passed": 1, "decode_tokens_per_s": 30.0,
          "peak_rss_bytes": 100, "detail": ""}


def report(device: str, seq: int, **extra) -> dict:
    return {"device": device, "seq": seq, "sent_at": 1002.0, "active": {"model": "st-demo", "version": "1.0.0"},
            **extra}


def assert_envelope(r: requests.Response, status: int, kind: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert kind is None or err["type"] == kind, err
    return err


def refusals(fleet: Fleet) -> list[tuple]:
    return fleet.rows("SELECT peer, device, status FROM call_home_refusals ORDER BY id")


def test_poll_stores_status_job_and_rows_and_answers_assignment_and_acks(fleet):
    pc1 = fleet.enroll("pc1")
    put = fleet.session(fleet.operator()).put(f"{fleet.base}/v1/assignments/pc1", json={
        "model": "st-demo", "version": "2.0.0", "window": {"start_minute": 1320, "end_minute": 240,
                                                           "tz": "Europe/Berlin"}, "max_bytes_per_s": 65536},
        timeout=30)
    assert put.status_code == 200, put.text
    job = {"id": "j1", "state": "downloading", "model": "st-demo", "version": "2.0.0",
           "assignment_id": put.json()["id"], "bytes_downloaded": 10, "bytes_total": 100}
    r = fleet.poll(pc1, report("pc1", 1, job=job, telemetry={"generations": [GEN], "health_checks": [HEALTH]}))
    assert r.status_code == 200, r.text
    answer = PollAnswer.parse(r.json())
    assert answer.poll_after_s == 60.0
    assert answer.acked == {"generations": 1000.5, "health_checks": 1001.0}
    assert answer.assignment.id == put.json()["id"] and answer.assignment.version == "2.0.0"
    assert answer.assignment.window.tz == "Europe/Berlin" and answer.assignment.max_bytes_per_s == 65536
    assert fleet.rows("SELECT reachable, model, version FROM device_status WHERE name = 'pc1'") == [(1, "st-demo", "1.0.0")]
    assert fleet.rows("SELECT id, state, bytes_downloaded FROM device_jobs WHERE device = 'pc1'") == [("j1", "downloading", 10)]
    assert fleet.rows("SELECT device, decode_tokens_per_s FROM generations") == [("pc1", 31.5)]
    assert refusals(fleet) == []


def test_rows_reported_twice_or_also_pulled_are_stored_once(fleet):
    pc1 = fleet.enroll("pc1")
    assert fleet.poll(pc1, report("pc1", 1, telemetry={"generations": [GEN]})).status_code == 200
    second = fleet.poll(pc1, report("pc1", 2, telemetry={"generations": [GEN, {**GEN, "ts": 1003.0}]}))
    assert second.status_code == 200 and second.json()["acked"] == {"generations": 1003.0}
    db = open_fleet_db(fleet.ws.fleet_db)
    try:
        assert store_rows(db, "generations", "pc1", [GEN]) == 0  # the same row pulled: the same key
    finally:
        db.close()
    assert fleet.count("generations") == 2


def test_forged_device_name_is_refused_and_recorded(fleet):
    pc1 = fleet.enroll("pc1")
    fleet.enroll("pc2")
    assert_envelope(fleet.poll(pc1, report("pc2", 1, telemetry={"generations": [GEN]})), 403, "forbidden")
    assert refusals(fleet) == [("pc1", "pc2", 403)]
    assert fleet.count("generations") == 0 and fleet.count("device_status") == 0


def test_operator_certificate_cannot_poll_and_no_certificate_is_401(fleet):
    fleet.enroll("pc1")
    assert_envelope(fleet.poll(fleet.operator(), report("pc1", 1)), 403, "forbidden")
    assert_envelope(fleet.poll(None, report("pc1", 1)), 401, "unauthorized")
    assert [r[2] for r in refusals(fleet)] == [403, 401]
    assert fleet.count("device_status") == 0


def test_replayed_seq_is_refused_and_recorded(fleet):
    pc1 = fleet.enroll("pc1")
    assert fleet.poll(pc1, report("pc1", 5)).status_code == 200
    for seq in (5, 4):
        err = assert_envelope(fleet.poll(pc1, report("pc1", seq, telemetry={"generations": [GEN]})), 409, "replay")
        assert "seq" in err["message"]
    assert refusals(fleet) == [("pc1", "pc1", 409), ("pc1", "pc1", 409)]
    assert fleet.count("generations") == 0
    assert fleet.poll(pc1, report("pc1", 6)).status_code == 200


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (json.dumps({**report("pc1", 1), "surprise": 1}).encode(), 400, "surprise"),
    (json.dumps(report("pc1", 1, telemetry={"generations": [{**GEN, "ts": "soon"}]})).encode(), 400,
     "telemetry.generations[0].ts"),
    (b'{"device": "pc1", "seq": 1, "sent_at": 1.0, "job": {"id": "\\ud800"}}', 400, None),
    (json.dumps(report("pc1", 1, telemetry={"generations": [GEN] * 60})).encode(), 413, None),
])
def test_malformed_or_oversized_reports_are_refused_and_nothing_is_stored(fleet, body, status, param):
    pc1 = fleet.enroll("pc1")
    assert len(body) < MAX_REPORT or status == 413
    err = assert_envelope(fleet.poll(pc1, body), status)
    assert param is None or err["param"] == param, err
    assert fleet.count("device_status") == 0 and fleet.count("generations") == 0 and fleet.count("call_home") == 0
    assert [r[2] for r in refusals(fleet)] == [status]


def test_revoked_device_certificate_is_refused(fleet):
    pc1 = fleet.enroll("pc1")
    assert fleet.poll(pc1, report("pc1", 1)).status_code == 200
    revoke_device(fleet.ws, "pc1")
    assert "revoked" in assert_envelope(fleet.poll(pc1, report("pc1", 2)), 403, "forbidden")["message"]
    assert refusals(fleet) == [("pc1", "pc1", 403)]


def test_a_device_gets_only_its_own_assignment(fleet):
    pc1, pc2 = fleet.enroll("pc1"), fleet.enroll("pc2")
    op = fleet.session(fleet.operator())
    assert op.put(f"{fleet.base}/v1/assignments/pc2", json={"model": "st-demo", "version": "2.0.0"},
                  timeout=30).status_code == 200
    assert fleet.poll(pc1, report("pc1", 1)).json()["assignment"] is None
    assert fleet.poll(pc2, report("pc2", 1)).json()["assignment"]["version"] == "2.0.0"


def test_assignments_api_is_for_the_operator_only(fleet):
    pc1 = fleet.enroll("pc1")
    url = f"{fleet.base}/v1/assignments/pc1"
    body = {"model": "st-demo", "version": "2.0.0"}
    device, nobody, op = fleet.session(pc1), fleet.session(None), fleet.session(fleet.operator())
    assert_envelope(device.put(url, json=body, timeout=30), 403, "forbidden")
    assert_envelope(device.get(f"{fleet.base}/v1/assignments", timeout=30), 403, "forbidden")
    assert_envelope(device.delete(url, timeout=30), 403, "forbidden")
    assert_envelope(nobody.put(url, json=body, timeout=30), 401, "unauthorized")
    assert fleet.count("assignments") == 0

    first = op.put(url, json=body, timeout=30).json()
    assert op.put(url, json=body, timeout=30).json()["id"] == first["id"]  # a retry is the same instruction
    assert op.put(url, json={**body, "download_now": False}, timeout=30).json()["id"] != first["id"]
    listed = op.get(f"{fleet.base}/v1/assignments", timeout=30).json()["assignments"]
    assert [(a["device"], a["version"], a["download_now"]) for a in listed] == [("pc1", "2.0.0", False)]
    assert op.delete(url, timeout=30).status_code == 200
    assert_envelope(op.delete(url, timeout=30), 404, "not_found")


@pytest.mark.parametrize("path, body, status, param", [
    ("pc1", {"model": "st-demo", "version": "9.9.9"}, 400, "version"),
    ("pc1", {"model": "st-demo", "version": "2.0.0", "action": "explode"}, 400, "action"),
    ("pc1", {"model": "st-demo", "version": "2.0.0", "colour": "red"}, 400, "colour"),
    ("pc1", {"model": "st-demo", "version": "2.0.0", "max_bytes_per_s": 10}, 400, "max_bytes_per_s"),
    ("pc1", {"model": "st-demo", "version": "2.0.0",
             "window": {"start_minute": 0, "end_minute": 60, "tz": "Mars/Olympus"}}, 400, "window.tz"),
    ("ghost", {"model": "st-demo", "version": "2.0.0"}, 404, "device"),
])
def test_bad_assignments_are_refused(fleet, path, body, status, param):
    fleet.enroll("pc1")
    r = fleet.session(fleet.operator()).put(f"{fleet.base}/v1/assignments/{path}", json=body, timeout=30)
    assert assert_envelope(r, status)["param"] == param
    assert fleet.count("assignments") == 0


def test_the_fleet_table_shows_a_call_home_device_from_its_reports_without_probing_it(fleet):
    from datetime import datetime, timedelta, timezone

    from stctl.registry import CALL_HOME_SILENT_S, called_home, fleet_table

    pc1 = fleet.enroll("pc1", server_url=fleet.base)
    fleet.enroll("pc2", server_url=fleet.base)  # never calls home
    assert fleet.poll(pc1, report("pc1", 1)).status_code == 200
    rows = {r["name"]: r for r in fleet_table(fleet.ws, probe_devices=True)}  # nothing listens at their URLs
    assert (rows["pc1"]["reachable"], rows["pc1"]["version"]) == (True, "1.0.0"), rows["pc1"]
    assert not rows["pc2"]["reachable"]
    row = fleet.rows("SELECT checked_at FROM device_status WHERE name = 'pc1'")[0]
    later = datetime.fromisoformat(row[0]) + timedelta(seconds=CALL_HOME_SILENT_S + 1)
    silent = called_home("pc1", {"name": "pc1", "reachable": 1, "checked_at": row[0]}, now=later)
    assert silent["reachable"] == 0 and "silent" in silent["detail"]
    assert called_home("pc1", {"name": "pc1", "reachable": 1, "checked_at": row[0]},
                       now=datetime.now(timezone.utc))["reachable"] == 1
