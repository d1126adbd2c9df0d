"""Routing on the trained demo model beside the same architecture with random weights.

    python benchmarks/routing_truth.py --json [--rows 64] [--capacities 0.25,0.5,0.75]

The engine's expert-store defaults (look-ahead on, dense ReGLU) were chosen on random weights.
This measures, in plain torch on the checkpoint's weights (`model.train.DemoModel` with a
`RoutingTrace`), over held-out rows of the demo corpus, for each model:
- experts per layer: how many of the E experts the text uses, the busiest expert's share of the
  top-k slots, the share of the busiest quarter, and the normalized entropy of the popularity;
- look-ahead: of the K experts the next layer's router picks on this layer's residual (what the
  store prefetches), the share the next layer really picks;
- reuse: of a token's K experts in a layer, the share the previous token used in that layer;
- LRU hit rate of one pool of expert slots holding a given share of all experts, decoding the
  rows token by token (a simulation over the recorded picks, not the engine's timing);
- ReGLU activation sparsity per layer: the share of routed activations with relu(gate) == 0,
  the rows a sparse kernel can skip.
Prints one JSON document with the machine; never asserts anything.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model  # noqa: E402,F401  (before torch: the project's thread settings)
import torch  # noqa: E402


def load_models(variant_dir: Path):
    """(trained, random) DemoModels of the demo's config; random = `RandomWeights` seed 0, as
    `stctl model build --preset st-demo --random-weights` would build it."""
    from safetensors.torch import load_file

    from model.checkpoint import RandomWeights
    from model.config import ModelConfig
    from model.train import DemoModel

    cfg = ModelConfig.from_hf_dict(json.loads((variant_dir / "config.json").read_text()))
    trained = DemoModel(cfg)
    trained.load_hf_state_dict(load_file(str(variant_dir / "model.safetensors")))
    random = DemoModel(cfg)
    weights = RandomWeights(cfg, 0)
    random.load_hf_state_dict({name: weights.tensor(name) for name in random.hf_state_dict()})
    return cfg, trained.eval(), random.eval()


def measure(net, rows: torch.Tensor, cfg, capacities: list[float]) -> dict:
    from model.train import RoutingTrace, next_token_loss

    L, E, K = cfg.num_hidden_layers, cfg.moe_num_primary_experts, cfg.moe_num_active_primary_experts
    trace = RoutingTrace()
    with torch.no_grad():
        for chunk in rows.split(16):
            part = RoutingTrace()
            net(chunk, trace=part)
            if not trace.picks:
                trace.picks, trace.guesses = part.picks, part.guesses
            else:
                trace.picks = [torch.cat([a, b]) for a, b in zip(trace.picks, part.picks)]
                trace.guesses = [torch.cat([a, b]) for a, b in zip(trace.guesses, part.guesses)]
            for layer, (z, n) in part.zero.items():
                acc = trace.zero.setdefault(layer, [0, 0])
                acc[0] += z
                acc[1] += n
        loss = next_token_loss(lambda x: net(x)[0], rows)
    layers = []
    for i in range(L):
        picks = trace.picks[i]  # [B, T, K]
        counts = torch.bincount(picks.flatten(), minlength=E).double()
        share = counts / counts.sum()
        nonzero = share[share > 0]
        prev, cur = picks[:, :-1, :], picks[:, 1:, :]
        reuse = (cur[..., :, None] == prev[..., None, :]).any(-1).double().mean()
        entry = {
            "layer": i, "experts_used": int((counts > 0).sum()), "busiest_share": round(float(share.max()), 4),
            "busiest_quarter_share": round(float(share.sort(descending=True).values[:max(1, E // 4)].sum()), 4),
            "popularity_entropy": round(float(-(nonzero * nonzero.log()).sum() / math.log(E)), 4),
            "reuse_previous_token": round(float(reuse), 4),
            "reglu_sparsity": round(trace.zero[i][0] / max(1, trace.zero[i][1]), 4),
        }
        if i + 1 < L:
            guess, actual = trace.guesses[i], trace.picks[i + 1]
            entry["lookahead_hit_rate"] = round(float((guess[..., :, None] == actual[..., None, :]).any(-1)
                                                      .double().mean()), 4)
        layers.append(entry)
    return {
        "heldout_loss": round(loss, 4),
        "lookahead_hit_rate": round(sum(x["lookahead_hit_rate"] for x in layers[:-1]) / (L - 1), 4),
        "reuse_previous_token": round(sum(x["reuse_previous_token"] for x in layers) / L, 4),
        "reglu_sparsity": round(sum(trace.zero[i][0] for i in range(L)) / sum(trace.zero[i][1] for i in range(L)), 4),
        "experts_used_per_layer": [x["experts_used"] for x in layers],
        "busiest_share_per_layer": [x["busiest_share"] for x in layers],
        "lru_hit_rate": {str(c): round(lru_hit_rate(trace.picks, E, c), 4) for c in capacities},
        "layers": layers,
    }


def lru_hit_rate(picks: list[torch.Tensor], experts: int, capacity_share: float) -> float:
    """Hits / lookups of an LRU pool of `capacity_share` of all (layer, expert) pairs, each row
    decoded from an empty pool, token by token, layer by layer."""
    capacity = max(1, round(capacity_share * experts * len(picks)))
    hits = lookups = 0
    rows, tokens = picks[0].shape[:2]
    stacked = torch.stack(picks, 2).tolist()  # [B][T][L][K]
    for b in range(rows):
        pool: OrderedDict = OrderedDict()
        for t in range(tokens):
            for layer, chosen in enumerate(stacked[b][t]):
                for e in chosen:
                    key = (layer, e)
                    lookups += 1
                    if key in pool:
                        hits += 1
                        pool.move_to_end(key)
                    else:
                        pool[key] = True
                        if len(pool) > capacity:
                            pool.popitem(last=False)
    return hits / lookups


def main() -> None:
    from model import demo_checkpoint
    from model.bench import cpu_model
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64, help="held-out rows of 65 tokens")
    ap.add_argument("--capacities", default="0.25,0.5,0.75", help="LRU pool sizes as shares of all experts")
    ap.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    args = ap.parse_args()
    capacities = [float(c) for c in args.capacities.split(",")]
    demo_checkpoint.verify(1)
    v1 = demo_checkpoint.WEIGHTS_DIR / "v1"
    tok = Tokenizer.from_file(str(v1 / "tokenizer.json"))
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    rows = demo_checkpoint.heldout_rows(encode, limit=args.rows)
    cfg, trained, random = load_models(v1)
    out = {
        "machine": {"cpu": cpu_model(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "text": f"{rows.shape[0]} held-out rows of {rows.shape[1]} tokens (demo corpus, plant)",
        "config": {"layers": cfg.num_hidden_layers, "experts": cfg.moe_num_primary_experts,
                   "active": cfg.moe_num_active_primary_experts, "ffn": cfg.moe_ffn_hidden_size},
        "trained": measure(trained, rows, cfg, capacities),
        "random": measure(random, rows, cfg, capacities),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
