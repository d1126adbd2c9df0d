"""Application keys: made by the operator, kept by the device as digests only, refused once
revoked by any writer, and a broken key file refuses every key."""
from __future__ import annotations

import json

import pytest

from agent.app_keys import AppKeys
from agent.errors import UnauthorizedError
from manifests import ManifestError
from manifests.app_keys import KEY_PREFIX, is_key, key_digest, new_key, parse_key_record


def test_keys_are_random_and_stored_as_their_digest_only(tmp_path):
    a, b = new_key(), new_key()
    assert a != b and is_key(a) and a.startswith(KEY_PREFIX)
    keys = AppKeys(tmp_path / "app_keys.json")
    keys.put("line4-hmi", key_digest(a))
    assert keys.authenticate(f"Bearer {a}") == "line4-hmi"
    assert keys.authenticate(f"bearer  {a} ") == "line4-hmi"
    stored = (tmp_path / "app_keys.json").read_text()
    assert a not in stored and a[len(KEY_PREFIX):] not in stored
    with pytest.raises(UnauthorizedError, match="not valid"):
        keys.authenticate(f"Bearer {b}")


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer stk_short", "Bearer " + "x" * 47])
def test_missing_or_malformed_keys_are_refused(tmp_path, header):
    keys = AppKeys(tmp_path / "app_keys.json")
    keys.put("hmi", key_digest(new_key()))
    with pytest.raises(UnauthorizedError):
        keys.authenticate(header)


def test_a_key_revoked_by_another_writer_is_refused_at_the_next_request(tmp_path):
    key = new_key()
    serving, operator = AppKeys(tmp_path / "k.json"), AppKeys(tmp_path / "k.json")
    operator.put("hmi", key_digest(key))
    assert serving.authenticate(f"Bearer {key}") == "hmi"
    assert operator.delete("hmi") and not operator.delete("hmi")
    with pytest.raises(UnauthorizedError):
        serving.authenticate(f"Bearer {key}")


def test_a_corrupt_key_file_refuses_every_key(tmp_path):
    key = new_key()
    keys = AppKeys(tmp_path / "k.json")
    keys.put("hmi", key_digest(key))
    (tmp_path / "k.json").write_text('{"hmi": {"sha256": "not hex"}, "x": 1')
    with pytest.raises(UnauthorizedError):
        keys.authenticate(f"Bearer {key}")
    (tmp_path / "k.json").write_text(json.dumps({"hmi": {"sha256": key_digest(key)}}))
    assert keys.authenticate(f"Bearer {key}") == "hmi"


@pytest.mark.parametrize("name,digest", [("hmi\n", "0" * 64), ("hmi", "0" * 63), ("hmi", "0" * 64 + "\n"),
                                         ("Hmi", "0" * 64), ("hmi", "A" * 64)])
def test_key_records_are_validated(name, digest):
    with pytest.raises(ManifestError):
        parse_key_record(name, digest)
