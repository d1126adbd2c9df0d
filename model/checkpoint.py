"""Where a package's float weights come from: an HF checkpoint directory, or seeded random weights.

Rule: a source hands out float tensors by HF name and checks nothing about shapes (the builder
does); an HF source reads lazily, one tensor at a time, so a model larger than RAM still builds.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.config import ModelConfig
from model.errors import CheckpointError, ConfigError
from model.package import EMBED_TENSOR, LM_HEAD_TENSOR

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class HFCheckpoint:
    """config.json + model.safetensors, or shards listed in model.safetensors.index.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        try:
            raw = json.loads((self.path / "config.json").read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}/config.json: not valid JSON ({e})") from None
        try:
            self.config = ModelConfig.from_hf_dict(raw)
        except ConfigError as e:
            raise CheckpointError(f"{path}/config.json: {e}") from None
        self.raw_config = raw
        self._handles: dict[str, object] = {}
        self._where = self._index()
        tok = self.path / "tokenizer.json"
        self.tokenizer_file = tok if tok.is_file() else None
        self.chat_template = _chat_template(_optional_json(self.path / "tokenizer_config.json"))
        generation = _optional_json(self.path / "generation_config.json") or {}
        self.eos_ids = _id_list(generation.get("eos_token_id", raw.get("eos_token_id")))

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            return {name: file for name, file in weight_map.items()}
        single = self.path / "model.safetensors"
        if not single.is_file():
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        return {name: "model.safetensors" for name in self._open("model.safetensors").keys()}

    def _open(self, file: str):
        if file not in self._handles:
            path = self.path / file
            if path.resolve().parent != self.path.resolve():
                raise CheckpointError(f"{file}: shard outside the checkpoint directory")
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise CheckpointError(f"{file}: missing shard of the checkpoint") from None
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: unreadable safetensors ({e})") from None
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"checkpoint has no tensor {name}")
        try:
            t = self._open(self._where[name]).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{name}: cannot read ({e})") from None
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{name}: unsupported dtype {t.dtype} (fp32, fp16 or bf16 expected)")
        return t

    def lm_head_name(self) -> str | None:
        """lm_head.weight when the checkpoint has it and the config does not tie it to the embedding."""
        return LM_HEAD_TENSOR if self.has(LM_HEAD_TENSOR) and not self.config.tie_word_embeddings else None


def _seed_for(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


class RandomWeights:
    """Shape-true seeded weights: embedding N(0, 1), matrices N(0, 0.02), norms 1.

    Each tensor has its own generator seeded from (seed, name), so a tensor never depends on the
    order of generation.
    """

    def __init__(self, config: ModelConfig, seed: int):
        self.config, self.seed = config, seed
        self.tokenizer_file = self.chat_template = self.eos_ids = None

    def has(self, name: str) -> bool:
        return name != LM_HEAD_TENSOR or not self.config.tie_word_embeddings

    def lm_head_name(self) -> str | None:
        return None if self.config.tie_word_embeddings else LM_HEAD_TENSOR

    def tensor(self, name: str) -> torch.Tensor:
        shape = expected_shape(self.config, name)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return torch.ones(shape)
        gen = torch.Generator().manual_seed(_seed_for(self.seed, name))
        std = 1.0 if name == EMBED_TENSOR else 0.02
        return torch.randn(shape, generator=gen) * std


def _optional_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _chat_template(tokenizer_config: dict | None) -> str | None:
    """tokenizer_config.json's chat template: a string, or HF's list of named ones (the "default")."""
    template = (tokenizer_config or {}).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _id_list(value) -> tuple[int, ...] | None:
    """An HF eos_token_id (an id or a list of ids) as a tuple, or None."""
    ids = value if isinstance(value, list) else [value]
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]
    return tuple(ids) or None


def expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    D = cfg.hidden_size
    if name == EMBED_TENSOR or name == LM_HEAD_TENSOR:
        return (cfg.vocab_size, D)
    if name.endswith("norm.weight"):
        return (D,)
    suffix = name.split(".")[-2]
    shapes = {
        "q_proj": (cfg.q_dim, D), "k_proj": (cfg.kv_dim, D), "v_proj": (cfg.kv_dim, D), "o_proj": (D, cfg.q_dim),
        "primary_router": (cfg.moe_num_primary_experts, D),
        "gate": (cfg.moe_ffn_hidden_size, D), "up": (cfg.moe_ffn_hidden_size, D), "down": (D, cfg.moe_ffn_hidden_size),
    }
    if suffix not in shapes:
        raise CheckpointError(f"no shape known for {name}")
    return shapes[suffix]
