"""Calls from the operator to one device's API (DESIGN.md "Device HTTP API"), over mutual TLS.

Rules: the device must present a certificate of the fleet CA (`pki/ca.crt`) for the host in its
URL, and stctl presents the operator certificate (`pki/operator.crt|key`); every request has a
connect and a read timeout and every response body a size cap (`ClientConfig`); every failure
(unreachable, timeout, TLS, an HTTP error status, a body that is not the expected JSON) raises
`DeviceError`, whose `unreachable` says whether the device could not be reached at all,
`transient` whether it may answer later (unreachable, or a 5xx answer), and `reason` is the
cause in one line without the device's name or URL (`connection refused`, `HTTP 503: ...`).
`last_date` is the device's own time at its last answer (its `Date` header, whole seconds), so
stctl can ask "what happened on the device since this instant" without trusting two clocks.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import requests
from requests.utils import quote

from stctl.errors import StctlError
from stctl.revocation import CrlCheckingAdapter
from stctl.workspace import Workspace


class DeviceError(StctlError):
    """A device call failed; `unreachable` is True when no HTTP answer came back."""

    def __init__(self, device: str, message: str, *, unreachable: bool = False, status_code: int | None = None,
                 reason: str | None = None):
        super().__init__(f"{device}: {message}")
        self.device, self.unreachable, self.status_code = device, unreachable, status_code
        self.reason = _one_line(reason or message)

    @property
    def transient(self) -> bool:
        """No answer, or a 5xx one: the device may answer later, so a caller with a deadline retries."""
        return self.unreachable or (self.status_code is not None and self.status_code >= 500)


@dataclass(frozen=True)
class ClientConfig:
    """Timeouts and caps of device calls (seconds, bytes)."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    health_timeout_s: float = 600.0  # a health check re-hashes and runs the model
    completion_timeout_s: float = 300.0
    max_response_bytes: int = 16 * 1024 * 1024


class DeviceClient:
    """The management API of device `name` at `url` (https://HOST:PORT)."""

    def __init__(self, name: str, url: str, pki_dir: Path, config: ClientConfig = ClientConfig()):
        self.name, self.url, self.config = name, url.rstrip("/"), config
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or $REQUESTS_CA_BUNDLE from the environment: only the fleet CA
        self.session.verify = str(pki_dir / "ca.crt")
        self.session.cert = (str(pki_dir / "operator.crt"), str(pki_dir / "operator.key"))
        self.session.mount("https://", CrlCheckingAdapter(pki_dir))  # a revoked device certificate is refused
        self.last_date: float | None = None

    @classmethod
    def for_device(cls, workspace: Workspace, device: dict, config: ClientConfig = ClientConfig()) -> DeviceClient:
        """`device` is a row of the devices table (name, url)."""
        return cls(device["name"], device["url"], workspace.pki_dir, config)

    def close(self) -> None:
        self.session.close()

    # ---- transport -------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, read_timeout: float | None = None, **kw) -> dict:
        timeout = (self.config.connect_timeout_s, read_timeout or self.config.read_timeout_s)
        try:
            with self.session.request(method, self.url + path, timeout=timeout, stream=True, **kw) as r:
                body = self._read_capped(r)
                date = r.headers.get("date")
        except requests.exceptions.SSLError as e:
            raise DeviceError(self.name, f"TLS handshake with {self.url} failed ({_short(e)})", unreachable=True,
                              reason=f"TLS handshake failed ({_short(e)})") from None
        except (requests.ConnectionError, requests.Timeout) as e:
            raise DeviceError(self.name, f"unreachable at {self.url} ({_short(e)})", unreachable=True,
                              reason=_short(e)) from None
        except requests.RequestException as e:
            raise DeviceError(self.name, f"request to {self.url}{path} failed ({_short(e)})", unreachable=True,
                              reason=_short(e)) from None
        if date:
            try:
                self.last_date = parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError):
                pass
        try:
            data = json.loads(body) if body else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if r.status_code >= 400:
            message = data.get("error", {}).get("message") if isinstance(data, dict) and \
                isinstance(data.get("error"), dict) else (body[:200].decode(errors="replace") or r.reason)
            raise DeviceError(self.name, f"{method} {path}: HTTP {r.status_code}: {message}", status_code=r.status_code,
                              reason=f"HTTP {r.status_code}: {message}")
        if not isinstance(data, dict):
            raise DeviceError(self.name, f"{method} {path}: the answer is not a JSON object", status_code=r.status_code)
        return data

    def _read_capped(self, r: requests.Response) -> bytes:
        cap = self.config.max_response_bytes
        chunks, size = [], 0
        for chunk in r.iter_content(1 << 16):
            size += len(chunk)
            if size > cap:
                raise DeviceError(self.name, f"answer larger than {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # ---- the API ---------------------------------------------------------------------------------
    def status(self) -> dict:
        """`{active, previous, probation, update, ...}`; `active`/`previous` are `{model, version}` or None."""
        return self._call("GET", "/v1/status")

    def request_update(self, model: str, version: str, repository_url: str | None = None,
                       allow_downgrade: bool = False) -> str:
        body = {"model": model, "version": version, "allow_downgrade": allow_downgrade}
        if repository_url:
            body["repository_url"] = repository_url
        job_id = self._call("POST", "/v1/updates", json=body).get("id")
        if not isinstance(job_id, str):
            raise DeviceError(self.name, "POST /v1/updates: no job id in the answer")
        return job_id

    def update(self, job_id: str) -> dict:
        job = self._call("GET", f"/v1/updates/{job_id}")
        if not isinstance(job.get("state"), str):
            raise DeviceError(self.name, f"GET /v1/updates/{job_id}: no state in the answer")
        return job

    def rollback(self) -> dict:
        return self._call("POST", "/v1/rollback")

    def health_check(self) -> dict:
        """Run the device's health check of its active release (slow: re-hash, golden outputs, speed)."""
        return self._call("POST", "/v1/health-checks", read_timeout=self.config.health_timeout_s)

    def telemetry(self, table: str, since: float | None = None, limit: int = 1000) -> list[dict]:
        params = {"table": table, "limit": limit}
        if since is not None:
            params["since"] = repr(float(since))
        rows = self._call("GET", "/v1/telemetry", params=params).get("rows")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DeviceError(self.name, f"GET /v1/telemetry: rows of {table} are not a list of objects")
        return rows

    def complete(self, prompt: str, max_tokens: int = 16, app_key: str | None = None, **options) -> dict:
        """A completion; `app_key` is sent as `Authorization: Bearer` (devices require one by default)."""
        headers = {"Authorization": f"Bearer {app_key}"} if app_key else {}
        return self._call("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, **options},
                          headers=headers, read_timeout=self.config.completion_timeout_s)

    def chat(self, messages: list[dict], max_tokens: int = 64, app_key: str | None = None, **options) -> dict:
        """A chat completion of `messages` (`{role, content}`), rendered with the model's chat template."""
        headers = {"Authorization": f"Bearer {app_key}"} if app_key else {}
        return self._call("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens,
                                                                 **options},
                          headers=headers, read_timeout=self.config.completion_timeout_s)

    def app_keys(self) -> dict:
        """`{"keys": [{"name", "created"}], "required": bool}`: the application keys the device accepts
        (names and when they were added, never a digest) and whether completions need one."""
        answer = self._call("GET", "/v1/app-keys")
        keys, required = answer.get("keys"), answer.get("required")
        if not isinstance(keys, list) or not isinstance(required, bool) or not all(
                isinstance(k, dict) and isinstance(k.get("name"), str) and
                (k.get("created") is None or isinstance(k.get("created"), (int, float))) for k in keys):
            raise DeviceError(self.name, "GET /v1/app-keys: expected {keys: [{name, created}], required}")
        return {"keys": [{"name": k["name"], "created": k.get("created")} for k in keys], "required": required}

    def put_app_key(self, name: str, digest: str) -> None:
        """Add (or replace) the application key `name`, given as the hex sha256 of the key."""
        self._call("PUT", f"/v1/app-keys/{quote(name, safe='')}", json={"sha256": digest})

    def revoke_app_key(self, name: str) -> None:
        """Remove the application key `name`; a device without it answers 404 (a DeviceError)."""
        self._call("DELETE", f"/v1/app-keys/{quote(name, safe='')}")


def release_of(status: dict, key: str = "active") -> tuple[str, str] | None:
    """(model, version) of the status's `active` or `previous` release, None if there is none."""
    ref = status.get(key)
    if isinstance(ref, dict) and isinstance(ref.get("model"), str) and isinstance(ref.get("version"), str):
        return ref["model"], ref["version"]
    return None


def _short(e: Exception) -> str:
    """The cause of a requests failure in a few words (`connection refused`, `timed out`, ...)."""
    if isinstance(e, requests.Timeout):
        return "timed out"
    text = str(e)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno:
        return errno.group(1).strip().lower()
    for marker in ("Caused by ", "Max retries exceeded"):
        if marker in text:
            text = text.split(marker, 1)[-1]
    return text.strip(" ()'\"")[:160] or type(e).__name__


def _one_line(text: str, limit: int = 200) -> str:
    """`text` with its whitespace runs (newlines included) folded to single spaces, at most `limit` characters."""
    return " ".join(str(text).split())[:limit]


def map_devices(fn, items: list, concurrency: int) -> list:
    """`fn(item)` for every item, at most `concurrency` at once; results in the order of `items`."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(items))), thread_name_prefix="device") as pool:
        return list(pool.map(fn, items))
