"""SmallThinker model configuration: the HF `config.json` fields, read, validated and written back.

Rule: a ModelConfig that exists is runnable: head and layer counts agree, layouts have one entry
per layer, experts and dimensions are positive, and Q4_0-quantizable dims are multiples of 32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from manifests import CONFIG_KEYS
from model.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_num_primary_experts: int
    moe_num_active_primary_experts: int
    moe_ffn_hidden_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    rope_layout: tuple[int, ...]
    sliding_window_layout: tuple[int, ...]
    sliding_window_size: int
    moe_primary_router_apply_softmax: bool
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        L = self.num_hidden_layers
        for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "moe_num_primary_experts", "moe_num_active_primary_experts", "moe_ffn_hidden_size",
                  "vocab_size", "sliding_window_size"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"config.{f} must be positive, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("config.num_attention_heads must be a multiple of num_key_value_heads")
        if self.moe_num_active_primary_experts > self.moe_num_primary_experts:
            raise ConfigError("config.moe_num_active_primary_experts exceeds moe_num_primary_experts")
        if self.head_dim % 2:
            raise ConfigError("config.head_dim must be even (RoPE rotates halves)")
        for name in ("rope_layout", "sliding_window_layout"):
            layout = getattr(self, name)
            if len(layout) != L or any(v not in (0, 1) for v in layout):
                raise ConfigError(f"config.{name} must list 0 or 1 for each of the {L} layers")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("config.rope_theta and rms_norm_eps must be positive")

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def uses_rope(self, layer: int) -> bool:
        return bool(self.rope_layout[layer])

    def uses_sliding_window(self, layer: int) -> bool:
        return bool(self.sliding_window_layout[layer])

    def check_quantizable(self) -> None:
        """Q4_0 packs 32 weights per block along the input dim of every matrix."""
        for name, dim in (("hidden_size", self.hidden_size), ("moe_ffn_hidden_size", self.moe_ffn_hidden_size),
                          ("num_attention_heads*head_dim", self.q_dim)):
            if dim % 32:
                raise ConfigError(f"q4_0 needs {name} to be a multiple of 32, got {dim}")

    # ---- HF config.json -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("config: expected a JSON object")
        missing = [k for k in CONFIG_KEYS if k not in d and k not in _DEFAULTS]
        if missing:
            raise ConfigError(f"config.json is missing {', '.join(missing)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = d.get(f.name, _DEFAULTS.get(f.name))
            values[f.name] = _coerce(f.name, raw, d)
        return cls(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope_layout"] = list(self.rope_layout)
        d["sliding_window_layout"] = list(self.sliding_window_layout)
        return d

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


_DEFAULTS: dict[str, Any] = {"tie_word_embeddings": False}


def _coerce(name: str, raw: Any, d: dict) -> Any:
    try:
        if name in ("rope_layout", "sliding_window_layout"):
            if not isinstance(raw, list):
                raise TypeError
            return tuple(int(v) for v in raw)
        if name in ("rope_theta", "rms_norm_eps"):
            if isinstance(raw, bool):
                raise TypeError
            return float(raw)
        if name in ("moe_primary_router_apply_softmax", "tie_word_embeddings"):
            if not isinstance(raw, bool):
                raise TypeError
            return raw
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise TypeError
        return raw
    except (TypeError, ValueError):
        raise ConfigError(f"config.{name}: unexpected value {raw!r}") from None


def _hybrid_layout(layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """1:3 mix: layer i is global attention without RoPE when i % 4 == 0, else RoPE + sliding window."""
    rope = tuple(0 if i % 4 == 0 else 1 for i in range(layers))
    return rope, rope


_R21, _S21 = _hybrid_layout(52)
_RDEMO, _SDEMO = _hybrid_layout(8)

PRESETS: dict[str, ModelConfig] = {
    "smallthinker-4b-a0.6b": ModelConfig(
        hidden_size=1536, num_hidden_layers=32, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
        moe_num_primary_experts=32, moe_num_active_primary_experts=4, moe_ffn_hidden_size=768,
        vocab_size=151936, rope_theta=1.5e6, rms_norm_eps=1e-6, rope_layout=(1,) * 32,
        sliding_window_layout=(0,) * 32, sliding_window_size=4096,
        moe_primary_router_apply_softmax=False, tie_word_embeddings=False,
    ),
    "smallthinker-21b-a3b": ModelConfig(
        hidden_size=2560, num_hidden_layers=52, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
        moe_num_primary_experts=64, moe_num_active_primary_experts=6, moe_ffn_hidden_size=768,
        vocab_size=151936, rope_theta=1.5e6, rms_norm_eps=1e-6, rope_layout=_R21,
        sliding_window_layout=_S21, sliding_window_size=4096,
        moe_primary_router_apply_softmax=True, tie_word_embeddings=False,
    ),
    # The built-in demo (trained: model/demo_checkpoint.py): tiny, the 21B model's 1:3 NoPE/SWA mix,
    # a short window so that tests and the demo run past it, the vocabulary of its own BPE
    # (927 ids, rounded up to 928; the byte tokenizer of --random-weights needs only 258).
    "st-demo": ModelConfig(
        hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        moe_num_primary_experts=16, moe_num_active_primary_experts=4, moe_ffn_hidden_size=64,
        vocab_size=928, rope_theta=10000.0, rms_norm_eps=1e-6, rope_layout=_RDEMO,
        sliding_window_layout=_SDEMO, sliding_window_size=16,
        moe_primary_router_apply_softmax=False, tie_word_embeddings=True,
    ),
}
