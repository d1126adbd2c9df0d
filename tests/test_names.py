"""Names and whole-string patterns of `manifests`: a trailing newline, a leading dot, a 65th
character, a look-alike letter or digit of another script, or a URL urllib cannot parse is
refused with a ManifestError (never a ValueError from urllib, never accepted because `$`
matches before a final newline)."""
from __future__ import annotations

import hashlib
import json

import pytest

from manifests import ManifestError, ModelManifest
from manifests.enrollment import check_repository_url, parse_device_url, parse_tag
from manifests.model_manifest import check_relative_file, check_sha256, parse_version
from manifests.names import MAX_NAME_LENGTH, check_name, is_label, is_name
from manifests.release import manifest_target, parse_manifest_target, parse_release_ref
from manifests.rollout_plan import parse_duration_s, parse_plan

from test_manifest import sample

SHA = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize("name", ["st-demo", "pc1", "a", "line4.pc-1_b", "0", "x" * MAX_NAME_LENGTH])
def test_fleet_names_are_accepted(name):
    assert is_name(name) and check_name(name) == name and is_label(name)


@pytest.mark.parametrize("name", [
    "st-demo\n", "devnl\n", "st-demo\r", "\nst-demo", "st demo", "",  # line breaks, blanks, empty
    ".hidden", "..", "-flag", "_x",  # must start with a letter or digit
    "x" * (MAX_NAME_LENGTH + 1),  # too long
    "St-Demo",  # upper case is for labels only
    "st-d\u0435mo",  # Cyrillic e
    "pc\u0661",  # Arabic-Indic digit one
    "\uff53t-demo",  # fullwidth s
    "st-demo\x00", "../etc", "a/b",
    None, 5, b"st-demo",
])
def test_bad_fleet_names_are_refused(name):
    assert not is_name(name)
    with pytest.raises(ManifestError, match="device name"):
        check_name(name, "device name")


def test_labels_allow_upper_case_but_not_newlines():
    assert is_label("Canary") and is_label("LINE.4")
    for bad in ("Canary\n", ".rest", "x" * 65, "r\u00e9st", ""):
        assert not is_label(bad), bad


@pytest.mark.parametrize("text", ["1.0.0\n", "1.0.0 ", "v1.0.0", "1.\u0661.0", "1.0.0-\n", "01.0.0"])
def test_versions_match_whole_and_ascii_only(text):
    with pytest.raises(ManifestError):
        parse_version(text)
    assert parse_version("1.2.0-rc.1+build.7") < parse_version("1.2.0")


def test_sha256_and_file_names_match_whole():
    assert check_sha256(SHA, "x") == SHA
    for bad in (SHA + "\n", SHA.upper(), SHA[:-1] + "\u0661"):
        with pytest.raises(ManifestError):
            check_sha256(bad, "x")
    assert check_relative_file("shards/embed.safetensors", "x")
    for bad in ("shards/embed.safetensors\n", "shards/../x", "/abs", "shards//x", ".x"):
        with pytest.raises(ManifestError):
            check_relative_file(bad, "x")


@pytest.mark.parametrize("field, value, mention", [
    ("sha256", SHA + "\n", "sha256"),
    ("file", "shards/embed.safetensors\n", "safe relative file name"),
])
def test_manifest_with_a_trailing_newline_in_a_shard_is_refused(field, value, mention):
    d = sample()
    d["shards"][0][field] = value
    with pytest.raises(ManifestError, match=mention):
        ModelManifest.from_bytes(json.dumps(d).encode())


@pytest.mark.parametrize("field, value", [("name", "st-demo\n"), ("version", "1.2.0\n")])
def test_manifest_with_a_trailing_newline_in_its_name_or_version_is_refused(field, value):
    d = sample()
    d[field] = value
    with pytest.raises(ManifestError):
        ModelManifest.from_bytes(json.dumps(d).encode())


def test_release_names_match_whole():
    assert parse_release_ref("st-demo@1.0.0") == ("st-demo", "1.0.0")
    for bad in ("st-demo\n@1.0.0", "st-demo@1.0.0\n"):
        with pytest.raises(ManifestError):
            parse_release_ref(bad)
    with pytest.raises(ManifestError):
        manifest_target("st-demo\n", "1.0.0")
    assert parse_manifest_target("models/st-demo\n/1.0.0/manifest.json") is None


@pytest.mark.parametrize("tag", ["line\n=4", "line=4\n", ".line=4", "line=\x1b[31m", "l\u00efne=4", "=4", "line"])
def test_bad_tags_are_refused(tag):
    with pytest.raises(ManifestError, match="expected KEY=VALUE"):
        parse_tag(tag)


def test_good_tags_parse():
    assert parse_tag("Line=4") == ("Line", "4")
    assert parse_tag("site=Hall [B]") == ("site", "Hall [B]")


@pytest.mark.parametrize("url", [
    "http://[::1", "https://[::1]:99999/", "http://host:port/", "http://host/\n", "http://ho st/",
    "ftp://host/", "http:///path", "http://host/?q=1", "http://host/#f", "", None, "http://h\udcff/",
])
def test_repository_urls_urllib_cannot_parse_are_refused_not_raised(url):
    with pytest.raises(ManifestError, match="repository url"):
        check_repository_url(url)


def test_repository_urls_that_parse_are_accepted():
    for url in ("http://10.0.0.2:8080", "https://repo.example/fleet/", "http://[::1]:8080/"):
        assert check_repository_url(url) == url


@pytest.mark.parametrize("url", ["https://[::1", "https://host:70000", "https://host:8443\n", "http://host:8443"])
def test_bad_device_urls_are_refused_not_raised(url):
    with pytest.raises(ManifestError, match="device url"):
        parse_device_url(url)


def test_plan_names_durations_and_tag_keys_match_whole():
    plan = "[[waves]]\nname = 'canary'\ntags = { ring = 'a' }\nsoak = '30s'\n"
    assert parse_plan(plan).waves[0].soak_s == 30.0
    for bad in (plan.replace("'canary'", '"canary\\n"'), plan.replace("ring", '"ring\\n"'),
                plan.replace("'30s'", '"30s\\n5"')):  # TOML basic strings: \n is a newline
        with pytest.raises(ManifestError):
            parse_plan(bad)
    assert parse_duration_s(" 10m ", "soak") == 600.0
    for bad in ("30s\nx", "\u0663s", "9" * 400 + "s"):  # a second line, an Arabic-Indic 3, infinity
        with pytest.raises(ManifestError):
            parse_duration_s(bad, "soak")
