"""The device's application keys: who may ask it for completions.

Rules:
- `app_keys.json` in the data dir maps each key's name to the sha256 of the key (never the key)
  and when it was added; it is written whole (temp file + replace) under a lock, by the operator
  API (`PUT`/`DELETE /v1/app-keys/{name}`) or by hand;
- `authenticate(header)` takes the `Authorization` header and returns the key's name; a missing,
  malformed, unknown or revoked key raises `UnauthorizedError` (HTTP 401), with the same message
  for unknown and revoked so the answer reveals nothing;
- the file is re-read when it changes on disk (its mtime and size), so a key revoked by any
  writer is refused from the next request on; a file that cannot be read refuses every key
  (fails closed) and says why in the error log.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from agent.errors import UnauthorizedError
from common.files import atomic_write_json
from manifests import ManifestError
from manifests.app_keys import KEY_PREFIX, is_key, key_digest, parse_key_record

log = logging.getLogger("st-agent.app-keys")
BEARER = "bearer "


class AppKeys:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._by_digest: dict[str, str] = {}

    # ---- reading -------------------------------------------------------------------------
    def _records(self) -> dict[str, dict]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise ManifestError("expected an object of {name: {sha256, created}}")
        for name, record in raw.items():
            parse_key_record(name, record.get("sha256"))
        return raw

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            seen = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen and seen is not None:
            return
        try:
            records = self._records()
        except (OSError, ValueError, ManifestError) as e:
            log.error("%s: %s; every application key is refused until it is fixed", self.path, e)
            self._by_digest, self._seen = {}, None
            return
        self._by_digest = {r["sha256"]: name for name, r in records.items()}
        self._seen = seen

    def authenticate(self, authorization: str | None) -> str:
        """The name of the key in the `Authorization: Bearer` header."""
        if not authorization or not authorization[:len(BEARER)].lower() == BEARER:
            raise UnauthorizedError("completions need an application key: send 'Authorization: Bearer "
                                    f"{KEY_PREFIX}...' (the operator makes one with `stctl device app-key create`)")
        key = authorization[len(BEARER):].strip()
        with self._lock:
            self._refresh()
            name = self._by_digest.get(key_digest(key)) if is_key(key) else None
        if name is None:
            raise UnauthorizedError("this application key is not valid on this device")
        return name

    def names(self) -> list[dict]:
        with self._lock:
            return [{"name": name, "created": r.get("created")} for name, r in sorted(self._records().items())]

    # ---- writing (operator API) -----------------------------------------------------------
    def put(self, name: str, digest: str) -> None:
        parse_key_record(name, digest)
        with self._lock:
            records = self._records()
            records[name] = {"sha256": digest, "created": time.time()}
            atomic_write_json(self.path, records)
            self._seen = None

    def delete(self, name: str) -> bool:
        """Revoke `name`; False if there was no such key."""
        with self._lock:
            records = self._records()
            if records.pop(name, None) is None:
                return False
            atomic_write_json(self.path, records)
            self._seen = None
            return True
