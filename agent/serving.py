"""Serving completions: the engine holder, the admission queue, and one completion's token stream.

Rules:
- one generation at a time per engine (the engine is not thread-safe): each loaded engine has
  its own `FairQueue`, and each completion runs in its own worker thread holding a turn; turns go
  to the application keys in rotation, so one key's many requests cannot starve another's;
- `swap` replaces the current engine atomically: completions already admitted finish on the
  engine they started on, new ones get the new engine; a replaced engine is closed when its last
  completion ends;
- at most `queue_size + 1` completions are admitted at once (one running, the rest waiting), and
  at most `max_admitted_per_key` of one application key; beyond that `QueueFullError` (HTTP 429),
  so a flood under one key (or without a key, where keys are not required) leaves room for the
  others; every wait is bounded by `token_timeout_s`;
- a cancelled completion (its client went away) leaves the queue at once, or stops after the
  token being computed; its slot frees then;
- `max_tokens` is capped by the configuration, the prompt by `max_prompt_tokens`; a completion
  ends at any of the model's end-of-text tokens (a chat model's end-of-turn among them) unless it
  asks `ignore_eos` (vLLM's extension: generate `max_tokens` whatever the model says, for load
  tests and benchmarks of a fixed length);
- a chat completion's messages are rendered with the release's chat template; a model without one
  refuses chat (400);
- every admitted completion writes one `requests` row (key, outcome: `completed`, `cancelled` or
  `failed`, time queued); a completed one also writes one `generations` row;
- at most one forward pass runs in the process at a time (`COMPUTE_LOCK`, taken per token):
  each forward pass already uses every engine thread, so two engines (the serving one and a
  release under health check, or the old and new one during a switch) computing at the same
  instant would only fight over the cores. Generations still interleave token by token.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import DeviceConfig, Limits
from agent.errors import AgentError, BadRequestError, QueueFullError
from agent.fair_queue import FairQueue
from agent.telemetry import Telemetry
from model import Engine
from model.errors import ModelError
from model.tokenizer import TextStream


COMPUTE_LOCK = threading.Lock()
_END = object()


def one_step_at_a_time(tokens: Iterator[int]) -> Iterator[int]:
    """`tokens` with each step (one forward pass) under COMPUTE_LOCK."""
    while True:
        with COMPUTE_LOCK:
            token = next(tokens, _END)
        if token is _END:
            return
        yield token


class SerializedEngine:
    """An engine whose forward passes take COMPUTE_LOCK (for `model.health.check_golden`)."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def logits(self, token_ids):
        with COMPUTE_LOCK:
            return self._engine.logits(token_ids)

    def generate(self, *args, **kwargs) -> Iterator[int]:
        return one_step_at_a_time(self._engine.generate(*args, **kwargs))


def load_engine(folder: Path, config: DeviceConfig) -> Engine:
    """The engine of the release in `folder`, loaded with this device's limits and caches."""
    limits = config.limits
    return Engine.load(folder, memory_budget_bytes=limits.memory_budget_bytes, threads=limits.threads,
                       packed_cache_dir=config.packed_cache_dir)


def close_engine(engine: Engine) -> None:
    """Stop the engine's background expert readers so the engine can be freed."""
    engine.close()


def _prompt_ids(tokenizer, request: CompletionRequest) -> list[int]:
    """The request's prompt as token ids: its messages rendered with the chat template, or its
    prompt text encoded, or its prompt ids as given."""
    try:
        if request.messages is not None:
            if tokenizer.chat_template is None:
                raise BadRequestError("this model has no chat template; use /v1/completions")
            return tokenizer.encode(tokenizer.chat_template.render(request.messages))
        prompt = request.prompt
        return tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    except ModelError as e:
        raise BadRequestError(str(e)) from None


class NoModelError(AgentError):
    """No release is active yet (HTTP 503)."""


@dataclass
class _Loaded:
    engine: Engine
    model: str
    version: str
    queue: FairQueue = field(default_factory=FairQueue)
    users: int = 0
    retired: bool = False
    since: float = field(default_factory=time.time)  # when it began to serve (unix seconds)


@dataclass(frozen=True)
class CompletionRequest:
    """A text completion of `prompt`, or a chat completion of `messages` (`prompt` unused then)."""
    prompt: str | list[int]
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    key: str = ""  # the application key's name ("" where completions need no key)
    ignore_eos: bool = False  # go on past the end-of-text tokens (they decode to no text)
    messages: tuple[dict, ...] | None = None  # {role, content}, rendered with the model's chat template


class Completion:
    """One admitted completion: `start(emit)` generates on the engine it was admitted to.

    `emit(kind, payload)` receives ("text", str) per piece, then ("done", summary) or ("error", message)."""

    def __init__(self, serving: Serving, loaded: _Loaded, request: CompletionRequest):
        self.serving, self.loaded, self.request = serving, loaded, request
        self.cancel = threading.Event()
        self.admitted_at = time.monotonic()
        engine = loaded.engine
        ids = _prompt_ids(engine.tokenizer, request)
        limits = serving.limits
        if not ids:
            raise BadRequestError("the prompt is empty")
        if len(ids) > limits.max_prompt_tokens:
            raise BadRequestError(f"the prompt has {len(ids)} tokens; at most {limits.max_prompt_tokens}")
        self.max_tokens = min(request.max_tokens, limits.max_tokens)
        self.stop_ids = frozenset() if request.ignore_eos else frozenset(engine.tokenizer.stop_ids)
        try:  # validates ids and context now; the generator body runs only when iterated
            self.tokens = engine.generate(ids, self.max_tokens, temperature=request.temperature, seed=request.seed,
                                          top_p=request.top_p, stop_ids=self.stop_ids)
        except ModelError as e:
            raise BadRequestError(str(e)) from None

    @property
    def fingerprint(self) -> str:
        return f"{self.loaded.model}@{self.loaded.version}"

    def start(self, emit: Callable[[str, object], None]) -> None:
        """Generate in a worker thread of its own; `cancel` stops it at the next token."""
        threading.Thread(target=self._run, args=(emit,), name="completion", daemon=True).start()

    def _run(self, emit: Callable[[str, object], None]) -> None:
        loaded, limits = self.loaded, self.serving.limits
        outcome, count, queued_s, stats = "failed", 0, 0.0, {}
        try:
            if not loaded.queue.acquire(self.request.key, self.cancel, limits.token_timeout_s):
                queued_s = time.monotonic() - self.admitted_at
                if self.cancel.is_set():
                    outcome = "cancelled"
                    emit("done", {"finish_reason": "cancelled", "prompt_tokens": 0, "completion_tokens": 0})
                else:
                    emit("error", "the engine stayed busy too long; retry later")
                return
            queued_s = time.monotonic() - self.admitted_at
            try:
                stream, finish, count, stopped = TextStream(loaded.engine.tokenizer, self.request.stop), "length", 0, False
                for token in one_step_at_a_time(self.tokens):
                    count += 1
                    if token in self.stop_ids:
                        finish = "stop"
                        break
                    text, stopped = stream.feed(token)
                    if text:
                        emit("text", text)
                    if stopped or self.cancel.is_set():
                        finish = "stop" if stopped else "cancelled"
                        break
                if not stopped and (tail := stream.flush()):
                    emit("text", tail)
                self.tokens.close()
                stats = dict(loaded.engine.last_stats)
            finally:
                loaded.queue.release()
            stats["completion_tokens"] = count
            outcome = "cancelled" if finish == "cancelled" else "completed"
            if outcome == "completed":
                self.serving.finished(self, stats)
            emit("done", {"finish_reason": finish, "prompt_tokens": stats.get("prompt_tokens", 0),
                          "completion_tokens": count})
        except Exception as e:  # the stream must end with a message, whatever failed
            self.serving.failures += 1
            emit("error", f"generation failed: {e}")
        finally:
            self.serving.release(self, outcome, queued_s, stats.get("prompt_tokens", 0), count)


class Serving:
    """The current engine and the completions admitted to it (and to engines it replaced)."""

    def __init__(self, limits: Limits, telemetry: Telemetry | None):
        self.limits, self.telemetry = limits, telemetry
        self._lock = threading.Lock()
        self._current: _Loaded | None = None
        self.admitted = 0
        self.admitted_by_key: dict[str, int] = {}
        self.rejected_by_key: dict[str, int] = {}
        self.completions = self.completion_tokens = self.rejected = self.failures = self.cancelled = 0
        self.last_stats: dict = {}

    def current(self) -> tuple[str, str] | None:
        cur = self._current
        return (cur.model, cur.version) if cur else None

    def models(self) -> list[dict]:
        """The model served now, as OpenAI's model objects (none before the first activation)."""
        cur = self._current
        return [] if cur is None else [{"id": cur.model, "object": "model", "created": int(cur.since),
                                        "owned_by": "st-agent"}]

    def swap(self, engine: Engine, model: str, version: str) -> None:
        """Serve `engine` from now on."""
        new = _Loaded(engine, model, version)
        with self._lock:
            old, self._current = self._current, new
            if old is not None:
                old.retired = True
            idle_old = old if old is not None and old.users == 0 else None
        if idle_old is not None:
            close_engine(idle_old.engine)

    def admit(self, request: CompletionRequest) -> Completion:
        """Admit a completion (QueueFullError when full or over its key's share, NoModelError
        before any activation)."""
        with self._lock:
            loaded = self._current
            if loaded is None:
                raise NoModelError("no model is active yet; install one with POST /v1/updates")
            mine = self.admitted_by_key.get(request.key, 0)
            if self.admitted >= self.limits.queue_size + 1 or mine >= self.limits.max_admitted_per_key:
                self.rejected += 1
                self.rejected_by_key[request.key] = self.rejected_by_key.get(request.key, 0) + 1
                whose = f"{mine} of this key's" if mine >= self.limits.max_admitted_per_key else f"{self.admitted}"
                raise QueueFullError(f"{whose} completions in progress; retry later")
            self._hold(loaded, request.key, +1)
        try:
            return Completion(self, loaded, request)
        except BaseException:
            self._unhold(loaded, request.key)
            raise

    def _hold(self, loaded: _Loaded, key: str, n: int) -> None:
        self.admitted += n
        self.admitted_by_key[key] = self.admitted_by_key.get(key, 0) + n
        if not self.admitted_by_key[key]:
            del self.admitted_by_key[key]
        loaded.users += n

    def _unhold(self, loaded: _Loaded, key: str) -> None:
        with self._lock:
            self._hold(loaded, key, -1)
            close = loaded.retired and loaded.users == 0
        if close:
            close_engine(loaded.engine)

    def release(self, completion: Completion, outcome: str, queued_s: float, prompt_tokens: int,
                completion_tokens: int) -> None:
        """A completion ended: its slot frees, and its `requests` row is written."""
        self._unhold(completion.loaded, completion.request.key)
        if outcome == "cancelled":
            self.cancelled += 1
        if self.telemetry is not None:
            self.telemetry.record("requests", {
                "key": completion.request.key, "model": completion.loaded.model, "version": completion.loaded.version,
                "outcome": outcome, "queued_ms": queued_s * 1000.0, "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens})

    def finished(self, completion: Completion, stats: dict) -> None:
        self.completions += 1
        self.completion_tokens += stats["completion_tokens"]
        self.last_stats = stats
        if self.telemetry is not None:
            self.telemetry.record("generations", {"model": completion.loaded.model,
                                                  "version": completion.loaded.version, **stats})

    def close(self) -> None:
        with self._lock:
            cur, self._current = self._current, None
        if cur is not None:  # waits for the running completion's turn to end
            if cur.queue.acquire("", threading.Event(), self.limits.token_timeout_s):
                cur.queue.release()
            close_engine(cur.engine)
