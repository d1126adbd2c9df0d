"""An independent float64 SmallThinker forward pass, written from DESIGN.md alone.

It shares no code with the engine (`model/`): it is numpy in float64, reads the config from a
plain dict of HF `config.json` fields and the weights from a dict of HF tensor names. What it
computes, per DESIGN.md "SmallThinker forward pass":

    h = embed[ids]
    for each layer i:
        router logits = primary_router(h)                      # h *before* input_layernorm
        top-k experts; weights = softmax(top-k logits)          if moe_primary_router_apply_softmax
                                 sigmoid(top-k) / sum(sigmoid)  otherwise
        x = RMSNorm(h) * input_layernorm
        GQA attention, no biases, no QK-norm, scale 1/sqrt(head_dim), causal;
            RoPE (NeoX rotate-half, full head dim, rope_theta) only if rope_layout[i] == 1;
            if sliding_window_layout[i] == 1, query i sees key j only when 0 <= i - j < window
        h += o_proj(attention)
        y = RMSNorm(h) * post_attention_layernorm
        h += sum_k w_k * down_k(relu(gate_k(y)) * up_k(y))      # ReGLU experts
    logits = lm_head(RMSNorm(h) * norm)   (lm_head.weight if given, else the embedding)

`load_package_weights` reads a model package's shards with safetensors and turns Q4_0 blocks back
into floats with `gguf.quants` (ggml's own codec), never with the engine's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _rope_neox(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x [T, heads, Hd] rotated by position: pairs (j, j + Hd/2), frequency theta^(-2j/Hd)."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = theta ** (-(2.0 * np.arange(half)) / hd)  # [Hd/2]
    angle = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, Hd/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


@dataclass
class Routing:
    """What the router picked in one layer: expert ids [T, K] (best first), their weights [T, K], and
    the margin [T] between the k-th and the (k+1)-th router logit (how close the choice was)."""

    experts: np.ndarray
    weights: np.ndarray
    margin: np.ndarray


@dataclass
class ReferenceResult:
    logits: np.ndarray  # [T, V] float64
    routing: list[Routing] = field(default_factory=list)  # one per layer


def _route(h: np.ndarray, router: np.ndarray, k: int, softmax: bool) -> Routing:
    logits = h @ router.T  # [T, E]
    order = np.argsort(-logits, axis=-1, kind="stable")
    top_ids = order[:, :k]
    top = np.take_along_axis(logits, top_ids, axis=-1)  # [T, K]
    if k < logits.shape[1]:
        margin = top[:, -1] - np.take_along_axis(logits, order[:, k:k + 1], axis=-1)[:, 0]
    else:
        margin = np.full(logits.shape[0], np.inf)
    if softmax:
        w = _softmax(top, axis=-1)
    else:
        s = 1.0 / (1.0 + np.exp(-top))
        w = s / np.sum(s, axis=-1, keepdims=True)
    return Routing(top_ids, w, margin)


def _attention(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, wo: np.ndarray, *, heads: int,
               kv_heads: int, head_dim: int, rope: bool, theta: float, window: int | None) -> np.ndarray:
    t = x.shape[0]
    q = (x @ wq.T).reshape(t, heads, head_dim)
    k = (x @ wk.T).reshape(t, kv_heads, head_dim)
    v = (x @ wv.T).reshape(t, kv_heads, head_dim)
    pos = np.arange(t)
    if rope:
        q = _rope_neox(q, pos, theta)
        k = _rope_neox(k, pos, theta)
    delta = pos[:, None] - pos[None, :]  # query i, key j -> i - j
    visible = delta >= 0
    if window is not None:
        visible &= delta < window
    group = heads // kv_heads  # query heads per key/value head (HF repeat_kv order)
    out = np.empty((t, heads, head_dim))
    for hq in range(heads):
        g = hq // group
        scores = (q[:, hq, :] @ k[:, g, :].T) / np.sqrt(head_dim)  # [T, T]
        scores = np.where(visible, scores, -np.inf)
        out[:, hq, :] = _softmax(scores, axis=-1) @ v[:, g, :]
    return out.reshape(t, heads * head_dim) @ wo.T


def reference_forward(config: dict, weights: dict[str, np.ndarray], token_ids, *,
                      router_input: str = "residual") -> ReferenceResult:
    """Logits [T, V] (float64) for `token_ids` at positions 0..T-1, plus each layer's routing.

    `router_input="normed"` routes on RMSNorm(h) instead of the residual: a deliberately wrong
    model, used only to show that a test fixture can tell the two apart.
    """
    if router_input not in ("residual", "normed"):
        raise ValueError(router_input)
    c = config
    w = {name: np.asarray(a, dtype=np.float64) for name, a in weights.items()}
    ids = np.asarray(list(token_ids), dtype=np.int64)
    eps = float(c["rms_norm_eps"])
    heads, kv_heads, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    k_active = c["moe_num_active_primary_experts"]
    h = w[EMBED][ids]  # [T, D]
    routing = []
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = _rms_norm(h, w[f"{p}.input_layernorm.weight"], eps)
        r = _route(h if router_input == "residual" else x, w[f"{p}.block_sparse_moe.primary_router.weight"],
                   k_active, bool(c["moe_primary_router_apply_softmax"]))
        routing.append(r)
        h = h + _attention(
            x, w[f"{p}.self_attn.q_proj.weight"], w[f"{p}.self_attn.k_proj.weight"],
            w[f"{p}.self_attn.v_proj.weight"], w[f"{p}.self_attn.o_proj.weight"],
            heads=heads, kv_heads=kv_heads, head_dim=hd, rope=c["rope_layout"][i] == 1,
            theta=float(c["rope_theta"]),
            window=c["sliding_window_size"] if c["sliding_window_layout"][i] == 1 else None,
        )
        y = _rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], eps)
        moe = np.zeros_like(h)
        for t in range(h.shape[0]):
            for slot in range(k_active):
                e = int(r.experts[t, slot])
                x_e = f"{p}.block_sparse_moe.experts.{e}"
                act = np.maximum(w[f"{x_e}.gate.weight"] @ y[t], 0.0) * (w[f"{x_e}.up.weight"] @ y[t])
                moe[t] += r.weights[t, slot] * (w[f"{x_e}.down.weight"] @ act)
        h = h + moe
    head = w[LM_HEAD] if LM_HEAD in w else w[EMBED]
    logits = _rms_norm(h, w[FINAL_NORM], eps) @ head.T
    return ReferenceResult(logits, routing)


def reference_logits(config: dict, weights: dict[str, np.ndarray], token_ids) -> np.ndarray:
    return reference_forward(config, weights, token_ids).logits


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


# ---- reading a package without the engine ------------------------------------------------------
def read_package_manifest(package_dir: str | Path) -> dict:
    return json.loads((Path(package_dir) / "manifest.json").read_text())


def load_package_weights(package_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of every shard of a package, as float64 arrays in HF [out, in] layout.

    uint8 tensors of a `q4_0` package are GGML Q4_0 blocks: dequantized with `gguf.quants`.
    Others (bf16 matrices, fp32 norms and routers) are widened exactly.
    """
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    package_dir = Path(package_dir)
    manifest = read_package_manifest(package_dir)
    transposed = set(manifest.get("transposed") or [])
    out: dict[str, np.ndarray] = {}
    for shard in manifest["shards"]:
        for name, t in load_file(str(package_dir / shard["file"])).items():
            if t.dtype == torch.uint8:
                assert manifest["quant"] == "q4_0", f"{name}: uint8 tensor in a {manifest['quant']} package"
                a = dequantize(t.numpy(), GGMLQuantizationType.Q4_0).astype(np.float64)
            else:
                a = t.to(torch.float64).numpy()
            if name in transposed:
                a = a.T
            assert name not in out, f"{name} stored twice in the package"
            out[name] = np.ascontiguousarray(a)
    return out
