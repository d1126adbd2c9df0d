"""What every route module of the device API shares: the error envelope and strict request bodies.

Rules:
- every error is OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, rendered as
  ASCII JSON with NaN refused, so that no input (a lone surrogate, say) can make the error fail;
- a route raises `ApiError(status, message, kind)` for an error of its own making;
- request bodies are strict (`STRICT`): no `"3"` for an int, no `1` for a bool, floats finite;
  text in a body must be valid Unicode (`valid_unicode`).
"""
from __future__ import annotations

import json
from typing import Annotated

from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field

from model.errors import InputError
from model.tokenizer import utf8_bytes

STRICT = ConfigDict(strict=True, allow_inf_nan=False, protected_namespaces=())
TokenId = Annotated[int, Field(ge=0, lt=2**63)]  # int64 at the edge; the engine checks the vocabulary


class ApiError(Exception):
    """An error a route answers with `status` and the envelope's `type` = `kind`."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


class ErrorResponse(JSONResponse):
    """JSON as ASCII, NaN refused: text from the request (lone surrogates too) always serialises."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def envelope(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return ErrorResponse(envelope(message, kind, param, code), status_code=status, headers=headers)


def valid_unicode(value):
    """Text (or a list of texts) that is valid Unicode: a lone surrogate (JSON "\\ud800") is not."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str):
            try:
                utf8_bytes(text)
            except InputError as e:
                raise ValueError(str(e)) from None
    return value
