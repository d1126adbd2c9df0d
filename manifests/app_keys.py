"""Application keys: what an application presents to a device for completions
(`Authorization: Bearer <key>`), made by the operator, stored by the device as a digest only.

Rules: a key is `KEY_PREFIX` + 43 URL-safe base64 characters (32 random bytes from `secrets`);
it is named (a device name's rules) and the name, not the key, is what telemetry and listings
show. A device stores `sha256(key)` in hex: keys are random, so a plain digest cannot be
reversed or guessed, and no per-key salt is needed. `parse_key_record` validates what the
operator API hands to a device.
"""
from __future__ import annotations

import hashlib
import re
import secrets

from manifests.errors import ManifestError
from manifests.model_manifest import check_sha256
from manifests.names import check_name

KEY_PREFIX = "stk_"
_KEY = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}", re.ASCII)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def is_key(text: object) -> bool:
    return isinstance(text, str) and _KEY.fullmatch(text) is not None


def key_digest(key: str) -> str:
    """The hex sha256 a device keeps of `key`."""
    if not is_key(key):
        raise ManifestError(f"not an application key (expected {KEY_PREFIX} and 43 characters)")
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def parse_key_record(name: object, digest: object) -> tuple[str, str]:
    """(name, digest) of a key record, validated."""
    return check_name(name, "app key name"), check_sha256(digest, "app key")
