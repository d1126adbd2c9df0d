"""The model package manifest (`manifest.json`, format `smallthinker-fleet/model@1`).

Rule: a manifest that parses is complete and self-consistent: every shard has a safe relative
file name, a 64-hex sha256 and a size; expert shards name their layer and expert; names and
files are unique. Serialization is canonical (sorted keys), so equal manifests are equal bytes.
Every pattern here matches the whole string (`fullmatch`, ASCII): a trailing newline or a digit
of another script is refused; the model name follows `manifests.names`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from manifests.errors import ManifestError, json_document
from manifests.names import check_name

MANIFEST_FORMAT = "smallthinker-fleet/model@1"

# The HF `config.json` fields a package must carry (SmallThinker names).
CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "moe_num_primary_experts",
    "moe_num_active_primary_experts",
    "moe_ffn_hidden_size",
    "vocab_size",
    "rope_theta",
    "rms_norm_eps",
    "rope_layout",
    "sliding_window_layout",
    "sliding_window_size",
    "moe_primary_router_apply_softmax",
    "tie_word_embeddings",
)

QUANTS = ("q4_0", "bf16")
SHARD_KINDS = ("expert", "dense")
_SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?",
                     re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_SAFE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*", re.ASCII)


def parse_version(text: str) -> tuple:
    """Semantic version as a sortable tuple; pre-releases sort before their release."""
    m = _SEMVER.fullmatch(text) if isinstance(text, str) else None
    if not m:
        raise ManifestError(f"version {text!r} is not a semantic version like 1.2.0")
    major, minor, patch, pre = m.groups()
    pre_key: tuple = (1,) if pre is None else (0, *[(0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")])
    return (int(major), int(minor), int(patch), pre_key)


def check_relative_file(text: str, what: str) -> str:
    if not isinstance(text, str) or not _SAFE_FILE.fullmatch(text) or ".." in text.split("/"):
        raise ManifestError(f"{what}: {text!r} is not a safe relative file name")
    return text


def check_sha256(text: str, what: str) -> str:
    if not isinstance(text, str) or not _SHA256.fullmatch(text):
        raise ManifestError(f"{what}: sha256 must be 64 lowercase hex digits")
    return text


def _require(obj: dict, key: str, types: type | tuple, where: str) -> Any:
    if key not in obj:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ManifestError(f"{where}.{key}: expected {types}, got a boolean")
    if not isinstance(value, types):
        raise ManifestError(f"{where}.{key}: expected {getattr(types, '__name__', types)}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ShardEntry:
    """One weight file of the package."""

    name: str
    file: str
    sha256: str
    size: int
    kind: str
    layer: int | None = None
    expert: int | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ShardEntry:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object")
        kind = _require(d, "kind", str, where)
        if kind not in SHARD_KINDS:
            raise ManifestError(f"{where}.kind: {kind!r} is not one of {SHARD_KINDS}")
        size = _require(d, "size", int, where)
        if size < 0:
            raise ManifestError(f"{where}.size: negative")
        layer = d.get("layer")
        expert = d.get("expert")
        if kind == "expert":
            layer = _require(d, "layer", int, where)
            expert = _require(d, "expert", int, where)
            if layer < 0 or expert < 0:
                raise ManifestError(f"{where}: layer and expert must be >= 0")
        elif layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 0):
            raise ManifestError(f"{where}.layer: expected a non-negative integer")
        return cls(
            name=_require(d, "name", str, where),
            file=check_relative_file(_require(d, "file", str, where), f"{where}.file"),
            sha256=check_sha256(_require(d, "sha256", str, where), where),
            size=size,
            kind=kind,
            layer=layer,
            expert=expert if kind == "expert" else None,
        )

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "file": self.file, "sha256": self.sha256, "size": self.size, "kind": self.kind}
        if self.layer is not None:
            d["layer"] = self.layer
        if self.expert is not None:
            d["expert"] = self.expert
        return d


@dataclass(frozen=True)
class TokenizerSpec:
    """`byte` (ids 0-255 are bytes, then specials) or `hf` (a tokenizer.json carried in the package).

    An `hf` tokenizer also carries what the checkpoint's other tokenizer files say: its chat
    template (tokenizer_config.json, Jinja as HF renders it) and every id that ends a turn
    (generation_config.json's eos_token_id list)."""

    kind: str
    file: str | None = None
    sha256: str | None = None
    size: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    chat_template: str | None = None
    eos_ids: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, d: Any) -> TokenizerSpec:
        if not isinstance(d, dict):
            raise ManifestError("tokenizer: expected an object")
        kind = _require(d, "kind", str, "tokenizer")
        if kind not in ("byte", "hf"):
            raise ManifestError(f"tokenizer.kind: {kind!r} is not 'byte' or 'hf'")
        spec = cls(kind=kind, bos_id=d.get("bos_id"), eos_id=d.get("eos_id"))
        if kind == "hf":
            spec = cls(
                kind=kind,
                file=check_relative_file(_require(d, "file", str, "tokenizer"), "tokenizer.file"),
                sha256=check_sha256(_require(d, "sha256", str, "tokenizer"), "tokenizer"),
                size=_require(d, "size", int, "tokenizer"),
                bos_id=d.get("bos_id"),
                eos_id=d.get("eos_id"),
                chat_template=_optional(d, "chat_template", str, "tokenizer"),
                eos_ids=_eos_ids(d.get("eos_ids")),
            )
        return spec

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class GoldenPrompt:
    """A prompt, the greedy continuation the builder's engine produced, and its top logits per step."""

    prompt_ids: tuple[int, ...]
    expected_ids: tuple[int, ...]
    # per generated step: [[token_id, logit], ...] of the builder's top candidates
    top_logits: tuple[tuple[tuple[int, float], ...], ...]
    # the same prompt and continuation as text, when the builder had a tokenizer for it (for people)
    prompt_text: str | None = None
    expected_text: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> GoldenPrompt:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object")
        prompt = _int_list(_require(d, "prompt_ids", list, where), f"{where}.prompt_ids")
        expected = _int_list(_require(d, "expected_ids", list, where), f"{where}.expected_ids")
        if not prompt or not expected:
            raise ManifestError(f"{where}: prompt_ids and expected_ids must not be empty")
        tops = _require(d, "top_logits", list, where)
        if len(tops) != len(expected):
            raise ManifestError(f"{where}.top_logits: one entry per expected id required")
        parsed = []
        for step in tops:
            if not isinstance(step, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and isinstance(p[1], (int, float)) for p in step
            ):
                raise ManifestError(f"{where}.top_logits: each step is a list of [token_id, logit]")
            parsed.append(tuple((int(t), float(v)) for t, v in step))
        texts = [d.get(k) for k in ("prompt_text", "expected_text")]
        if any(t is not None and not isinstance(t, str) for t in texts):
            raise ManifestError(f"{where}: prompt_text and expected_text must be strings")
        return cls(tuple(prompt), tuple(expected), tuple(parsed), *texts)

    def to_dict(self) -> dict:
        d = {
            "prompt_ids": list(self.prompt_ids),
            "expected_ids": list(self.expected_ids),
            "top_logits": [[[t, round(v, 5)] for t, v in step] for step in self.top_logits],
        }
        for key in ("prompt_text", "expected_text"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


@dataclass(frozen=True)
class HealthSpec:
    """What a device must reproduce before a release may serve.

    `logit_tolerance` is an absolute tolerance on logits, scaled by `1 + |logit|`; a device on a
    different CPU passes when, teacher-forced along `expected_ids`, every stored top logit matches
    within it and the expected token is within it of the device's best logit.
    """

    prompts: tuple[GoldenPrompt, ...]
    logit_tolerance: float = 0.05
    min_decode_tokens_per_s: float = 0.0
    max_peak_rss_bytes: int | None = None
    # what the builder measured on held-out text with this very package: {"loss": nats per token,
    # "perplexity", "tokens", "source"}, and with "rows" (token ids, each row scored from its first
    # token) and "tolerance" (nats) a device re-measures the loss and must land within the tolerance
    heldout: dict | None = None

    @classmethod
    def from_dict(cls, d: Any) -> HealthSpec:
        if not isinstance(d, dict):
            raise ManifestError("health: expected an object")
        prompts = tuple(GoldenPrompt.from_dict(p, f"health.prompts[{i}]") for i, p in enumerate(_require(d, "prompts", list, "health")))
        if not prompts:
            raise ManifestError("health.prompts: at least one golden prompt required")
        tol = float(_require(d, "logit_tolerance", (int, float), "health"))
        tps = float(_require(d, "min_decode_tokens_per_s", (int, float), "health"))
        rss = d.get("max_peak_rss_bytes")
        if rss is not None and (not isinstance(rss, int) or isinstance(rss, bool) or rss <= 0):
            raise ManifestError("health.max_peak_rss_bytes: expected a positive integer or null")
        if tol <= 0 or tps < 0:
            raise ManifestError("health: logit_tolerance must be > 0 and min_decode_tokens_per_s >= 0")
        heldout = d.get("heldout")
        if heldout is not None:
            _check_heldout(heldout)
        return cls(prompts, tol, tps, rss, heldout)

    def to_dict(self) -> dict:
        return {
            "prompts": [p.to_dict() for p in self.prompts],
            "logit_tolerance": self.logit_tolerance,
            "min_decode_tokens_per_s": self.min_decode_tokens_per_s,
            "max_peak_rss_bytes": self.max_peak_rss_bytes,
            **({"heldout": self.heldout} if self.heldout is not None else {}),
        }


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    config: dict
    quant: str
    tokenizer: TokenizerSpec
    shards: tuple[ShardEntry, ...]
    health: HealthSpec | None = None
    transposed: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> ModelManifest:
        if not isinstance(d, dict):
            raise ManifestError("manifest: expected a JSON object")
        fmt = _require(d, "format", str, "manifest")
        if fmt != MANIFEST_FORMAT:
            raise ManifestError(f"manifest.format: {fmt!r} is not {MANIFEST_FORMAT!r}")
        name = check_name(_require(d, "name", str, "manifest"), "manifest.name")
        version = _require(d, "version", str, "manifest")
        parse_version(version)
        config = _require(d, "config", dict, "manifest")
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise ManifestError(f"manifest.config: missing {', '.join(missing)}")
        quant = _require(d, "quant", str, "manifest")
        if quant not in QUANTS:
            raise ManifestError(f"manifest.quant: {quant!r} is not one of {QUANTS}")
        shards = tuple(ShardEntry.from_dict(s, f"manifest.shards[{i}]") for i, s in enumerate(_require(d, "shards", list, "manifest")))
        if not shards:
            raise ManifestError("manifest.shards: empty")
        for attr in ("name", "file"):
            seen: set = set()
            for s in shards:
                if getattr(s, attr) in seen:
                    raise ManifestError(f"manifest.shards: duplicate {attr} {getattr(s, attr)!r}")
                seen.add(getattr(s, attr))
        transposed = d.get("transposed", [])
        if not isinstance(transposed, list) or not all(isinstance(t, str) for t in transposed):
            raise ManifestError("manifest.transposed: expected a list of tensor names")
        health = HealthSpec.from_dict(d["health"]) if d.get("health") is not None else None
        known = {"format", "name", "version", "config", "quant", "tokenizer", "shards", "health", "transposed"}
        return cls(
            name=name,
            version=version,
            config=dict(config),
            quant=quant,
            tokenizer=TokenizerSpec.from_dict(_require(d, "tokenizer", dict, "manifest")),
            shards=shards,
            health=health,
            transposed=tuple(transposed),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelManifest:
        return cls.from_dict(json_document(data, "manifest"))

    def to_dict(self) -> dict:
        d = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "version": self.version,
            "config": self.config,
            "quant": self.quant,
            "tokenizer": self.tokenizer.to_dict(),
            "shards": [s.to_dict() for s in self.shards],
            "health": self.health.to_dict() if self.health else None,
            **self.extra,
        }
        if self.transposed:
            d["transposed"] = list(self.transposed)
        return d

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1) + "\n").encode()

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards) + (self.tokenizer.size or 0)

    def expert_shards(self) -> list[ShardEntry]:
        return [s for s in self.shards if s.kind == "expert"]

    def shard(self, name: str) -> ShardEntry:
        for s in self.shards:
            if s.name == name:
                return s
        raise ManifestError(f"manifest: no shard named {name!r}")


def _optional(d: dict, key: str, types: type, where: str) -> Any:
    value = d.get(key)
    if value is not None and not isinstance(value, types):
        raise ManifestError(f"{where}.{key}: expected {types.__name__}")
    return value


def _eos_ids(values: Any) -> tuple[int, ...] | None:
    if values is None:
        return None
    if not isinstance(values, list) or not values:
        raise ManifestError("tokenizer.eos_ids: expected a non-empty list of token ids")
    return tuple(_int_list(values, "tokenizer.eos_ids"))


def _check_heldout(heldout: Any) -> None:
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

    if not isinstance(heldout, dict) or not number(heldout.get("loss")):
        raise ManifestError("health.heldout: expected an object with a numeric loss")
    rows, tolerance = heldout.get("rows"), heldout.get("tolerance")
    if (rows is None) != (tolerance is None):
        raise ManifestError("health.heldout: rows and tolerance come together")
    if rows is None:
        return
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and len(r) >= 2 for r in rows):
        raise ManifestError("health.heldout.rows: expected a list of token id lists of 2 or more")
    for n, row in enumerate(rows):
        _int_list(row, f"health.heldout.rows[{n}]")
    if not number(tolerance) or tolerance == 0:
        raise ManifestError("health.heldout.tolerance: expected a positive number")


def _int_list(values: list, where: str) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ManifestError(f"{where}: expected non-negative integers")
    return values
