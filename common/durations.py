"""The one duration grammar of the project: rollout plans, `stctl.toml` expiries, configs.

Rule: a duration is a number of seconds (int or float), or a string of one number and an
optional unit, `ms`, `s`, `m`, `h` or `d` (`250ms`, `90s`, `10m`, `1.5h`, `7d`; no unit:
seconds), whitespace around allowed, ASCII digits only; finite and >= 0 (> 0 when `positive`).
An error names `where` and says what was expected, raised as the caller's own error class.
"""
from __future__ import annotations

import math
import re

from common.errors import DurationError

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*", re.ASCII)
_UNIT_S = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration_s(value, where: str, *, positive: bool = False,
                     error: type[Exception] = DurationError) -> float:
    """Seconds of `value` (see the module's rule); `error(message)` when it is not a duration."""
    if isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if not m:
            raise error(f"{where}: expected seconds or a duration like '30s', '10m', '1h', '7d', got {value!r}")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise error(f"{where}: expected seconds or a duration like '30s', '10m', '1h', '7d', got {value!r}")
    if not math.isfinite(seconds):
        raise error(f"{where}: must be finite, got {value!r}")
    if seconds < 0 or (positive and seconds <= 0):
        raise error(f"{where}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return seconds
