"""Training SmallThinker-architecture models on CPU: the demo model and its expert-level fine-tune.

Rules:
- the math is `model.model`'s forward pass, composed from its own building blocks (`rms_norm`,
  `rope_tables`, `rotate_half`, `route_weights`, `visible_keys`) over a batch dimension and with
  float weights that take gradients: router on the residual before `input_layernorm`, top-k
  experts, ReGLU, RoPE / NoPE and sliding windows per layer as the config says, tied head.
  Nothing else is learned or added to the forward pass;
- the loss is next-token cross-entropy plus `balance_weight` times a load-balancing term
  (E * sum_e f_e * p_e per layer: f_e the share of top-k slots expert e got, p_e its mean
  normalized router score), so every expert is used;
- everything is seeded: the same seed, data and thread count give the same weights;
- a fine-tune (`finetune_experts`) changes only the experts it was given: every other tensor
  leaves it bit for bit as it came in (checked before it returns).

Shape letters: B rows, T tokens per row, N = B*T, D hidden, H query heads, G key/value heads,
Hd head dim, E experts, K active experts, F expert FFN dim, V vocab, L layers.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.model import rms_norm, rope_tables, rotate_half, route_weights, visible_keys
from model.package import EMBED_TENSOR, NORM_TENSOR, expert_tensor_names, layer_tensor_names


class DemoModel(torch.nn.Module):
    """A SmallThinker model's float weights; experts stacked per layer ([E, F, D]) for training."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        if not cfg.tie_word_embeddings:
            raise ValueError("DemoModel trains tied-embedding models only")
        self.cfg = cfg
        D, L, E, F_ = cfg.hidden_size, cfg.num_hidden_layers, cfg.moe_num_primary_experts, cfg.moe_ffn_hidden_size
        gen = torch.Generator().manual_seed(seed)

        def normal(*shape: int, std: float = 0.02) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=gen) * std)

        out_std = 0.02 / math.sqrt(2 * L)  # residual-writing matrices start small (GPT-2)
        self.embed = normal(cfg.vocab_size, D)
        self.final_norm = torch.nn.Parameter(torch.ones(D))
        self.input_norm = torch.nn.Parameter(torch.ones(L, D))
        self.post_norm = torch.nn.Parameter(torch.ones(L, D))
        self.router = normal(L, E, D)
        self.q = normal(L, cfg.q_dim, D)
        self.k = normal(L, cfg.kv_dim, D)
        self.v = normal(L, cfg.kv_dim, D)
        self.o = normal(L, D, cfg.q_dim, std=out_std)
        self.gate = normal(L, E, F_, D)
        self.up = normal(L, E, F_, D)
        self.down = normal(L, E, D, F_, std=out_std)

    # ---- HF tensor names <-> stacked parameters ----------------------------------------------
    def _slots(self) -> list[tuple[str, torch.nn.Parameter, tuple]]:
        """(HF name, parameter, index into it) for every tensor of the checkpoint."""
        slots = [(EMBED_TENSOR, self.embed, ()), (NORM_TENSOR, self.final_norm, ())]
        for i in range(self.cfg.num_hidden_layers):
            n = layer_tensor_names(i)
            for key, p in (("input_layernorm", self.input_norm), ("post_attention_layernorm", self.post_norm),
                           ("router", self.router), ("q_proj", self.q), ("k_proj", self.k), ("v_proj", self.v),
                           ("o_proj", self.o)):
                slots.append((n[key], p, (i,)))
            for e in range(self.cfg.moe_num_primary_experts):
                for part, name in expert_tensor_names(i, e).items():
                    slots.append((name, getattr(self, part), (i, e)))
        return slots

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach()[index].clone() for name, p, index in self._slots()}

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p, index in self._slots():
                p[index].copy_(tensors[name].to(torch.float32))

    # ---- the forward pass ----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, trace: RoutingTrace | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [B, T] at positions 0..T-1 -> (logits [B, T, V], balance loss, expert counts [L, E]).
        `trace`, when given, records what routing did (it changes nothing computed)."""
        cfg = self.cfg
        B, T = tokens.shape
        H, G, Hd, K, E = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.moe_num_active_primary_experts, cfg.moe_num_primary_experts)
        pos = torch.arange(T)
        cos, sin = (t[:, None, :] for t in rope_tables(pos, Hd, cfg.rope_theta))  # [T, 1, Hd]
        h = self.embed[tokens]  # [B, T, D]
        balance = h.new_zeros(())
        counts = []
        # one unbind per stacked parameter: its backward writes one gradient, not one per slice
        router, in_norm, post_norm, wq, wk, wv, wo, gate, up, down = (p.unbind(0) for p in (
            self.router, self.input_norm, self.post_norm, self.q, self.k, self.v, self.o, self.gate, self.up, self.down))
        for i in range(cfg.num_hidden_layers):
            logits = h @ router[i].t()  # [B, T, E]: the residual before input_layernorm
            ids, weights = route_weights(logits, K, cfg.moe_primary_router_apply_softmax)  # [B, T, K]
            x = rms_norm(h, in_norm[i], cfg.rms_norm_eps)
            q = (x @ wq[i].t()).view(B, T, H, Hd)
            k = (x @ wk[i].t()).view(B, T, G, Hd)
            v = (x @ wv[i].t()).view(B, T, G, Hd)
            if cfg.uses_rope(i):
                q = q * cos + rotate_half(q) * sin
                k = k * cos + rotate_half(k) * sin
            window = cfg.sliding_window_size if cfg.uses_sliding_window(i) else None
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [B, H|G, T, Hd]
                attn_mask=visible_keys(pos, pos, window), enable_gqa=True,
            )  # [B, H, T, Hd]
            h = h + attn.transpose(1, 2).reshape(B, T, H * Hd) @ wo[i].t()
            if trace is not None:
                trace.picks.append(ids)
                if i + 1 < cfg.num_hidden_layers:  # look-ahead: the next router on this residual
                    trace.guesses.append(route_weights(h @ router[i + 1].t(), K, cfg.moe_primary_router_apply_softmax)[0])
            y = rms_norm(h, post_norm[i], cfg.rms_norm_eps).reshape(B * T, -1)  # [N, D]
            flat_ids, flat_w = ids.reshape(B * T, K), weights.reshape(B * T, K)
            moe = torch.zeros_like(y)
            for e, (g, u, d) in enumerate(zip(gate[i].unbind(0), up[i].unbind(0), down[i].unbind(0))):
                rows, slot = (flat_ids == e).nonzero(as_tuple=True)
                if rows.numel():
                    ye = y[rows]  # [n, D]
                    act = F.relu(ye @ g.t()) * (ye @ u.t())  # [n, F]: ReGLU
                    if trace is not None:
                        trace.count_active(i, act)
                    moe = moe.index_add(0, rows, (act @ d.t()) * flat_w[rows, slot, None])
            h = h + moe.view(B, T, -1)
            share = torch.bincount(flat_ids.flatten(), minlength=E).to(h.dtype)  # [E]
            counts.append(share)
            scores = logits.softmax(-1) if cfg.moe_primary_router_apply_softmax else logits.sigmoid()
            scores = scores / scores.sum(-1, keepdim=True)  # [B, T, E]
            balance = balance + E * (share / share.sum() * scores.reshape(-1, E).mean(0)).sum()
        out = rms_norm(h, self.final_norm, cfg.rms_norm_eps) @ self.embed.t()  # [B, T, V]
        return out, balance / cfg.num_hidden_layers, torch.stack(counts)


@dataclass
class RoutingTrace:
    """What routing did in a forward pass: per layer the top-k picks [B, T, K], the next layer's
    router applied to this layer's residual after attention (what the engine's look-ahead guesses,
    [B, T, K], one fewer layer), and how many ReGLU activations were zero (`relu(gate) == 0`)."""
    picks: list = field(default_factory=list)
    guesses: list = field(default_factory=list)
    zero: dict = field(default_factory=dict)  # layer -> [zero activations, activations]

    def count_active(self, layer: int, act: torch.Tensor) -> None:
        z = self.zero.setdefault(layer, [0, 0])
        z[0] += int((act == 0).sum())
        z[1] += act.numel()


# ---- data ------------------------------------------------------------------------------------
def token_stream(docs: Sequence[list[int]], eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents joined, each followed by `eos`: (ids [S], start offset of each document)."""
    ids, starts = [], []
    for doc in docs:
        starts.append(len(ids))
        ids.extend(doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)


def rows_at(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Rows [B, length] of the stream, each beginning at a document's start (as a prompt does)."""
    starts = starts[starts + length <= stream.numel()]
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def next_token_loss(logits_of: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, batch: int = 32) -> float:
    """Mean cross-entropy (nats per token) of predicting rows[:, 1:] from rows[:, :-1];
    `logits_of` maps tokens [b, T] to logits [b, T, V] (a DemoModel, an engine, a reference)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for chunk in rows.split(batch):
            logits = logits_of(chunk[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
            n += chunk[:, 1:].numel()
    return total / n


# ---- training --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    steps: int = 400
    batch: int = 16
    length: int = 128  # tokens per row (+1 for the targets)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.01
    balance_weight: float = 0.02
    clip: float = 1.0
    seed: int = 0


def _lr(s: TrainSettings, step: int) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: DemoModel, stream: torch.Tensor, starts: torch.Tensor, s: TrainSettings,
          params: list[torch.nn.Parameter] | None = None, grad_mask: dict | None = None,
          log: Callable[[dict], None] | None = None) -> list[dict]:
    """`s.steps` AdamW steps on rows drawn (seeded) from document starts; returns the log.

    `params` limits what trains (default: everything); `grad_mask` maps a parameter to a 0/1
    tensor its gradient is multiplied by (a fine-tune's frozen experts stay exactly as they were).
    """
    gen = torch.Generator().manual_seed(s.seed)
    params = list(model.parameters()) if params is None else params
    decay = [p for p in params if p.dim() >= 3 and s.weight_decay > 0]  # matrices, not norms
    rest = [p for p in params if not any(p is d for d in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95), eps=1e-8)
    starts = starts[starts + s.length + 1 <= stream.numel()]
    history = []
    started = time.perf_counter()
    for step in range(s.steps):
        picks = starts[torch.randint(len(starts), (s.batch,), generator=gen)]
        rows = torch.stack([stream[p:p + s.length + 1] for p in picks.tolist()])  # [B, T+1]
        logits, balance, counts = model(rows[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        loss = ce + s.balance_weight * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_mask:
            for p, mask in grad_mask.items():
                if p.grad is not None:
                    p.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(params, s.clip)
        for group in opt.param_groups:
            group["lr"] = _lr(s, step)
        opt.step()
        entry = {"step": step, "loss": round(ce.item(), 4), "balance": round(balance.item(), 4),
                 "seconds": round(time.perf_counter() - started, 1),
                 "min_expert_share": round(float((counts / counts.sum(1, keepdim=True)).min()), 4)}
        history.append(entry)
        if log is not None:
            log(entry)
    return history


def expert_traffic(model: DemoModel, rows: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """How many top-k slots each (layer, expert) gets over `rows`: counts [L, E]."""
    total = None
    with torch.no_grad():
        for chunk in rows.split(batch):
            counts = model(chunk)[2]
            total = counts if total is None else total + counts
    return total


def busiest_experts(traffic: torch.Tensor, share: float = 0.25) -> list[tuple[int, int]]:
    """Per layer, the `share` of experts with the most traffic: sorted (layer, expert) pairs."""
    per_layer = max(1, round(traffic.shape[1] * share))
    return sorted((layer, int(e)) for layer in range(traffic.shape[0])
                  for e in traffic[layer].topk(per_layer).indices.tolist())


def finetune_experts(model: DemoModel, experts: list[tuple[int, int]], stream: torch.Tensor, starts: torch.Tensor,
                     s: TrainSettings, log: Callable[[dict], None] | None = None) -> list[dict]:
    """Train only `experts` (gate, up and down of each (layer, expert)); every other tensor is
    frozen, and checked afterwards to be bit-for-bit unchanged."""
    s = replace(s, weight_decay=0.0)  # a decayed frozen weight would move
    before = model.hf_state_dict()
    parts = [model.gate, model.up, model.down]
    mask = torch.zeros(model.cfg.num_hidden_layers, model.cfg.moe_num_primary_experts)
    for layer, e in experts:
        mask[layer, e] = 1.0
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in parts))
    grad_mask = {p: mask.view(*mask.shape, 1, 1) for p in parts}
    history = train(model, stream, starts, s, params=parts, grad_mask=grad_mask, log=log)
    for p in model.parameters():
        p.requires_grad_(True)
    chosen = {name for layer, e in experts for name in expert_tensor_names(layer, e).values()}
    after = model.hf_state_dict()
    moved = [name for name in before if name not in chosen and not torch.equal(before[name], after[name])]
    if moved:
        raise AssertionError(f"fine-tune changed frozen tensors: {moved[:3]}")
    return history
