"""The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

Rules:
- each needs an application key (`Authorization: Bearer stk_...`, 401 without a valid one) unless
  the device's config sets `app_keys_required` false (a trusted LAN);
- both completions take OpenAI's sampling fields: `max_tokens` (capped by the device; chat's
  newer `max_completion_tokens` wins over it), `temperature`, `top_p`, `seed`, `stop`, `stream`,
  `n` (1 only), `model` (when given, the served model's name or `name@version`, else 404
  `model_not_found`), and vLLM's `ignore_eos`; text completions take `prompt` (text or token
  ids), chat completions `messages` (roles system, developer, user, assistant, tool; content as
  text or text parts), rendered with the release's chat template;
- the answers have OpenAI's shapes, as its official client parses them: `text_completion` /
  `chat.completion`, `usage` counting prompt and generated tokens, `system_fingerprint` naming
  the exact release; `stream` sends server-sent events (`text_completion` chunks, or
  `chat.completion.chunk`s whose first delta carries the role) ending in `data: [DONE]`; a text
  stream's last chunk carries `usage`, a chat stream sends it as a last chunk without choices
  when `stream_options.include_usage` asks, as OpenAI does;
- a completion whose client disconnects is cancelled (streaming or not): generation stops after
  the token being computed and its slot frees; an error after a stream began arrives as one
  event holding the error envelope, then `[DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.request_bodies import STRICT, TokenId, valid_unicode
from common.http import ApiError, envelope, error
from agent.serving import Completion, CompletionRequest, Serving
from model.chat import ROLES, message_text
from model.errors import InputError


def application_key(request: Request) -> str:
    """The name of the completion's application key ("" where keys are optional and none came)."""
    header = request.headers.get("authorization")
    if header is None and not request.app.state.app_keys_required:
        return ""
    return request.app.state.app_keys.authenticate(header)


AppKey = Annotated[str, Depends(application_key)]
StopText = Annotated[str, Field(min_length=1, max_length=64)]


class SamplingBody(BaseModel):
    """The fields both completions share."""
    model_config = ConfigDict(**STRICT, extra="ignore")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[StopText] | None = None
    stream: bool = False
    model: str | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension: max_tokens tokens, past the end-of-text tokens

    @field_validator("stop", "model")
    @classmethod
    def _valid_unicode(cls, value):
        return valid_unicode(value)


class CompletionBody(SamplingBody):
    prompt: str | list[TokenId]

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, value):
        return valid_unicode(value)


class TextPart(BaseModel):
    model_config = ConfigDict(**STRICT, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(**STRICT, extra="ignore")
    role: Literal[ROLES]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _valid_content(cls, value):
        valid_unicode(value if not isinstance(value, list) else [p.text for p in value])
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(**STRICT, extra="ignore")
    include_usage: bool = False


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream_options: StreamOptions | None = None


class _TextShape:
    """OpenAI's text completion objects."""
    prefix, whole_object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, include_usage: bool = True):
        self.include_usage = include_usage

    def first_chunks(self) -> list[dict]:
        return []

    def piece(self, text: str) -> dict:
        return {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}]}

    def last_chunks(self, done: dict) -> list[dict]:
        return [{"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": done["finish_reason"]}],
                 "usage": usage(done)}]

    def whole(self, text: str, done: dict) -> dict:
        return {"choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": done["finish_reason"]}],
                "usage": usage(done)}


class _ChatShape:
    """OpenAI's chat completion objects."""
    prefix, whole_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, include_usage: bool):
        self.include_usage = include_usage

    def first_chunks(self) -> list[dict]:
        return [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]}]

    def piece(self, text: str) -> dict:
        return {"choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]}

    def last_chunks(self, done: dict) -> list[dict]:
        chunks = [{"choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": done["finish_reason"]}]}]
        if self.include_usage:
            chunks.append({"choices": [], "usage": usage(done)})
        return chunks

    def whole(self, text: str, done: dict) -> dict:
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": done["finish_reason"]}], "usage": usage(done)}


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


router = APIRouter()


@router.get("/v1/models")
async def models(request: Request, key: AppKey):
    return {"object": "list", "data": request.app.state.serving.models()}


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request, key: AppKey):
    return await _respond(request, body, _sampling(request, body, key, prompt=body.prompt), _TextShape())


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request, key: AppKey):
    try:
        messages = tuple({"role": m.role, "content": message_text(
            [p.model_dump() for p in m.content] if isinstance(m.content, list) else m.content)} for m in body.messages)
    except InputError as e:
        raise ApiError(400, str(e), "invalid_request") from None
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await _respond(request, body, _sampling(request, body, key, messages=messages,
                                                   max_tokens=body.max_completion_tokens), _ChatShape(include_usage))


def _sampling(request: Request, body: SamplingBody, key: str, prompt: str | list[int] = "",
              messages: tuple[dict, ...] | None = None, max_tokens: int | None = None) -> CompletionRequest:
    """The engine's request for `body`, after the checks both completions share."""
    serving: Serving = request.app.state.serving
    limits, current = serving.limits, serving.current()
    if body.model is not None and current is not None and body.model not in (current[0], "@".join(current)):
        raise ApiError(404, f"model {body.model!r} is not served here (serving {current[0]})", "model_not_found")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > limits.max_stop_sequences:
        raise ApiError(400, f"at most {limits.max_stop_sequences} stop sequences", "invalid_request")
    wanted = max_tokens or body.max_tokens or (limits.max_tokens if messages is not None else 16)
    return CompletionRequest(prompt, wanted, body.temperature, body.top_p, body.seed, stop, key, body.ignore_eos,
                             messages)


async def _respond(request: Request, body: SamplingBody, wanted: CompletionRequest, shape):
    """Admit and run one completion; answer it whole or as a stream of events, in `shape`."""
    serving: Serving = request.app.state.serving
    timeout = serving.limits.token_timeout_s
    completion: Completion = serving.admit(wanted)
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def emit(kind: str, payload) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
        except RuntimeError:  # the loop closed (shutdown): nobody is listening
            completion.cancel.set()

    completion.start(emit)
    head = {"id": f"{shape.prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": completion.loaded.model, "system_fingerprint": completion.fingerprint}

    async def pieces():
        while True:
            try:
                kind, payload = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                completion.cancel.set()
                yield "error", "no token within the timeout"
                return
            yield kind, payload
            if kind != "text":
                return

    if body.stream:
        chunk_head = {**head, "object": shape.chunk_object}

        async def events():
            try:
                for chunk in shape.first_chunks():
                    yield f"data: {json.dumps({**chunk_head, **chunk})}\n\n"
                async for kind, payload in pieces():
                    if kind == "text":
                        chunks = [{**chunk_head, **shape.piece(payload)}]
                    elif kind == "done":
                        chunks = [{**chunk_head, **c} for c in shape.last_chunks(payload)]
                    else:
                        chunks = [envelope(payload, "generation_failed")]
                    for chunk in chunks:
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
                return {**head, "object": shape.whole_object, **shape.whole("".join(text), payload)}
    finally:
        watcher.cancel()
        completion.cancel.set()
