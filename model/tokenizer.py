"""Text <-> token ids.

Rule: the manifest's `tokenizer` section decides: `byte` maps UTF-8 bytes to ids 0-255 (BOS 256,
EOS 257); `hf` loads the package's verified tokenizer.json with the `tokenizers` library. Either
encodes only text that is valid Unicode: a string that cannot be UTF-8 encoded (a lone surrogate,
as JSON's `"\\ud800"` or undecodable bytes in argv produce) raises InputError.
A tokenizer also says which ids end a generation (`stop_ids`: the manifest's `eos_ids`, else its
`eos_id`) and carries the package's chat template, compiled (`chat_template`, None without one).
`TextStream` turns ids into text as they come, never splitting a UTF-8 character.
"""
from __future__ import annotations

from pathlib import Path

from manifests import TokenizerSpec
from model.chat import ChatTemplate
from model.errors import InputError, PackageError
from model.package import read_verified

BYTE_BOS, BYTE_EOS = 256, 257


def utf8_bytes(text: str) -> bytes:
    """`text` as UTF-8; InputError (naming the position) when it is not valid Unicode."""
    if not isinstance(text, str):
        raise InputError(f"expected text, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"not valid Unicode text ({e.reason} at character {e.start})") from None


class ByteTokenizer:
    bos_id, eos_id = BYTE_BOS, BYTE_EOS
    stop_ids = (BYTE_EOS,)
    chat_template = None

    def encode(self, text: str) -> list[int]:
        return list(utf8_bytes(text))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, data: bytes, bos_id: int | None, eos_id: int | None, eos_ids: tuple[int, ...] | None = None,
                 chat_template: str | None = None):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise PackageError(f"tokenizer.json: cannot be loaded ({e})") from None
        self.bos_id, self.eos_id = bos_id, eos_id
        self.stop_ids = tuple(eos_ids) if eos_ids else (() if eos_id is None else (eos_id,))
        self.chat_template = None if chat_template is None else ChatTemplate(
            chat_template, self._token(bos_id), self._token(eos_id))

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        utf8_bytes(text)
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def load_tokenizer(package_dir: Path, spec: TokenizerSpec):
    if spec.kind == "byte":
        return ByteTokenizer()
    data = read_verified(package_dir, None, file=spec.file, sha256=spec.sha256, size=spec.size)
    return HFTokenizer(data, spec.bos_id, spec.eos_id, spec.eos_ids, spec.chat_template)


class TextStream:
    """Incremental detokenization with stop strings: `feed(id)` returns only text that is final (no
    unfinished UTF-8 character, nothing that could still be the start of a stop string) and says
    when a stop string appeared (the text before it is returned, the stop string is not)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def feed(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                out, self.sent = text[self.sent:at], at
                return out, True
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
            return "", False
        safe = max(self.sent, len(text) - self.hold)
        out, self.sent = text[self.sent:safe], safe
        return out, False

    def flush(self) -> str:
        """What is left once generation ended without a stop string."""
        text = self.tokenizer.decode(self.ids)
        out, self.sent = text[self.sent:], len(text)
        return out
