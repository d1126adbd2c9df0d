"""The device HTTP API (DESIGN.md): FastAPI, served over TLS by `agent.server`.

Rules:
- the server listens while the active release loads: `GET /healthz` is open and answers 503
  `loading` until the agent has started (release loaded, unfinished job resumed), then `ok`,
  nothing more; every other endpoint answers 503 `starting` until then;
- the OpenAI-compatible routes (`agent.openai_api`: models, completions, chat completions) need
  an application key; every other endpoint is a management endpoint: it needs a client certificate of the
  fleet CA (the TLS layer verifies the chain) whose role marker is `operator` (401 without a
  certificate, 403 with another role); the operator manages keys with `GET /v1/app-keys`,
  `PUT /v1/app-keys/{name}` `{sha256}` and `DELETE /v1/app-keys/{name}`;
- every request body is capped (`Limits.max_body_bytes`, 413); malformed input gets a 4xx;
  every error, on every path, is OpenAI's envelope `{"error": {"message", "type", "param",
  "code"}}` (`param`: the offending field or null; `code`: a short code or null), rendered as
  ASCII JSON so that no input (NaN, a lone surrogate) can make the error itself fail;
- a request that breaks its schema (body, query or path) is 400 `invalid_request`, never
  FastAPI's 422 `detail` list: `param` names the field at fault, `code` is the pydantic error
  type, the message says what is wrong without echoing the raw value (it may be NaN or
  megabytes); bodies are strict: no `"3"` for an int, no `"yes"` or `1` for a bool, no `true`
  for an int, floats finite (an int is a float, as in OpenAI's API), token ids within int64 (the
  engine checks the vocabulary), text valid Unicode, names, versions and repository URLs
  checked by `manifests` (`check_name`, `parse_version`, `check_repository_url`);
- an exception no handler takes is a 500 `internal_error` envelope and one log line;
- `POST /v1/updates` takes, besides DESIGN.md's fields, the optional `hold` (stage only: the job
  fetches and verifies, then waits at `staged`; the same request without `hold` installs it)
  and `max_bytes_per_s` (the download's bandwidth cap, at least 1024).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from agent.app_keys import AppKeys
from agent.config import DeviceConfig
from agent.errors import (
    AgentError, BadRequestError, InstallError, QueueFullError, UnauthorizedError, UpdateError, UpdateRefusedError,
)
from agent.request_bodies import STRICT
from common.http import ApiError, error, peer_chain
from agent.lifecycle import JobStore
from agent.openai_api import router as openai_router
from agent.serving import NoModelError, Serving
from agent.telemetry import Telemetry
from agent.updater import Updater, job_view
from manifests import ManifestError
from manifests.call_home import MIN_BYTES_PER_S
from manifests.enrollment import ROLE_OPERATOR, certificate_role, check_repository_url
from manifests.model_manifest import parse_version
from manifests.names import check_name
from manifests.telemetry import TELEMETRY_TABLES
from model.errors import InputError
from model.memory import current_rss_bytes

log = logging.getLogger("st-agent.api")
# the first class that matches decides (subclasses before their bases)
_STATUS = [(QueueFullError, 429, "queue_full"), (UnauthorizedError, 401, "unauthorized"), (NoModelError, 503, "no_model"),
           (BadRequestError, 400, "invalid_request"), (UpdateRefusedError, 409, "refused"), (InstallError, 409, "install"),
           (UpdateError, 400, "update"), (AgentError, 400, "invalid_request"), (InputError, 400, "invalid_request")]
_HTTP_KINDS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none"})


def _field_path(loc: tuple) -> str | None:
    """("body", "prompt", "list[constrained-int]", 0) -> "prompt[0]", ("body", "messages", 0, "role")
    -> "messages[0].role"; None for the body as a whole. A string part that is not a snake_case
    name (or is a type name such as `str`) is a union branch's tag, dropped."""
    if len(loc) < 2 or not isinstance(loc[1], str):
        return None
    path = loc[1]
    for part in loc[2:]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.replace("_", "a").isalpha() and part.islower() and part not in _TYPE_TAGS:
            path += f".{part}"
    return path


def _problem(p: dict) -> str:
    """One schema problem as `field: what is wrong` (from pydantic's message, never the input)."""
    ctx = p.get("ctx") or {}
    if p["type"] == "json_invalid":
        return f"the body is not valid JSON ({ctx.get('error', 'decode error')})"
    message = str(ctx["error"]) if p["type"] == "value_error" and "error" in ctx else p["msg"]
    return f"{_field_path(p['loc']) or p['loc'][0]}: {message}"


def validation_error(e: RequestValidationError) -> JSONResponse:
    """400 naming the first problems. Of a union field only its deepest problems count (the branch
    that came closest: for `[true]` "prompt[0]: ... a valid integer", not "prompt: ... a string")."""
    problems = sorted(e.errors(), key=lambda p: -len(p["loc"]))
    if not problems:
        return error(400, "the request does not match its schema", "invalid_request")
    deepest: dict = {}
    for p in problems:
        deepest.setdefault(p["loc"][:2], len(p["loc"]))
    problems = [p for p in problems if len(p["loc"]) == deepest[p["loc"][:2]]]
    first = problems[0]
    texts = list(dict.fromkeys(_problem(p) for p in problems))
    field = first["loc"][1] if len(first["loc"]) > 1 and isinstance(first["loc"][1], str) else None
    return error(400, "; ".join(texts[:3]) + (f" (and {len(texts) - 3} more)" if len(texts) > 3 else ""),
                 "invalid_request", field, first["type"])


class ErrorsAsJSON:
    """ASGI middleware: an exception nothing handled becomes a 500 envelope and one log line (once a
    response has started, its status is sent: the connection just ends)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # the last line of defence: whatever failed, answer in the envelope
            log.error("%s %s failed: %s: %r", scope.get("method"), scope.get("path"), type(e).__name__, str(e)[:500])
            if not started:
                await error(500, f"internal error ({type(e).__name__}); the agent's log has the details",
                            "internal_error")(scope, receive, send)


class BodyLimit:
    """ASGI middleware: reads the whole body up to `limit` bytes (413 beyond), then replays it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = error(413, f"request body larger than {self.limit} bytes", "too_large")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def require_operator(request: Request) -> None:
    """Management endpoints: a verified client certificate with the operator role."""
    chain = peer_chain(request.scope)
    if not chain:
        raise ApiError(401, "this endpoint needs a client certificate of the fleet CA (operator role)", "unauthorized")
    if certificate_role(chain[0].encode()) != ROLE_OPERATOR:
        raise ApiError(403, "this certificate does not carry the operator role", "forbidden")


Operator = Depends(require_operator)


def require_started(request: Request) -> None:
    """Every endpoint but /healthz (which says `loading` itself): 503 until the agent has started."""
    if request.url.path != "/healthz" and not request.app.state.started.is_set():
        raise ApiError(503, "the agent is starting (loading the active release); retry shortly", "starting")


class UpdateBody(BaseModel):
    model_config = ConfigDict(**STRICT, extra="forbid")
    model: str = Field(max_length=64)
    version: str = Field(max_length=64)
    repository_url: str | None = Field(None, max_length=2048)
    allow_downgrade: bool = False
    hold: bool = False  # stage only: fetch and verify, then wait at staged; the same request without it installs
    max_bytes_per_s: int | None = Field(None, ge=MIN_BYTES_PER_S)  # the download's bandwidth cap

    @field_validator("model")
    @classmethod
    def _model_name(cls, model: str) -> str:
        return check_name(model, "model")

    @field_validator("version")
    @classmethod
    def _semantic_version(cls, version: str) -> str:
        parse_version(version)
        return version

    @field_validator("repository_url")
    @classmethod
    def _repository_url(cls, url: str | None) -> str | None:
        return None if url is None else check_repository_url(url)


class AppKeyBody(BaseModel):
    model_config = ConfigDict(**STRICT, extra="forbid")
    sha256: str = Field(max_length=64)


def create_app(config: DeviceConfig, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The API of the device whose data dir `config` describes (starts and recovers in the
    background of its lifespan; `on_fatal` is called if that fails, e.g. to stop the server)."""
    limits = config.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        telemetry = Telemetry(config.telemetry_db, limits.telemetry_max_rows)
        serving = Serving(limits, telemetry)
        updater = Updater(config, telemetry, serving)
        app.state.telemetry, app.state.serving, app.state.updater = telemetry, serving, updater
        stop = threading.Event()

        def boot() -> None:
            try:
                updater.boot()
            except Exception as e:  # the daemon cannot serve: it stops and `serve` reports why
                app.state.boot_error = f"{type(e).__name__}: {e}"
                log.error("could not start: %s", app.state.boot_error)
                if on_fatal is not None:
                    on_fatal()
                return
            app.state.started.set()

        booter = threading.Thread(target=boot, name="boot", daemon=True)
        booter.start()

        def watch_pointer() -> None:
            while not stop.wait(limits.pointer_poll_s):
                try:
                    updater.sync_pointer()
                except Exception as e:  # keep serving what is loaded; the next poll retries
                    app.state.pointer_error = str(e)

        watcher = threading.Thread(target=watch_pointer, name="pointer-watch", daemon=True)
        watcher.start()
        from agent.call_home import start_call_home  # the lifespan's one addition: polls only with a call_home section

        caller = start_call_home(config, updater, telemetry, stop, app.state.started)
        try:
            yield
        finally:
            stop.set()
            booter.join(limits.shutdown_grace_s)
            watcher.join(limits.shutdown_grace_s)
            if caller is not None:
                caller.join(limits.shutdown_grace_s)
            updater.shutdown(limits.shutdown_grace_s)  # an unfinished job stops where it is and resumes at the next start
            serving.close()
            telemetry.close()

    app = FastAPI(title="st-agent", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(require_started)])
    app.state.started, app.state.boot_error = threading.Event(), None
    app.state.app_keys, app.state.app_keys_required = AppKeys(config.app_keys_file), config.app_keys_required
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(ErrorsAsJSON)

    @app.exception_handler(ApiError)
    async def _plain_error(request: Request, e: ApiError):
        return error(e.status, str(e), e.kind, e.param)

    @app.exception_handler(AgentError)
    @app.exception_handler(InputError)
    async def _agent_error(request: Request, e: Exception):
        status, kind = next((s, k) for cls, s, k in _STATUS if isinstance(e, cls))
        return error(status, str(e), kind)

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request: Request, e: RequestValidationError):
        return validation_error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        kind = _HTTP_KINDS.get(e.status_code, "invalid_request" if e.status_code < 500 else "internal_error")
        return error(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz(request: Request):
        if not request.app.state.started.is_set():
            return PlainTextResponse("loading", status_code=503)
        return "ok"

    @app.get("/v1/app-keys", dependencies=[Operator])
    async def app_keys(request: Request) -> dict:
        return {"keys": await run_in_threadpool(request.app.state.app_keys.names),
                "required": request.app.state.app_keys_required}

    @app.put("/v1/app-keys/{name}", dependencies=[Operator])
    async def put_app_key(name: str, body: AppKeyBody, request: Request) -> dict:
        try:
            check_name(name, "app key name")
            await run_in_threadpool(request.app.state.app_keys.put, name, body.sha256)
        except ManifestError as e:
            raise ApiError(400, str(e), "invalid_request") from None
        return {"name": name}

    @app.delete("/v1/app-keys/{name}", dependencies=[Operator])
    async def delete_app_key(name: str, request: Request) -> dict:
        if not await run_in_threadpool(request.app.state.app_keys.delete, name):
            raise ApiError(404, f"no application key named {name!r}", "not_found")
        return {"name": name, "revoked": True}

    @app.get("/v1/status", dependencies=[Operator])
    async def status(request: Request) -> dict:
        return request.app.state.updater.status()

    @app.post("/v1/updates", status_code=202, dependencies=[Operator])
    async def start_update(body: UpdateBody, request: Request) -> dict:
        updater: Updater = request.app.state.updater
        job = updater.request(body.model, body.version, body.repository_url, body.allow_downgrade, hold=body.hold,
                              max_bytes_per_s=body.max_bytes_per_s)
        accepted = {"id": job.id, "state": job.state}
        updater.start(job)
        return accepted

    @app.get("/v1/updates/{job_id}", dependencies=[Operator])
    async def get_update(job_id: str, request: Request) -> dict:
        updater: Updater = request.app.state.updater
        jobs: JobStore = updater.jobs
        try:
            job = jobs.load(job_id)
        except (KeyError, ValueError):
            raise ApiError(404, "no such update", "not_found") from None
        return job_view(job, updater.progress.get(job.id))

    @app.post("/v1/rollback", dependencies=[Operator])
    async def rollback(request: Request) -> dict:
        return (await run_in_threadpool(request.app.state.updater.rollback)).to_dict()

    @app.post("/v1/health-checks", dependencies=[Operator])
    async def health_check(request: Request) -> dict:
        result, rolled_back = await run_in_threadpool(request.app.state.updater.check_active)
        return {**result.to_dict(), "rolled_back": rolled_back}

    @app.get("/v1/telemetry", dependencies=[Operator])
    async def telemetry(request: Request, table: str = Query(..., max_length=32),
                        since: float | None = Query(None, allow_inf_nan=False), limit: int = Query(100, ge=1)) -> dict:
        if table not in TELEMETRY_TABLES:
            raise ApiError(400, f"table must be one of {', '.join(TELEMETRY_TABLES)}", "invalid_request")
        rows = await run_in_threadpool(request.app.state.telemetry.query, table, since,
                                       min(limit, limits.telemetry_page_rows))
        return {"table": table, "rows": rows}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Operator])
    async def metrics(request: Request) -> str:
        return render_metrics(request.app.state.serving, request.app.state.updater)

    app.include_router(openai_router)
    return app


def render_metrics(serving: Serving, updater: Updater) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    pointer = updater.install.pointer()
    active = pointer.active
    stats = serving.last_stats
    metric("st_agent_active_release", "gauge", "The active release (value 1).",
           [(f'{{model="{active.model}",version="{active.version}"}}', 1)] if active else [])
    metric("st_agent_probation", "gauge", "1 while the active release awaits its first passing health check.",
           [("", int(pointer.probation))])
    metric("st_agent_completions_total", "counter", "Completions finished.", [("", serving.completions)])
    metric("st_agent_completion_tokens_total", "counter", "Tokens generated.", [("", serving.completion_tokens)])
    metric("st_agent_completions_rejected_total", "counter", "Completions refused with 429 (queue full).",
           [("", serving.rejected)])
    metric("st_agent_completion_failures_total", "counter", "Completions that failed while generating.",
           [("", serving.failures)])
    metric("st_agent_completions_cancelled_total", "counter", "Completions cancelled because their client went away.",
           [("", serving.cancelled)])
    metric("st_agent_completions_rejected_by_key_total", "counter", "Completions refused with 429, by application key.",
           [(f'{{key="{key}"}}', n) for key, n in sorted(serving.rejected_by_key.items())])
    metric("st_agent_completions_in_progress", "gauge", "Completions admitted and not finished.",
           [("", serving.admitted)])
    metric("st_agent_decode_tokens_per_second", "gauge", "Decode speed of the last completion.",
           [("", stats.get("decode_tokens_per_s", 0.0))])
    metric("st_agent_peak_rss_bytes", "gauge", "Peak RSS during the last completion.",
           [("", stats.get("peak_rss_bytes", 0))])
    metric("st_agent_resident_memory_bytes", "gauge", "Resident memory of the agent now.", [("", current_rss_bytes())])
    metric("st_agent_updates_finished_total", "counter", "Update jobs finished since start, by final state.",
           [(f'{{state="{state}"}}', n) for state, n in sorted(updater.finished_by_state.items())])
    return "\n".join(lines) + "\n"
