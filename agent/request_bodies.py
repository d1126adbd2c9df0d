"""What every route module of the device API asks of a request body (the error envelope itself is
`common.http`'s, shared with the fleet server).

Rules:
- request bodies are strict (`STRICT`): no `"3"` for an int, no `1` for a bool, floats finite;
  text in a body must be valid Unicode (`valid_unicode`).
"""
from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field

from model.errors import InputError
from model.tokenizer import utf8_bytes

STRICT = ConfigDict(strict=True, allow_inf_nan=False, protected_namespaces=())
TokenId = Annotated[int, Field(ge=0, lt=2**63)]  # int64 at the edge; the engine checks the vocabulary


def valid_unicode(value):
    """Text (or a list of texts) that is valid Unicode: a lone surrogate (JSON "\\ud800") is not."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str):
            try:
                utf8_bytes(text)
            except InputError as e:
                raise ValueError(str(e)) from None
    return value
