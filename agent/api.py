"""The device HTTP API (DESIGN.md): FastAPI, served over TLS by `agent.server`.

Rules:
- the server listens while the active release loads: `GET /healthz` is open and answers 503
  `loading` until the agent has started (release loaded, unfinished job resumed), then `ok`,
  nothing more; every other endpoint answers 503 `starting` until then;
- `POST /v1/completions` needs an application key (`Authorization: Bearer stk_...`, 401
  without a valid one) unless the device's config sets `app_keys_required` false (a trusted
  LAN); every other endpoint is a management endpoint: it needs a client certificate of the
  fleet CA (the TLS layer verifies the chain) whose role marker is `operator` (401 without a
  certificate, 403 with another role); the operator manages keys with `GET /v1/app-keys`,
  `PUT /v1/app-keys/{name}` `{sha256}` and `DELETE /v1/app-keys/{name}`;
- a completion whose client disconnects is cancelled (streaming or not): generation stops
  after the token being computed and its slot frees;
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
- completions follow the OpenAI completions subset: `prompt` (text or token ids), `max_tokens`
  (capped), `temperature`, `top_p`, `seed`, `stop`, `stream` (server-sent events ending in
  `data: [DONE]`); `system_fingerprint` names the exact release that generated.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from agent.app_keys import AppKeys
from agent.config import DeviceConfig
from agent.errors import (
    AgentError, BadRequestError, InstallError, QueueFullError, UnauthorizedError, UpdateError, UpdateRefusedError,
)
from agent.lifecycle import JobStore
from agent.serving import CompletionRequest, NoModelError, Serving
from agent.telemetry import Telemetry
from agent.updater import Updater, job_view
from manifests import ManifestError
from manifests.enrollment import ROLE_OPERATOR, certificate_role, check_repository_url
from manifests.model_manifest import parse_version
from manifests.names import check_name
from manifests.telemetry import TELEMETRY_TABLES
from model.errors import InputError
from model.memory import current_rss_bytes
from model.tokenizer import utf8_bytes

log = logging.getLogger("st-agent.api")
_STATUS = [(QueueFullError, 429, "queue_full"), (UnauthorizedError, 401, "unauthorized"), (NoModelError, 503, "no_model"), (BadRequestError, 400, "invalid_request"),
           (UpdateRefusedError, 409, "refused"), (InstallError, 409, "install"), (AgentError, 400, "invalid_request"),
           (UpdateError, 400, "update"), (InputError, 400, "invalid_request")]
_HTTP_KINDS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class ErrorResponse(JSONResponse):
    """JSON as ASCII, NaN refused: text from the request (lone surrogates too) always serialises."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def envelope(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return ErrorResponse(envelope(message, kind, param, code), status_code=status, headers=headers)


def _field_path(loc: tuple) -> str | None:
    """("body", "prompt", "list[constrained-int]", 0) -> "prompt[0]"; None for the body as a whole.
    Request bodies are flat, so a string after the field name is a union branch's tag (dropped)."""
    if len(loc) < 2 or not isinstance(loc[1], str):
        return None
    return loc[1] + "".join(f"[{part}]" for part in loc[2:] if isinstance(part, int))


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


class _Error(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def require_operator(request: Request) -> None:
    """Management endpoints: a verified client certificate with the operator role."""
    tls = request.scope.get("extensions", {}).get("tls", {})
    chain = tls.get("client_cert_chain") or []
    if not chain:
        raise _Error(401, "this endpoint needs a client certificate of the fleet CA (operator role)", "unauthorized")
    if certificate_role(chain[0].encode()) != ROLE_OPERATOR:
        raise _Error(403, "this certificate does not carry the operator role", "forbidden")


Operator = Depends(require_operator)


def require_started(request: Request) -> None:
    """Every endpoint but /healthz (which says `loading` itself): 503 until the agent has started."""
    if request.url.path != "/healthz" and not request.app.state.started.is_set():
        raise _Error(503, "the agent is starting (loading the active release); retry shortly", "starting")


def application_key(request: Request) -> str:
    """The name of the completion's application key ("" where keys are optional and none came)."""
    header = request.headers.get("authorization")
    if header is None and not request.app.state.app_keys_required:
        return ""
    return request.app.state.app_keys.authenticate(header)


_STRICT = ConfigDict(strict=True, allow_inf_nan=False, protected_namespaces=())
TokenId = Annotated[int, Field(ge=0, lt=2**63)]  # int64 at the edge; the engine checks the vocabulary


def _unicode(value):
    """Text (or a list of texts) that is valid Unicode: a lone surrogate (JSON "\\ud800") is not."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str):
            try:
                utf8_bytes(text)
            except InputError as e:
                raise ValueError(str(e)) from None
    return value


class UpdateBody(BaseModel):
    model_config = ConfigDict(**_STRICT, extra="forbid")
    model: str = Field(max_length=64)
    version: str = Field(max_length=64)
    repository_url: str | None = Field(None, max_length=2048)
    allow_downgrade: bool = False

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
    model_config = ConfigDict(**_STRICT, extra="forbid")
    sha256: str = Field(max_length=64)


class CompletionBody(BaseModel):
    model_config = ConfigDict(**_STRICT, extra="ignore")
    prompt: str | list[TokenId]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=64)]] | None = None
    stream: bool = False
    model: str | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension: max_tokens tokens, past the end-of-text token

    @field_validator("prompt", "stop", "model")
    @classmethod
    def _valid_unicode(cls, value):
        return _unicode(value)


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
        try:
            yield
        finally:
            stop.set()
            booter.join(limits.shutdown_grace_s)
            watcher.join(limits.shutdown_grace_s)
            updater.shutdown(limits.shutdown_grace_s)  # an unfinished job stops where it is and resumes at the next start
            serving.close()
            telemetry.close()

    app = FastAPI(title="st-agent", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(require_started)])
    app.state.started, app.state.boot_error = threading.Event(), None
    app.state.app_keys, app.state.app_keys_required = AppKeys(config.app_keys_file), config.app_keys_required
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(ErrorsAsJSON)

    @app.exception_handler(_Error)
    async def _plain_error(request: Request, e: _Error):
        return error(e.status, str(e), e.kind)

    @app.exception_handler(AgentError)
    @app.exception_handler(UpdateError)
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
            raise _Error(400, str(e), "invalid_request") from None
        return {"name": name}

    @app.delete("/v1/app-keys/{name}", dependencies=[Operator])
    async def delete_app_key(name: str, request: Request) -> dict:
        if not await run_in_threadpool(request.app.state.app_keys.delete, name):
            raise _Error(404, f"no application key named {name!r}", "not_found")
        return {"name": name, "revoked": True}

    @app.get("/v1/status", dependencies=[Operator])
    async def status(request: Request) -> dict:
        return request.app.state.updater.status()

    @app.post("/v1/updates", status_code=202, dependencies=[Operator])
    async def start_update(body: UpdateBody, request: Request) -> dict:
        updater: Updater = request.app.state.updater
        job = updater.request(body.model, body.version, body.repository_url, body.allow_downgrade)
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
            raise _Error(404, "no such update", "not_found") from None
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
            raise _Error(400, f"table must be one of {', '.join(TELEMETRY_TABLES)}", "invalid_request")
        rows = await run_in_threadpool(request.app.state.telemetry.query, table, since,
                                       min(limit, limits.telemetry_page_rows))
        return {"table": table, "rows": rows}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Operator])
    async def metrics(request: Request) -> str:
        return render_metrics(request.app.state.serving, request.app.state.updater)

    @app.get("/v1/models")
    async def models(request: Request, key: str = Depends(application_key)):
        return {"object": "list", "data": request.app.state.serving.models()}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request, key: str = Depends(application_key)):
        serving: Serving = request.app.state.serving
        current = serving.current()
        if body.model is not None and current is not None and body.model not in (current[0], "@".join(current)):
            raise _Error(404, f"model {body.model!r} is not served here (serving {current[0]})", "model_not_found")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > limits.max_stop_sequences:
            raise _Error(400, f"at most {limits.max_stop_sequences} stop sequences", "invalid_request")
        completion = serving.admit(CompletionRequest(body.prompt, body.max_tokens, body.temperature, body.top_p,
                                                     body.seed, stop, key, body.ignore_eos))
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(kind: str, payload) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
            except RuntimeError:  # the loop closed (shutdown): nobody is listening
                completion.cancel.set()

        completion.start(emit)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": completion.loaded.model, "system_fingerprint": completion.fingerprint}

        async def pieces():
            while True:
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), limits.token_timeout_s)
                except TimeoutError:
                    completion.cancel.set()
                    yield "error", "no token within the timeout"
                    return
                yield kind, payload
                if kind != "text":
                    return

        if body.stream:
            async def events():
                try:
                    async for kind, payload in pieces():
                        if kind == "text":
                            chunk = {**head, "choices": [{"text": payload, "index": 0, "logprobs": None,
                                                          "finish_reason": None}]}
                        elif kind == "done":
                            chunk = {**head, "choices": [{"text": "", "index": 0, "logprobs": None,
                                                          "finish_reason": payload["finish_reason"]}],
                                     "usage": _usage(payload)}
                        else:
                            chunk = envelope(payload, "generation_failed")
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    completion.cancel.set()

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async def cancel_on_disconnect() -> None:
            # the body was read already: the next message is the client going away
            while (await request.receive())["type"] != "http.disconnect":
                pass
            completion.cancel.set()

        watcher = asyncio.create_task(cancel_on_disconnect())
        text = []
        try:
            async for kind, payload in pieces():
                if kind == "text":
                    text.append(payload)
                elif kind == "error":
                    return error(500, payload, "generation_failed")
                else:
                    return {**head, "choices": [{"text": "".join(text), "index": 0, "logprobs": None,
                                                 "finish_reason": payload["finish_reason"]}], "usage": _usage(payload)}
        finally:
            watcher.cancel()
            completion.cancel.set()

    return app


def _usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


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
