"""The health check of a release folder, with no network: what must hold before (and after) it serves.

Rule: a release passes only when every file re-hashes to its manifest entry, the engine loads
within the device's memory budget, the manifest's golden outputs are reproduced within its
tolerance, and decode tokens/s and peak RSS meet the manifest's thresholds (`model.health`
checks the last two). Every check writes one `health_checks` row.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from agent.config import DeviceConfig
from agent.serving import SerializedEngine, close_engine, load_engine
from agent.telemetry import Telemetry
from model import Engine
from model.errors import ModelError
from model.health import check_golden
from model.package import verify_package


@dataclass(frozen=True)
class HealthResult:
    model: str
    version: str
    passed: bool
    detail: str
    decode_tokens_per_s: float = 0.0
    peak_rss_bytes: int = 0
    max_logit_error: float | None = None
    files_checked: int = 0
    heldout_loss: float | None = None  # the package's loss on its manifest's held-out rows, measured here

    def to_dict(self) -> dict:
        return asdict(self)


def check_release(folder: Path, config: DeviceConfig, telemetry: Telemetry | None = None,
                  keep_engine: bool = False) -> tuple[HealthResult, Engine | None]:
    """Check the release in `folder`; returns the result and, if it passed and `keep_engine`, the
    loaded engine (so activation serves the very engine that passed)."""
    model, version = folder.parent.name, folder.name
    try:
        manifest = verify_package(folder)
    except ModelError as e:
        return _done(HealthResult(model, version, False, f"integrity: {e}"), telemetry), None
    files = len(manifest.shards) + (1 if manifest.tokenizer.file else 0)
    if manifest.health is None:
        return _done(HealthResult(model, version, False, "the manifest carries no golden outputs", files_checked=files),
                     telemetry), None
    try:
        engine = load_engine(folder, config)
    except ModelError as e:
        return _done(HealthResult(model, version, False, f"load: {e}", files_checked=files), telemetry), None
    try:
        report = check_golden(SerializedEngine(engine), manifest.health)
    except ModelError as e:
        close_engine(engine)
        return _done(HealthResult(model, version, False, f"golden check: {e}", files_checked=files), telemetry), None
    result = HealthResult(model, version, report.passed, report.detail, report.decode_tokens_per_s,
                          report.peak_rss_bytes, report.max_logit_error, files, report.heldout_loss)
    if not (result.passed and keep_engine):
        close_engine(engine)
        engine = None
    return _done(result, telemetry), engine


def _done(result: HealthResult, telemetry: Telemetry | None) -> HealthResult:
    if telemetry is not None:
        telemetry.record("health_checks", result.to_dict())
    return result
