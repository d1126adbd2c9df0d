"""Rollout plans: the shipped examples parse; bad plans are refused with the bad field named; device
selection by tag and percentage is deterministic and never puts a device in two waves."""
from __future__ import annotations

from pathlib import Path

import pytest

from manifests import ManifestError
from manifests.rollout_plan import RolloutPlan, parse_plan, select_devices

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"

GOOD = """
max_concurrent = 2
device_timeout = "90s"
[gates]
min_decode_tokens_per_s = 3
max_failure_fraction = 0.25
min_devices = 2
[[waves]]
name = "canary"
tags = { ring = "canary" }
count = 1
soak = "1m"
[[waves]]
name = "rest"
percent = 100
on_gate_failure = "halt"
gates = { max_peak_rss_bytes = 1000 }
"""


def test_examples_parse():
    files = sorted(EXAMPLES.glob("*.toml"))
    assert len(files) >= 2
    for path in files:
        plan = parse_plan(path.read_bytes(), str(path))
        assert plan.waves and RolloutPlan.from_json(plan.to_json()) == plan


def test_good_plan_fields_and_defaults():
    plan = parse_plan(GOOD)
    canary, rest = plan.waves
    assert (canary.name, canary.tags, canary.count, canary.soak_s) == ("canary", {"ring": "canary"}, 1, 60.0)
    assert (canary.max_concurrent, canary.device_timeout_s, canary.on_gate_failure) == (2, 90.0, "rollback")
    assert canary.gates.min_decode_tokens_per_s == 3.0 and canary.gates.health_check is True
    # a wave's gates override the plan's gates key by key
    assert rest.gates.max_peak_rss_bytes == 1000 and rest.gates.min_decode_tokens_per_s == 3.0
    assert rest.gates.min_devices == 2 and rest.on_gate_failure == "halt" and rest.percent == 100.0


@pytest.mark.parametrize("text, field", [
    ("colour = 'red'\n[[waves]]\npercent = 100", "colour: unknown key"),
    ("[[waves]]\npercent = 100\nspeed = 3", "waves[0].speed: unknown key"),
    ("[gates]\nmin_tokens = 3\n[[waves]]\npercent = 100", "gates.min_tokens: unknown key"),
    ("[[waves]]\npercent = 100\ngates = { max_rss = 1 }", "waves[0].gates.max_rss: unknown key"),
    ("[[waves]]\npercent = 150", "waves[0].percent: must be <= 100"),
    ("[[waves]]\npercent = 0", "waves[0].percent: must be > 0"),
    ("[[waves]]\npercent = 100\n[[waves]]\npercent = 100.5", "waves[1].percent: must be <= 100"),
    ("[[waves]]\nname = 'x'", "waves[0]: selects no device"),
    ("[[waves]]\ntags = {}", "waves[0].tags: empty"),
    ("[[waves]]\ncount = 0", "waves[0].count: must be >= 1"),
    ("[[waves]]\npercent = 100\nsoak = -5", "waves[0].soak: must be >= 0"),
    ("[[waves]]\npercent = 100\nsoak = '-5s'", "waves[0].soak: expected seconds or a duration"),
    ("[[waves]]\npercent = 100\nsoak = 'soon'", "waves[0].soak: expected seconds or a duration"),
    ("device_timeout = 0\n[[waves]]\npercent = 100", "device_timeout: must be > 0"),
    ("max_concurrent = 0\n[[waves]]\npercent = 100", "max_concurrent: must be >= 1"),
    ("on_gate_failure = 'panic'\n[[waves]]\npercent = 100", "on_gate_failure: expected one of rollback, halt"),
    ("[gates]\nmax_failure_fraction = 1.5\n[[waves]]\npercent = 100", "gates.max_failure_fraction: must be <= 1"),
    ("[gates]\nhealth_check = 'yes'\n[[waves]]\npercent = 100", "gates.health_check: expected true or false"),
    ("[gates]\nmin_devices = 2.5\n[[waves]]\npercent = 100", "gates.min_devices: expected an integer"),
    ("[[waves]]\ntags = { line = 4 }", "waves[0].tags.line: expected a string"),
    ("[[waves]]\nname = 'a'\npercent = 50\n[[waves]]\nname = 'a'\npercent = 100", "waves[1].name: 'a' is used"),
    ("max_concurrent = 2", "waves: expected at least one"),
    ("waves = 3", "waves: expected at least one"),
    ("[[waves]\npercent = 1", "plan: not valid TOML"),
])
def test_bad_plan_names_the_field(text, field):
    with pytest.raises(ManifestError) as e:
        parse_plan(text)
    assert field in str(e.value)


FLEET = {f"pc{i:02d}": {"line": "4" if i < 6 else "5", **({"ring": "canary"} if i == 3 else {})} for i in range(10)}


def test_selection_by_tag_percent_and_count():
    plan = parse_plan("""
[[waves]]
tags = { ring = "canary" }
[[waves]]
tags = { line = "4" }
percent = 50
[[waves]]
percent = 100
""")
    waves = select_devices(plan, FLEET)
    assert waves[0] == ["pc03"]
    assert waves[1] == ["pc00", "pc01", "pc02"]  # ceil(50% of 6 on line 4) = 3, pc03 already taken
    assert waves[2] == ["pc04", "pc05", "pc06", "pc07", "pc08", "pc09"]
    assert sum(map(len, waves)) == len(FLEET)  # no device twice, none skipped
    assert select_devices(plan, FLEET) == waves  # deterministic


def test_empty_selection_is_refused():
    with pytest.raises(ManifestError, match=r"waves\[0\] \(wave-1\): selects no device \(no device matches"):
        select_devices(parse_plan("[[waves]]\ntags = { line = '9' }"), FLEET)
    plan = parse_plan("[[waves]]\npercent = 100\n[[waves]]\nname = 'late'\ncount = 3")
    with pytest.raises(ManifestError, match=r"waves\[1\] \(late\): selects no device \(every device"):
        select_devices(plan, FLEET)
