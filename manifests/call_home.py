"""What a device and the fleet server say to each other when the device calls home.

The device starts every exchange (factory PCs sit behind NAT and outbound-only firewalls): it
POSTs a `PollReport` to the server's `/v1/call-home/poll` over mTLS with its own device
certificate, and the answer is a `PollAnswer`. The server can only name a signed release in an
`Assignment`; the bytes still come from the TUF repository and are verified there.

Rules:
- a report names its device, and that name must be the certificate's (the server checks); `seq`
  grows by one or more with every report a device sends (a report whose `seq` is not above the
  last one accepted is a replay and is refused); telemetry rows travel in the report, at most
  `MAX_ROWS_PER_REPORT`, each restricted to its table's columns (`manifests.telemetry`), and the
  answer's `acked` names, per table, the newest `ts` the server stored, so the device drops what
  is safe and resends the rest (rows are keyed, a resent row is stored once);
- an assignment is the release the device should run (`update`) or an instruction to go back
  (`rollback`), with when (`window`: daily local start and end, minutes after midnight, in the
  device's own `tz`; None: at once), whether to download at once and install later
  (`download_now`), and how fast (`max_bytes_per_s`); its `id` is stable, so a device that
  acted on it once never acts on it again;
- every field is checked when parsed: unknown keys, wrong types, oversized lists and
  out-of-range numbers raise ManifestError naming the field.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from manifests.errors import ManifestError
from manifests.names import check_name
from manifests.telemetry import TELEMETRY_TABLES, telemetry_row

ACTIONS = ("update", "rollback")
MAX_ROWS_PER_REPORT = 2000
MIN_BYTES_PER_S = 1024  # the smallest download cap a job takes
MAX_REPORT_BYTES = 4 * 2**20
MIN_POLL_S, MAX_POLL_S = 1.0, 86400.0
MINUTES_PER_DAY = 24 * 60


def _keys(d: Any, known: set[str], required: set[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object")
    unknown = sorted(set(d) - known)
    if unknown:
        raise ManifestError(f"{where}.{unknown[0]}: unknown key")
    missing = sorted(required - set(d))
    if missing:
        raise ManifestError(f"{where}.{missing[0]}: required")
    return d


def _typed(value, kind, where: str, *, optional: bool = False):
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ManifestError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return float(value) if kind is float else value


@dataclass(frozen=True)
class Release:
    model: str
    version: str

    @classmethod
    def parse(cls, d: Any, where: str) -> Release | None:
        if d is None:
            return None
        _keys(d, {"model", "version"}, {"model", "version"}, where)
        return cls(check_name(_typed(d["model"], str, f"{where}.model"), f"{where}.model"),
                   _typed(d["version"], str, f"{where}.version")[:64])


@dataclass(frozen=True)
class JobReport:
    """The device's update job as it stands (the states of `manifests.job_states`)."""
    id: str
    state: str
    model: str
    version: str
    assignment_id: str | None = None
    bytes_downloaded: int = 0
    bytes_total: int = 0
    detail: str = ""

    @classmethod
    def parse(cls, d: Any, where: str) -> JobReport | None:
        if d is None:
            return None
        _keys(d, set(cls.__dataclass_fields__), {"id", "state", "model", "version"}, where)
        return cls(id=_typed(d["id"], str, f"{where}.id")[:64], state=_typed(d["state"], str, f"{where}.state")[:32],
                   model=_typed(d["model"], str, f"{where}.model")[:64],
                   version=_typed(d["version"], str, f"{where}.version")[:64],
                   assignment_id=_typed(d.get("assignment_id"), str, f"{where}.assignment_id", optional=True),
                   bytes_downloaded=max(0, _typed(d.get("bytes_downloaded", 0), int, f"{where}.bytes_downloaded")),
                   bytes_total=max(0, _typed(d.get("bytes_total", 0), int, f"{where}.bytes_total")),
                   detail=_typed(d.get("detail", ""), str, f"{where}.detail")[:500])


@dataclass(frozen=True)
class PollReport:
    device: str
    seq: int
    sent_at: float
    active: Release | None = None
    previous: Release | None = None
    probation: bool = False
    job: JobReport | None = None
    telemetry: dict[str, list[dict]] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: Any) -> PollReport:
        _keys(d, set(cls.__dataclass_fields__), {"device", "seq", "sent_at"}, "report")
        seq = _typed(d["seq"], int, "report.seq")
        if not 0 <= seq < 2**63:
            raise ManifestError("report.seq: must be within 0 .. 2**63 - 1")
        telemetry = _typed(d.get("telemetry", {}), dict, "report.telemetry")
        rows: dict[str, list[dict]] = {}
        count = 0
        for table, items in telemetry.items():
            if table not in TELEMETRY_TABLES:
                raise ManifestError(f"report.telemetry.{table}: unknown table")
            items = _typed(items, list, f"report.telemetry.{table}")
            count += len(items)
            if count > MAX_ROWS_PER_REPORT:
                raise ManifestError(f"report.telemetry: more than {MAX_ROWS_PER_REPORT} rows in one report")
            parsed = []
            for i, row in enumerate(items):
                where = f"report.telemetry.{table}[{i}]"
                _typed(row, dict, where)
                _typed(row.get("ts"), float, f"{where}.ts")
                try:
                    parsed.append(telemetry_row(table, row))
                except (TypeError, ValueError):
                    raise ManifestError(f"{where}: a value does not fit its column") from None
            rows[table] = parsed
        return cls(device=check_name(_typed(d["device"], str, "report.device"), "report.device"), seq=seq,
                   sent_at=_typed(d["sent_at"], float, "report.sent_at"),
                   active=Release.parse(d.get("active"), "report.active"),
                   previous=Release.parse(d.get("previous"), "report.previous"),
                   probation=_typed(d.get("probation", False), bool, "report.probation"),
                   job=JobReport.parse(d.get("job"), "report.job"), telemetry=rows)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """A daily maintenance window in the device's local time: [start, end) minutes after midnight
    (end < start wraps past midnight)."""
    start_minute: int
    end_minute: int
    tz: str

    @classmethod
    def parse(cls, d: Any, where: str) -> Window | None:
        if d is None:
            return None
        _keys(d, {"start_minute", "end_minute", "tz"}, {"start_minute", "end_minute", "tz"}, where)
        start = _typed(d["start_minute"], int, f"{where}.start_minute")
        end = _typed(d["end_minute"], int, f"{where}.end_minute")
        if not (0 <= start < MINUTES_PER_DAY and 0 <= end < MINUTES_PER_DAY) or start == end:
            raise ManifestError(f"{where}: start_minute and end_minute must differ, each in 0 .. {MINUTES_PER_DAY - 1}")
        return cls(start, end, _typed(d["tz"], str, f"{where}.tz")[:64])

    def contains(self, minute_of_day: int) -> bool:
        """Whether a local time (minutes after midnight) lies inside the window."""
        if self.start_minute < self.end_minute:
            return self.start_minute <= minute_of_day < self.end_minute
        return minute_of_day >= self.start_minute or minute_of_day < self.end_minute


@dataclass(frozen=True)
class Assignment:
    id: str
    action: str
    model: str
    version: str
    repository_url: str | None = None
    allow_downgrade: bool = False
    window: Window | None = None
    download_now: bool = True
    max_bytes_per_s: int | None = None

    @classmethod
    def parse(cls, d: Any, where: str = "assignment") -> Assignment | None:
        if d is None:
            return None
        _keys(d, set(cls.__dataclass_fields__), {"id", "action", "model", "version"}, where)
        action = _typed(d["action"], str, f"{where}.action")
        if action not in ACTIONS:
            raise ManifestError(f"{where}.action: expected one of {', '.join(ACTIONS)}")
        cap = _typed(d.get("max_bytes_per_s"), int, f"{where}.max_bytes_per_s", optional=True)
        if cap is not None and cap < MIN_BYTES_PER_S:
            raise ManifestError(f"{where}.max_bytes_per_s: at least {MIN_BYTES_PER_S}")
        return cls(id=_typed(d["id"], str, f"{where}.id")[:64], action=action,
                   model=check_name(_typed(d["model"], str, f"{where}.model"), f"{where}.model"),
                   version=_typed(d["version"], str, f"{where}.version")[:64],
                   repository_url=_typed(d.get("repository_url"), str, f"{where}.repository_url", optional=True),
                   allow_downgrade=_typed(d.get("allow_downgrade", False), bool, f"{where}.allow_downgrade"),
                   window=Window.parse(d.get("window"), f"{where}.window"),
                   download_now=_typed(d.get("download_now", True), bool, f"{where}.download_now"),
                   max_bytes_per_s=cap)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PollAnswer:
    poll_after_s: float
    assignment: Assignment | None = None
    acked: dict[str, float] = field(default_factory=dict)  # table -> newest ts stored

    @classmethod
    def parse(cls, d: Any) -> PollAnswer:
        _keys(d, set(cls.__dataclass_fields__), {"poll_after_s"}, "answer")
        poll = _typed(d["poll_after_s"], float, "answer.poll_after_s")
        if not MIN_POLL_S <= poll <= MAX_POLL_S:
            raise ManifestError(f"answer.poll_after_s: expected {MIN_POLL_S:g} .. {MAX_POLL_S:g} seconds")
        acked = _typed(d.get("acked", {}), dict, "answer.acked")
        for table, ts in acked.items():
            if table not in TELEMETRY_TABLES:
                raise ManifestError(f"answer.acked.{table}: unknown table")
            _typed(ts, float, f"answer.acked.{table}")
        return cls(poll, Assignment.parse(d.get("assignment"), "answer.assignment"),
                   {k: float(v) for k, v in acked.items()})

    def to_dict(self) -> dict:
        return asdict(self)
