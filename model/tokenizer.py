"""Text <-> token ids.

Rule: the manifest's `tokenizer` section decides: `byte` maps UTF-8 bytes to ids 0-255 (BOS 256,
EOS 257); `hf` loads the package's verified tokenizer.json with the `tokenizers` library. Either
encodes only text that is valid Unicode: a string that cannot be UTF-8 encoded (a lone surrogate,
as JSON's `"\\ud800"` or undecodable bytes in argv produce) raises InputError.
"""
from __future__ import annotations

from pathlib import Path

from manifests import TokenizerSpec
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

    def encode(self, text: str) -> list[int]:
        return list(utf8_bytes(text))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, data: bytes, bos_id: int | None, eos_id: int | None):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise PackageError(f"tokenizer.json: cannot be loaded ({e})") from None
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        utf8_bytes(text)
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def load_tokenizer(package_dir: Path, spec: TokenizerSpec):
    if spec.kind == "byte":
        return ByteTokenizer()
    data = read_verified(package_dir, None, file=spec.file, sha256=spec.sha256, size=spec.size)
    return HFTokenizer(data, spec.bos_id, spec.eos_id)
