"""Rollout plans (`smallthinker-fleet` TOML): ordered waves of devices, soak times, telemetry
gates, and what to do when a gate fails. Examples: `manifests/examples/*.toml`.

    max_concurrent = 4             # devices updated at once (default 4)
    device_timeout = "10m"         # request -> final update state; unreachable longer = failed
    on_gate_failure = "rollback"   # "rollback": halt and roll back the wave's devices; "halt": halt only

    [gates]                        # defaults of every wave; a wave's own [waves.gates] overrides keys
    min_decode_tokens_per_s = 5.0  # each device, on the new version (omit: not checked)
    max_peak_rss_bytes = 2_000_000_000
    health_check = true            # each device runs a health check after the soak; it must pass
    max_failure_fraction = 0.0     # failed / finished devices of the rollout so far ...
    min_devices = 1                # ... judged once this many devices have finished

    [[waves]]
    name = "canary"
    tags = { line = "4" }          # devices whose tags hold all of these
    count = 1                      # at most this many of them
    soak = "30s"                   # wait after the wave's updates before judging its gates

    [[waves]]
    name = "rest"
    percent = 100                  # this share of the devices matching `tags` (all devices without tags)

Rules: a wave must select something (`tags`, `percent` and/or `count`); a device belongs to the
first wave that selects it, waves never share devices; `percent` is of the devices matching the
wave's tags, rounded up, and takes only devices no earlier wave took. Unknown keys, wrong types and
out-of-range values are refused with a message naming the field (`waves[1].percent: ...`); wave
names and tag keys are labels of `manifests.names`; a duration string matches whole (ASCII
digits, surrounding blanks allowed) and must be finite. Bytes in, `RolloutPlan` out; choosing
devices from a fleet (`select_devices`) is pure too.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, replace

from common.durations import parse_duration_s as common_duration_s
from manifests.errors import ManifestError
from manifests.names import LABEL_RULE, is_label

ON_FAILURE = ("rollback", "halt")
MAX_WAVES = 64
MAX_PLAN_BYTES = 256 * 1024


@dataclass(frozen=True)
class Gates:
    """What each wave must show before the rollout moves on."""

    min_decode_tokens_per_s: float | None = None
    max_peak_rss_bytes: int | None = None
    health_check: bool = True
    max_failure_fraction: float = 0.0
    min_devices: int = 1


@dataclass(frozen=True)
class Wave:
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    percent: float | None = None
    count: int | None = None
    soak_s: float = 0.0
    gates: Gates = Gates()
    max_concurrent: int = 4
    device_timeout_s: float = 600.0
    on_gate_failure: str = "rollback"


@dataclass(frozen=True)
class RolloutPlan:
    waves: tuple[Wave, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RolloutPlan:
        d = json.loads(text)
        return cls(tuple(Wave(**{**w, "gates": Gates(**w["gates"])}) for w in d["waves"]))


# ---- parsing -------------------------------------------------------------------------------------
def _number(value, where: str, *, integer: bool = False, minimum: float | None = None, above: float | None = None,
            maximum: float | None = None) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ManifestError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ManifestError(f"{where}: must be >= {minimum:g}, got {value!r}")
    if above is not None and value <= above:
        raise ManifestError(f"{where}: must be > {above:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ManifestError(f"{where}: must be <= {maximum:g}, got {value!r}")
    return value


def parse_duration_s(value, where: str, *, positive: bool = False) -> float:
    """Seconds as a number, or a string like `90s`, `10m`, `1.5h`, `250ms` (`common.durations`)."""
    return common_duration_s(value, where, positive=positive, error=ManifestError)


def _check_keys(d: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ManifestError(f"{where + '.' if where else ''}{unknown[0]}: unknown key; known: {', '.join(sorted(known))}")


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: expected a table, got {value!r}")
    return value


def _gates(d: dict, where: str, base: Gates) -> Gates:
    _check_keys(d, set(Gates.__dataclass_fields__), where)
    g = base
    if "min_decode_tokens_per_s" in d:
        g = replace(g, min_decode_tokens_per_s=float(_number(d["min_decode_tokens_per_s"],
                                                             f"{where}.min_decode_tokens_per_s", minimum=0)))
    if "max_peak_rss_bytes" in d:
        g = replace(g, max_peak_rss_bytes=int(_number(d["max_peak_rss_bytes"], f"{where}.max_peak_rss_bytes",
                                                      integer=True, above=0)))
    if "health_check" in d:
        if not isinstance(d["health_check"], bool):
            raise ManifestError(f"{where}.health_check: expected true or false, got {d['health_check']!r}")
        g = replace(g, health_check=d["health_check"])
    if "max_failure_fraction" in d:
        g = replace(g, max_failure_fraction=float(_number(d["max_failure_fraction"], f"{where}.max_failure_fraction",
                                                          minimum=0, maximum=1)))
    if "min_devices" in d:
        g = replace(g, min_devices=int(_number(d["min_devices"], f"{where}.min_devices", integer=True, minimum=1)))
    return g


_POLICY_KEYS = {"max_concurrent", "device_timeout", "on_gate_failure"}


def _policy(d: dict, where: str, base: dict) -> dict:
    out = dict(base)
    prefix = f"{where}." if where else ""
    if "max_concurrent" in d:
        out["max_concurrent"] = int(_number(d["max_concurrent"], f"{prefix}max_concurrent", integer=True,
                                            minimum=1, maximum=1024))
    if "device_timeout" in d:
        out["device_timeout_s"] = parse_duration_s(d["device_timeout"], f"{prefix}device_timeout", positive=True)
    if "on_gate_failure" in d:
        if d["on_gate_failure"] not in ON_FAILURE:
            raise ManifestError(f"{prefix}on_gate_failure: expected one of {', '.join(ON_FAILURE)}, "
                                f"got {d['on_gate_failure']!r}")
        out["on_gate_failure"] = d["on_gate_failure"]
    return out


def _wave(d, n: int, gates: Gates, policy: dict) -> Wave:
    where = f"waves[{n}]"
    d = _table(d, where)
    _check_keys(d, {"name", "tags", "percent", "count", "soak", "gates"} | _POLICY_KEYS, where)
    name = d.get("name", f"wave-{n + 1}")
    if not is_label(name):
        raise ManifestError(f"{where}.name: expected {LABEL_RULE}, got {name!r}")
    tags = _table(d.get("tags", {}), f"{where}.tags")
    for k, v in tags.items():
        if not is_label(k):
            raise ManifestError(f"{where}.tags: key {k!r}: expected {LABEL_RULE}")
        if not isinstance(v, str):
            raise ManifestError(f"{where}.tags.{k}: expected a string, got {v!r}")
    if "tags" in d and not tags:
        raise ManifestError(f"{where}.tags: empty; name at least one tag or drop the key")
    percent = d.get("percent")
    if percent is not None:
        percent = float(_number(percent, f"{where}.percent", above=0, maximum=100))
    count = d.get("count")
    if count is not None:
        count = int(_number(count, f"{where}.count", integer=True, minimum=1))
    if not tags and percent is None and count is None:
        raise ManifestError(f"{where}: selects no device; give tags, percent and/or count (percent = 100: all the rest)")
    soak = parse_duration_s(d.get("soak", 0), f"{where}.soak")
    wave_gates = _gates(_table(d["gates"], f"{where}.gates"), f"{where}.gates", gates) if "gates" in d else gates
    return Wave(name=name, tags=dict(tags), percent=percent, count=count, soak_s=soak, gates=wave_gates,
                **_policy(d, where, policy))


def parse_plan(data: bytes | str, where: str = "plan") -> RolloutPlan:
    """Parse and validate a TOML plan; every error names the bad field."""
    text = data.decode("utf-8", errors="strict") if isinstance(data, bytes) else data
    if len(text) > MAX_PLAN_BYTES:
        raise ManifestError(f"{where}: larger than {MAX_PLAN_BYTES} bytes")
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{where}: not valid TOML ({e})") from None
    _check_keys(d, {"gates", "waves"} | _POLICY_KEYS, "")
    gates = _gates(_table(d["gates"], "gates"), "gates", Gates()) if "gates" in d else Gates()
    policy = _policy(d, "", {"max_concurrent": 4, "device_timeout_s": 600.0, "on_gate_failure": "rollback"})
    waves = d.get("waves")
    if not isinstance(waves, list) or not waves:
        raise ManifestError("waves: expected at least one [[waves]] table")
    if len(waves) > MAX_WAVES:
        raise ManifestError(f"waves: at most {MAX_WAVES} waves")
    parsed = tuple(_wave(w, n, gates, policy) for n, w in enumerate(waves))
    names = [w.name for w in parsed]
    for n, name in enumerate(names):
        if name in names[:n]:
            raise ManifestError(f"waves[{n}].name: {name!r} is used by an earlier wave")
    return RolloutPlan(parsed)


# ---- choosing devices ---------------------------------------------------------------------------
def select_devices(plan: RolloutPlan, devices: dict[str, dict[str, str]]) -> list[list[str]]:
    """Device names per wave, from `devices` (name -> tags), deterministic (sorted by name).

    Refuses a wave that selects no device (all its candidates taken, or none match)."""
    taken: set[str] = set()
    out = []
    for n, wave in enumerate(plan.waves):
        matching = sorted(name for name, tags in devices.items()
                          if all(tags.get(k) == v for k, v in wave.tags.items()))
        limit = len(matching)
        if wave.percent is not None:
            limit = math.ceil(len(matching) * wave.percent / 100 - 1e-9)
        if wave.count is not None:
            limit = min(limit, wave.count)
        chosen = [name for name in matching if name not in taken][:limit]
        if not chosen:
            why = "no device matches its tags" if not matching else "every device it matches is in an earlier wave"
            raise ManifestError(f"waves[{n}] ({wave.name}): selects no device ({why})")
        taken.update(chosen)
        out.append(chosen)
    return out
