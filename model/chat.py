"""Chat messages -> prompt text, with the package's chat template.

Rules:
- a template renders as Hugging Face transformers' `apply_chat_template` renders it (so a
  checkpoint's own template means here what it means there): Jinja2's immutable sandbox with
  `trim_blocks` and `lstrip_blocks`, `raise_exception(message)` and `strftime_now(format)`
  available, and the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`;
- a template is compiled when the package loads (`ChatTemplate(source)`): one that does not
  compile is the package's fault (PackageError); one that refuses the messages at render time
  (its own `raise_exception`, say, for roles out of order) is the request's fault (InputError);
- messages are `{"role": str, "content": str}`; what a client sends in OpenAI's richer shapes is
  flattened by the caller first (`message_text`).
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from model.errors import InputError, PackageError

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatTemplateError(InputError):
    """The chat template refused these messages (the message is the template's own)."""


def message_text(content) -> str:
    """OpenAI's message content as text: a string, or a list of `{"type": "text", "text": ...}` parts
    joined (any other part kind, an image say, is refused: no model here reads one)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InputError(f"message content parts must be text parts (got {kind!r})")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise InputError(f"message content must be text, got {type(content).__name__}")


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise PackageError(f"chat template: does not compile ({e})") from None
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (each with a known `role` and text `content`)."""
        from jinja2 import TemplateError

        if not messages:
            raise InputError("messages: at least one message is needed")
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise InputError(f"messages[{i}].role: must be one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise InputError(f"messages[{i}].content: must be text")
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template cannot render these messages ({e})") from None


def _raise(message: str):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")
