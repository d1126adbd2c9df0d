"""Tiny SmallThinker HF checkpoints written by the tests themselves.

A checkpoint here is what `from_pretrained` would read: `config.json` with the SmallThinker
fields of DESIGN.md and the weights as `model.safetensors`, or as several files listed in
`model.safetensors.index.json`. Nothing here imports the engine (`model/`): the tests must be
able to catch the engine misreading a checkpoint, so they cannot borrow its idea of one.

Weights are random but shaped so that every part of the forward pass matters:
- embedding rows N(0, 1), so tokens land far apart and the router spreads them over the experts
  (with a small embedding std nearly every token picks the same few experts);
- matrices N(0, 1/in_features): each sub-layer contributes on the order of the residual itself,
  so a wrong expert, wrong routing weight, wrong mask or wrong RoPE moves the logits visibly;
- norm weights around 1 but not 1, so swapping input/post/final norms shows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hybrid_layout(layers: int) -> list[int]:
    """SmallThinker-21B style: layer i is global NoPE when i % 4 == 0, else RoPE + sliding window."""
    return [0 if i % 4 == 0 else 1 for i in range(layers)]


def tiny_config(*, hidden: int = 64, layers: int = 8, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                experts: int = 8, active: int = 2, ffn: int = 64, vocab: int = 320, window: int = 4,
                layout: str = "hybrid", softmax: bool = False, tie: bool = True, rope_theta: float = 10000.0,
                eps: float = 1e-6) -> dict:
    """An HF `config.json` dict with every SmallThinker field DESIGN.md names.

    layout: "hybrid" (1:3 global-NoPE : SWA-RoPE), "rope" (RoPE everywhere, no SWA, the 4B shape)
    or "swa-nope" (sliding window everywhere, no RoPE).
    """
    if layout == "hybrid":
        rope = swa = hybrid_layout(layers)
    elif layout == "rope":
        rope, swa = [1] * layers, [0] * layers
    elif layout == "swa-nope":
        rope, swa = [0] * layers, [1] * layers
    else:
        raise ValueError(layout)
    return {
        "architectures": ["SmallThinkerForCausalLM"],
        "model_type": "smallthinker",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "moe_num_primary_experts": experts,
        "moe_num_active_primary_experts": active,
        "moe_ffn_hidden_size": ffn,
        "vocab_size": vocab,
        "rope_theta": rope_theta,
        "rms_norm_eps": eps,
        "rope_layout": list(rope),
        "sliding_window_layout": list(swa),
        "sliding_window_size": window,
        "moe_primary_router_apply_softmax": softmax,
        "tie_word_embeddings": tie,
        "torch_dtype": "float32",
    }


def tensor_shapes(cfg: dict, *, lm_head: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of a SmallThinker checkpoint, HF names, HF [out, in] shapes."""
    D, F, V = cfg["hidden_size"], cfg["moe_ffn_hidden_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if lm_head:
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (D,),
            f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.self_attn.q_proj.weight": (q, D),
            f"{p}.self_attn.k_proj.weight": (kv, D),
            f"{p}.self_attn.v_proj.weight": (kv, D),
            f"{p}.self_attn.o_proj.weight": (D, q),
            f"{p}.block_sparse_moe.primary_router.weight": (cfg["moe_num_primary_experts"], D),
        })
        for e in range(cfg["moe_num_primary_experts"]):
            x = f"{p}.block_sparse_moe.experts.{e}"
            shapes.update({f"{x}.gate.weight": (F, D), f"{x}.up.weight": (F, D), f"{x}.down.weight": (D, F)})
    return shapes


def random_weights(cfg: dict, seed: int, *, lm_head: bool | None = None, gain: float = 1.0,
                   router_gain: float = 2.0, token_routed: bool = False) -> dict[str, torch.Tensor]:
    """Seeded float32 weights for every tensor of `cfg` (lm_head when `lm_head`, default: not tied).

    `gain` scales what each sub-layer writes into the residual (o_proj, experts' down): 1.0 makes
    every sub-layer as large as the residual, smaller values keep the residual closer to the
    embedding (a better-conditioned model: rounding in one layer is amplified less by the next).
    """
    if lm_head is None:
        lm_head = not cfg["tie_word_embeddings"]
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in tensor_shapes(cfg, lm_head=lm_head).items():
        if name == "model.embed_tokens.weight":
            a = rng.standard_normal(shape)
        elif name.endswith("norm.weight"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("primary_router.weight"):
            a = rng.standard_normal(shape) * (router_gain / np.sqrt(shape[1]))
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[1])
            if name.endswith(("o_proj.weight", "down.weight")):
                a = a * gain
                if token_routed:
                    a[: shape[0] // 2] *= 0.1
        if token_routed and name.endswith("primary_router.weight"):
            a = a * np.sqrt(2.0)
            a[:, shape[1] // 2:] = 0.0
        out[name] = torch.from_numpy(a.astype(np.float32))
    return out


def write_checkpoint(path: str | Path, cfg: dict, weights: dict[str, torch.Tensor], *, dtype: str = "float32",
                     shards: int = 1, raw_config: str | None = None) -> Path:
    """Write config.json + weights; `shards` > 1 splits them over files listed in an index.

    Only float32 tensors (what `random_weights` makes) are cast to `dtype`; a tensor of any other
    dtype (a test's deliberately bad tensor) is written as it is.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg, torch_dtype=dtype)
    (path / "config.json").write_text(raw_config if raw_config is not None else json.dumps(cfg, indent=2))
    tensors = {n: (t.to(DTYPES[dtype]) if t.dtype == torch.float32 else t).contiguous() for n, t in weights.items()}
    if shards <= 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, sorted."""
    return sorted(Path(path).glob("*.safetensors"))


def make_checkpoint(path: str | Path, *, seed: int = 0, dtype: str = "float32", shards: int = 1,
                    **config_overrides) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """tiny_config(**config_overrides) + random_weights(seed), written to `path`."""
    cfg = tiny_config(**config_overrides)
    weights = random_weights(cfg, seed)
    return write_checkpoint(path, cfg, weights, dtype=dtype, shards=shards), cfg, weights
