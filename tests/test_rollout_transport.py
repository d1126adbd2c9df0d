"""The rollout controller's way to a device that calls home (`stctl.rollout_call_home.CallHomeDevice`):
fleet.db only, fed here through the fleet server's own report store (`accept_report`) with the
device's real enrollment certificate: assignments with stable ids (asked twice = one
instruction), the job of that assignment, the device's own health check, and a silent device
counted unreachable. `transport_for` picks push or call home per device."""
from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from manifests import job_states
from manifests.call_home import PollReport
from manifests.enrollment import Enrollment
from stctl.assignments import list_assignments
from stctl.call_home_store import accept_report
from stctl.device_client import DeviceError
from stctl.enroll import enroll_device
from stctl.fleetdb import open_fleet_db
from stctl.registry import enrolled
from stctl.rollout_call_home import CallHomeDevice, assignment_id
from stctl.rollout_transport import PushDevice, transport_for

pytest_plugins = ["release_fixtures"]

ROLLOUT = {"id": 7, "created_at": "2025-01-01T00:00:00+00:00"}


class Device:
    """An enrolled call-home device whose reports go through the server's store, seq by seq."""

    def __init__(self, ws, name: str, root: Path):
        out = root / f"{name}.enroll"
        enroll_device(ws, name, "https://127.0.0.1:8443", out, "http://127.0.0.1:8080",
                      server_url="https://127.0.0.1:8444")
        cert = x509.load_pem_x509_certificate(Enrollment.from_bytes(out.read_bytes()).device_cert_pem.encode())
        self.ws, self.name, self.seq = ws, name, 0
        self.der, self.serial = cert.public_bytes(Encoding.DER), f"{cert.serial_number:x}"

    def report(self, version: str = "1.0.0", previous: str | None = None, job: dict | None = None,
               health: list[dict] = ()) -> None:
        self.seq += 1
        body = {"device": self.name, "seq": self.seq, "sent_at": 1000.0 + self.seq,
                "active": {"model": "st-demo", "version": version},
                "previous": previous and {"model": "st-demo", "version": previous}, "job": job,
                "telemetry": {"health_checks": list(health)}}
        db = open_fleet_db(self.ws.fleet_db)
        try:
            accept_report(db, self.name, self.der, self.serial, PollReport.parse(body), 1.0)
        finally:
            db.close()


def health(ts: float, version: str, passed: bool = True) -> dict:
    return {"ts": ts, "model": "st-demo", "version": version, "passed": int(passed), "decode_tokens_per_s": 20.0,
            "peak_rss_bytes": 1000, "detail": "" if passed else "golden output differs"}


def job(assignment: str, state: str) -> dict:
    return {"id": "job1", "state": state, "model": "st-demo", "version": "2.0.0", "assignment_id": assignment}


@pytest.fixture
def cpc1(workspace, tmp_path) -> Device:
    return Device(workspace, "cpc1", tmp_path)


def assignments(ws) -> list[dict]:
    db = open_fleet_db(ws.fleet_db)
    try:
        return list_assignments(db)
    finally:
        db.close()


def test_a_device_that_has_not_called_home_is_unreachable_then_read_from_its_report(workspace, cpc1):
    device = CallHomeDevice(workspace, "cpc1", ROLLOUT)
    try:
        with pytest.raises(DeviceError) as e:
            device.status()
        assert e.value.transient and "has not called home" in str(e.value)
        cpc1.report("2.0.0", previous="1.0.0")
        assert device.status()["active"] == {"model": "st-demo", "version": "2.0.0"}
        assert device.status()["previous"] == {"model": "st-demo", "version": "1.0.0"}
    finally:
        device.close()


def test_asking_twice_or_after_a_restart_makes_one_assignment_with_a_stable_id(workspace, cpc1):
    device = CallHomeDevice(workspace, "cpc1", ROLLOUT)
    try:
        assert device.adopt_job("st-demo", "2.0.0", 0.0) is None  # nothing asked yet
        first = device.request_update("st-demo", "2.0.0", None, False)
        assert device.request_update("st-demo", "2.0.0", None, False) == first
    finally:
        device.close()
    resumed = CallHomeDevice(workspace, "cpc1", ROLLOUT)  # a controller after a restart
    try:
        assert resumed.adopt_job("st-demo", "2.0.0", 0.0) == first
    finally:
        resumed.close()
    assert [(a["id"], a["action"], a["version"]) for a in assignments(workspace)] == [(first, "update", "2.0.0")]
    assert first == assignment_id(ROLLOUT, "cpc1", "update")
    assert assignment_id({**ROLLOUT, "id": 8}, "cpc1", "update") != first  # another rollout: a new instruction


def test_the_job_is_the_one_the_device_reported_for_the_assignment(workspace, cpc1):
    device = CallHomeDevice(workspace, "cpc1", ROLLOUT)
    try:
        cpc1.report()
        ours = device.request_update("st-demo", "2.0.0", None, False)
        assert device.update(ours)["state"] == job_states.IDLE  # still requested
        cpc1.report(job=job("someone-else", job_states.FETCHING))
        assert device.update(ours)["state"] == job_states.IDLE
        cpc1.report(job=job(ours, job_states.FETCHING))
        assert device.update(ours)["state"] == job_states.FETCHING
        cpc1.report("2.0.0", previous="1.0.0", job=job(ours, job_states.ACTIVE))
        assert device.update(ours)["state"] == job_states.ACTIVE
    finally:
        device.close()


def test_the_health_check_is_the_devices_own_on_the_new_release_after_the_mark(workspace, cpc1):
    device = CallHomeDevice(workspace, "cpc1", ROLLOUT)
    try:
        cpc1.report(health=[health(500.0, "2.0.0")])  # an old check of 2.0.0: not this update's
        mark = device.mark(2.0)
        assert mark == 500.0
        assert not device.health_check("st-demo", "2.0.0", mark)["passed"]
        cpc1.report("2.0.0", previous="1.0.0", health=[health(600.0, "2.0.0", passed=False)])
        assert device.health_check("st-demo", "2.0.0", mark) == {"passed": False, "detail": "golden output differs"}
        cpc1.report("2.0.0", previous="1.0.0", health=[health(700.0, "2.0.0")])
        assert device.health_check("st-demo", "2.0.0", mark)["passed"]
    finally:
        device.close()


def test_rollback_is_an_assignment_asked_once_however_often_it_is_put(workspace, cpc1):
    device = CallHomeDevice(workspace, "cpc1", ROLLOUT)
    try:
        device.request_update("st-demo", "2.0.0", None, False)
        device.rollback("st-demo", "2.0.0")
        device.rollback("st-demo", "2.0.0")
    finally:
        device.close()
    assert [(a["id"], a["action"]) for a in assignments(workspace)] == [
        (assignment_id(ROLLOUT, "cpc1", "rollback"), "rollback")]


def test_transport_for_calls_home_only_for_a_device_with_a_fleet_server(workspace, cpc1, tmp_path):
    enroll_device(workspace, "pc1", "https://127.0.0.1:8443", tmp_path / "pc1.enroll", "http://127.0.0.1:8080")
    kinds = {}
    for row in enrolled(workspace):
        transport = transport_for(workspace, row, ROLLOUT)
        kinds[row["name"]] = type(transport)
        transport.close()
    assert kinds == {"cpc1": CallHomeDevice, "pc1": PushDevice}
