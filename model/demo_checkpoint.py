"""The trained demo checkpoint: how it is made, where it ships, how a build reads it.

Rules:
- v1 ships as a released SmallThinker checkpoint does (`model/demo_weights/v1/`: config.json,
  model.safetensors in bf16, tokenizer.json, tokenizer_config.json, generation_config.json),
  plus `training.json`: the command, settings, corpus, losses and the sha256 of every file;
- v2 is v1 fine-tuned on line 7's records with everything frozen but the quarter of experts that
  material routes to most; it ships only what changed (`demo_weights/v2/experts.safetensors`
  and its `training.json`), and `checkpoint_dir(2, ...)` assembles the full HF checkpoint from v1's
  files plus those tensors (a `model.safetensors.index.json` naming which file holds which
  tensor), so both variants build through the same `HFCheckpoint` path as any checkpoint;
- every file is checked against `training.json` before it is used (CheckpointError otherwise);
- held-out evaluation rows come from the same seeded corpus the record names, so any machine
  recomputes the recorded held-out loss;
- the tokenizer is trained on every material's training text (`tokenizer_texts`), so line 7's
  words have tokens of their own in v1 already.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import demo_corpus
from model.config import ModelConfig
from model.errors import CheckpointError
from model.package import expert_tensor_names

WEIGHTS_DIR = Path(__file__).parent / "demo_weights"
RECORD = "training.json"
V1_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
V2_EXPERTS = "experts.safetensors"
HF_IDENTITY = {"architectures": ["SmallThinkerForCausalLM"], "model_type": "smallthinker", "torch_dtype": "bfloat16"}

CORPUS_SEED = 12
PLANT_DOCS, LINE7_DOCS = 6000, 1500
HELDOUT_EVERY = 10
EVAL_LENGTH = 65  # tokens per held-out row (64 predicted)
TOKENIZER_VOCAB = 1024
GOLDEN_STEPS = 16  # greedy tokens recorded per golden prompt
PACKAGE_EVAL_ROWS = 64  # held-out rows a build runs through the quantized package (4096 tokens)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corpus(material: str) -> tuple[list[str], list[str]]:
    """(train, held-out) documents of a material, as the record's corpus settings make them."""
    count = PLANT_DOCS if material == "plant" else LINE7_DOCS
    return demo_corpus.split(demo_corpus.documents(CORPUS_SEED, count, material), HELDOUT_EVERY)


def read_record(variant: int) -> dict:
    path = WEIGHTS_DIR / f"v{variant}" / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"demo variant {variant}: no {path} (variants 1 and 2 ship with the package)") from None


def verify(variant: int) -> dict:
    """The variant's record, after every file it lists matched its sha256."""
    record = read_record(variant)
    folder = WEIGHTS_DIR / f"v{variant}"
    for name, digest in record["files"].items():
        path = folder / name
        if not path.is_file() or sha256(path) != digest:
            raise CheckpointError(f"demo checkpoint {path}: missing or sha256 differs from {RECORD}")
    return record


def checkpoint_dir(variant: int, scratch: Path) -> Path:
    """A verified HF checkpoint directory of demo `variant`: v1's own folder, or v2 assembled in `scratch`."""
    if variant not in (1, 2):
        raise CheckpointError(f"demo variant {variant}: only 1 and 2 exist (trained checkpoints)")
    verify(1)
    if variant == 1:
        return WEIGHTS_DIR / "v1"
    record = verify(2)
    out = Path(scratch) / "st-demo-v2-checkpoint"
    out.mkdir(parents=True)
    for name in V1_FILES:
        shutil.copyfile(WEIGHTS_DIR / "v1" / name, out / name)
    shutil.copyfile(WEIGHTS_DIR / "v2" / V2_EXPERTS, out / V2_EXPERTS)
    changed = set(load_file(str(out / V2_EXPERTS)))
    base = set(load_file(str(out / "model.safetensors")))
    if not changed <= base or set(record["changed_tensors"]) != changed:
        raise CheckpointError(f"demo v2: {V2_EXPERTS} does not hold exactly the changed expert tensors of v1")
    weight_map = {name: V2_EXPERTS if name in changed else "model.safetensors" for name in sorted(base)}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def heldout_rows(encode: Callable[[str], list[int]], material: str = "plant", length: int = EVAL_LENGTH,
                 limit: int | None = None) -> torch.Tensor:
    """Rows [B, length] of held-out token ids, each starting at a held-out document's start
    (the first `limit` rows, when given)."""
    from model.demo_tokenizer import END_OF_TEXT_ID
    from model.train import rows_at, token_stream

    return rows_at(*token_stream([encode(d) for d in corpus(material)[1]], END_OF_TEXT_ID), length)[:limit]


def tokenizer_texts() -> list[str]:
    """What the tokenizer is trained on: the training text of every material, line 7's too (a
    released tokenizer covers more than its first model's data, and a fine-tune that changes only
    experts cannot change the tokenizer), without chat markers."""
    return [demo_corpus.plain_text(d) for material in demo_corpus.MATERIALS for d in corpus(material)[0]]


def golden_prompts() -> list[str]:
    """One prompt per kind of plant record, each the start of the first held-out record of its kind
    (a record alone, not in a chat exchange)."""
    held = [d for d in corpus("plant")[1] if not demo_corpus.is_chat(d)]
    return [demo_corpus.prompt_of(next(d for d in held if demo_corpus.record_kind(d) == kind))
            for kind in demo_corpus.RECORD_KINDS]


# ---- making the checkpoints (`stctl model train-demo`) --------------------------------------
def _encode_all(tok, docs: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


def _hf_config(cfg: ModelConfig) -> dict:
    from model.demo_tokenizer import END_OF_TEXT_ID

    return {**HF_IDENTITY, **cfg.to_hf_dict(), "bos_token_id": None, "eos_token_id": END_OF_TEXT_ID}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sorted(tensors.items())}, str(path))


def _bf16_model(model, tensors: dict[str, torch.Tensor]):
    """`model` with its weights rounded as the checkpoint stores them (for the recorded losses)."""
    model.load_hf_state_dict({k: v.to(torch.bfloat16) for k, v in tensors.items()})
    return model


def train_v1(out: Path, settings, command: str, log: Callable[[dict], None] | None = None) -> dict:
    """Tokenizer + v1 weights trained from scratch into `out` (an HF checkpoint + training.json)."""
    from model.demo_tokenizer import END_OF_TEXT_ID, train_bpe, write_hf_files
    from model.train import DemoModel, next_token_loss, rows_at, token_stream, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_docs, held = corpus("plant")
    tok = train_bpe(tokenizer_texts(), TOKENIZER_VOCAB)
    write_hf_files(tok, out)
    cfg = replace(ModelConfig.from_preset("st-demo"), vocab_size=_round_up(tok.get_vocab_size(), 32))
    if cfg != ModelConfig.from_preset("st-demo"):
        raise CheckpointError(f"the tokenizer has {tok.get_vocab_size()} ids; set st-demo's vocab_size to "
                              f"{cfg.vocab_size} (model/config.py)")
    stream, starts = token_stream(_encode_all(tok, train_docs), END_OF_TEXT_ID)
    held_rows = rows_at(*token_stream(_encode_all(tok, held), END_OF_TEXT_ID), EVAL_LENGTH)
    torch.manual_seed(settings.seed)
    model = DemoModel(cfg, seed=settings.seed)
    before = next_token_loss(lambda x: model(x)[0], held_rows)
    started = time.perf_counter()
    history = train(model, stream, starts, settings, log=log)
    seconds = time.perf_counter() - started
    tensors = model.hf_state_dict()
    (out / "config.json").write_text(json.dumps(_hf_config(cfg), indent=2, sort_keys=True) + "\n")
    _save_tensors(tensors, out / "model.safetensors")
    _bf16_model(model, tensors)
    record = {
        "command": command, "settings": asdict(settings), "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "corpus": _corpus_record(("plant",), len(train_docs), len(held)),
        "train_tokens": int(stream.numel()), "tokens_seen": settings.steps * settings.batch * settings.length,
        "heldout_loss_at_init": round(before, 4),
        "train_loss_last_20_steps": round(sum(h["loss"] for h in history[-20:]) / min(20, len(history)), 4),
        "heldout_loss": round(next_token_loss(lambda x: model(x)[0], held_rows), 4),
        "heldout_rows": [int(held_rows.shape[0]), EVAL_LENGTH],
    }
    return _finish(out, record, V1_FILES)


def finetune_v2(out: Path, settings, command: str, log: Callable[[dict], None] | None = None) -> dict:
    """v1 fine-tuned on line 7 (plus some plant records, so v1's skills stay) in the experts that
    line 7 routes to most; writes only those experts' tensors to `out`."""
    from model.demo_tokenizer import END_OF_TEXT_ID
    from model.train import DemoModel, busiest_experts, expert_traffic, finetune_experts, next_token_loss, rows_at, token_stream
    from tokenizers import Tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    v1 = WEIGHTS_DIR / "v1"
    verify(1)
    tok = Tokenizer.from_file(str(v1 / "tokenizer.json"))
    cfg = ModelConfig.from_hf_dict(json.loads((v1 / "config.json").read_text()))
    model = DemoModel(cfg)
    model.load_hf_state_dict(load_file(str(v1 / "model.safetensors")))
    new_train, new_held = corpus("line7")
    plant_train, plant_held = corpus("plant")
    new_ids = _encode_all(tok, new_train)
    new_rows = rows_at(*token_stream(_encode_all(tok, new_held), END_OF_TEXT_ID), EVAL_LENGTH)
    plant_rows = rows_at(*token_stream(_encode_all(tok, plant_held), END_OF_TEXT_ID), EVAL_LENGTH)
    traffic = expert_traffic(model, rows_at(*token_stream(new_ids, END_OF_TEXT_ID), EVAL_LENGTH))
    experts = busiest_experts(traffic)
    mixed = new_ids + _encode_all(tok, plant_train[:len(new_train) // 2])  # 2:1 new to old
    stream, starts = token_stream(mixed, END_OF_TEXT_ID)
    logits = lambda x: model(x)[0]  # noqa: E731
    before = {"line7": next_token_loss(logits, new_rows), "plant": next_token_loss(logits, plant_rows)}
    base = model.hf_state_dict()
    started = time.perf_counter()
    history = finetune_experts(model, experts, stream, starts, settings, log=log)
    seconds = time.perf_counter() - started
    changed = {name: t for name, t in model.hf_state_dict().items()
               if name in {n for layer, e in experts for n in expert_tensor_names(layer, e).values()}}
    _save_tensors(changed, out / V2_EXPERTS)
    _bf16_model(model, {**base, **changed})
    record = {
        "command": command, "settings": asdict(settings), "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "base": {"variant": 1, "files": read_record(1)["files"]},
        "corpus": _corpus_record(("line7", "plant"), len(new_train), len(new_held)),
        "experts": [list(p) for p in experts], "changed_tensors": sorted(changed),
        "traffic_share_of_chosen": round(float(sum(traffic[layer, e] for layer, e in experts) / traffic.sum()), 4),
        "train_loss_last_20_steps": round(sum(h["loss"] for h in history[-20:]) / min(20, len(history)), 4),
        "heldout_loss_v1": {k: round(v, 4) for k, v in before.items()},
        "heldout_loss": {"line7": round(next_token_loss(logits, new_rows), 4),
                         "plant": round(next_token_loss(logits, plant_rows), 4)},
    }
    return _finish(out, record, (V2_EXPERTS,))


def _corpus_record(materials: tuple[str, ...], train: int, held: int) -> dict:
    return {"module": "model.demo_corpus", "seed": CORPUS_SEED, "materials": list(materials),
            "documents": {"plant": PLANT_DOCS, "line7": LINE7_DOCS}, "heldout_every": HELDOUT_EVERY,
            "train_documents": train, "heldout_documents": held}


def _finish(out: Path, record: dict, files: tuple[str, ...]) -> dict:
    record["files"] = {name: sha256(out / name) for name in files}
    record["bytes"] = {name: (out / name).stat().st_size for name in files}
    (out / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
