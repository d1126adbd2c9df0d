"""What the fleet server keeps of the devices that call home, in fleet.db (migrations 27-29).

Rules:
- a report is accepted whole or not at all: in one write transaction (`BEGIN IMMEDIATE`, so two
  reports of one device are taken one after the other) the server checks that the device is
  enrolled with exactly the certificate that sent it (`devices.cert_sha256`), that the
  certificate is not revoked (`certificates`), and that `seq` is above the last accepted for
  that certificate (`call_home`; a re-enrolled device starts again), then stores the status in
  `device_status` (the row `stctl.registry` writes, so `stctl device list` shows it), the job in
  `device_jobs` (one row per device, the latest) and the telemetry rows through
  `stctl.telemetry_pull.insert_rows` (the same key as a pulled row: a row is stored once however
  often it arrives, and by whichever path);
- every refusal is recorded in `call_home_refusals` (who presented which name, the status, why),
  in a transaction of its own; the table keeps the newest `max_refusals` rows, so a device that
  floods the server with bad reports cannot fill the disk;
- the answer's `acked` is the newest `ts` stored per telemetry table for the device (after this
  report), its assignment the one `stctl.assignments` keeps.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from datetime import datetime, timezone

import sqlite_utils

from manifests.call_home import PollAnswer, PollReport
from manifests.telemetry import TELEMETRY_TABLES
from stctl.assignments import get_assignment
from stctl.errors import StctlError
from stctl.registry import status_row, write_transaction
from stctl.telemetry_pull import insert_rows, newest_ts


class ReportRefused(StctlError):
    """A report the server does not accept: `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_refusal(db: sqlite_utils.Database, peer: str | None, device: str | None, status: int, reason: str,
                   max_refusals: int) -> None:
    """Record one refused report (`peer`: the certificate's name, `device`: the name the report gave)."""
    with write_transaction(db):
        db["call_home_refusals"].insert({"at": _now(), "peer": peer, "device": device, "status": status,
                                         "reason": reason[:500]})
        db.execute("DELETE FROM call_home_refusals WHERE id <= (SELECT MAX(id) FROM call_home_refusals) - ?",
                    [max_refusals])


def revoked(db: sqlite_utils.Database, serial: str) -> bool:
    """Whether fleet.db marks the certificate with this serial (hex) revoked."""
    return bool(db["certificates"].count_where("serial = ? AND revoked_at IS NOT NULL", [serial]))


def _check_device(db: sqlite_utils.Database, name: str, cert_der: bytes, serial: str) -> str:
    """The certificate's sha256 if it is `name`'s current enrolled, unrevoked certificate."""
    sha256 = hashlib.sha256(cert_der).hexdigest()
    enrolled = list(db["devices"].rows_where("name = ?", [name]))
    if not enrolled:
        raise ReportRefused(403, f"device {name!r} is not enrolled", "forbidden")
    if enrolled[0]["cert_sha256"] != sha256:
        raise ReportRefused(403, f"this certificate is not device {name!r}'s current certificate", "forbidden")
    if revoked(db, serial):
        raise ReportRefused(403, f"device {name!r}'s certificate is revoked", "forbidden")
    return sha256


def _status(report: PollReport) -> dict:
    """The report in the shape of a device's `GET /v1/status` (what `status_row` reads)."""
    return {"active": report.active and asdict(report.active), "previous": report.previous and asdict(report.previous),
            "probation": report.probation, "update": {"state": report.job.state} if report.job else None}


def accept_report(db: sqlite_utils.Database, cert_name: str, cert_der: bytes, serial: str, report: PollReport,
                  poll_after_s: float) -> PollAnswer:
    """Store `report`, sent with the device certificate `cert_der` named `cert_name`; the answer.
    ReportRefused (nothing stored) if it is not the device's to send, or a replay."""
    if report.device != cert_name:
        raise ReportRefused(403, f"the report names device {report.device!r} but the certificate is {cert_name!r}'s",
                            "forbidden")
    with write_transaction(db):
        sha256 = _check_device(db, cert_name, cert_der, serial)
        last = list(db["call_home"].rows_where("device = ? AND cert_sha256 = ?", [cert_name, sha256]))
        if last and report.seq <= last[0]["seq"]:
            raise ReportRefused(409, f"seq {report.seq} is not above {last[0]['seq']}, the last accepted "
                                     "(a replayed report)", "replay")
        now = _now()
        db["call_home"].upsert({"device": cert_name, "cert_sha256": sha256, "seq": report.seq, "polled_at": now},
                               pk="device")
        db["device_status"].upsert({**status_row(cert_name, _status(report)), "detail": "called home"}, pk="name")
        if report.job is not None:
            db["device_jobs"].upsert({"device": cert_name, **asdict(report.job), "reported_at": now}, pk="device")
        for table, rows in report.telemetry.items():
            insert_rows(db, table, cert_name, rows)
        acked = {t: ts for t in TELEMETRY_TABLES if (ts := newest_ts(db, t, cert_name)) is not None}
        return PollAnswer(poll_after_s, get_assignment(db, cert_name), acked)
