"""`stctl model build`: float weights in, a verified, quantized model package out.

Rule: the package appears complete or not at all (PackageWriter), every tensor is checked
against the config's shape before it is written, and the manifest's golden outputs come from
loading the package just written, not from the float weights.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from manifests import ModelManifest, TokenizerSpec
from manifests.errors import ManifestError
from manifests.model_manifest import parse_version
from manifests.names import check_name
from model.checkpoint import HFCheckpoint, RandomWeights, expected_shape
from model.config import ModelConfig
from model.errors import CheckpointError, ConfigError, PackageError
from model.health import DEFAULT_PROMPTS, DEFAULT_STEPS, record_golden, record_heldout
from model.package import (
    EMBED_SHARD, EMBED_TENSOR, HEAD_SHARD, NORM_TENSOR, PackageWriter, expert_shard,
    expert_tensor_names, layer_shard, layer_tensor_names,
)
from model.quant import quantize_q4_0
from model.tokenizer import BYTE_BOS, BYTE_EOS, HFTokenizer

_FP32_SUFFIXES = ("layernorm.weight", "norm.weight", "primary_router.weight")

Progress = Callable[[int, int, str], None]  # (done, total, label)


def _convert(name: str, t: torch.Tensor, quant: str, transpose: bool) -> torch.Tensor:
    if name.endswith(_FP32_SUFFIXES):
        return t.to(torch.float32)
    if transpose:  # quantized from the float weights along the other axis: one rounding, not two
        t = t.t().contiguous()
    return quantize_q4_0(t) if quant == "q4_0" else t.to(torch.bfloat16)


def _is_expert_down(name: str) -> bool:
    return ".block_sparse_moe.experts." in name and name.endswith(".down.weight")


def _shard_plan(cfg: ModelConfig, source) -> list[tuple[str, str, list[str], dict]]:
    """(shard name, kind, HF tensor names, extra entry fields) in a fixed order."""
    head = [NORM_TENSOR] + ([lm] if (lm := source.lm_head_name()) else [])
    plan = [(EMBED_SHARD, "dense", [EMBED_TENSOR], {}), (HEAD_SHARD, "dense", head, {})]
    for i in range(cfg.num_hidden_layers):
        plan.append((layer_shard(i), "dense", list(layer_tensor_names(i).values()), {"layer": i}))
        for e in range(cfg.moe_num_primary_experts):
            plan.append((expert_shard(i, e), "expert", list(expert_tensor_names(i, e).values()), {"layer": i, "expert": e}))
    return plan


def build_package(source, out: str | Path, *, quant: str = "q4_0", name: str, version: str,
                  progress: Progress | None = None, health_min_tokens_per_s: float = 0.0,
                  health_max_rss_bytes: int | None = None, sparse_down: bool = False,
                  golden_prompts: Sequence[str] = DEFAULT_PROMPTS, golden_steps: int = DEFAULT_STEPS,
                  heldout: Heldout | None = None) -> ModelManifest:
    """Quantize `source` (HFCheckpoint or RandomWeights) into a package at `out`.

    `sparse_down` stores every expert's down matrix transposed ([F, D], Q4_0 blocks along D; the
    manifest lists them under `transposed`) so the engine's sparse ReGLU reads only active rows.
    `golden_prompts` are the health check's prompts (`golden_steps` greedy tokens each);
    `heldout` (rows of held-out token ids and where they come from) puts the package's own
    held-out loss into the manifest's health section.
    """
    from model.engine import Engine  # the engine loads the package we just wrote

    if quant not in ("q4_0", "bf16"):
        raise ConfigError(f"quant {quant!r}: expected q4_0 or bf16")
    try:
        check_name(name)
        parse_version(version)
    except ManifestError as e:
        raise PackageError(str(e)) from None
    cfg = source.config
    if quant == "q4_0":
        cfg.check_quantizable()
    if sparse_down and quant != "q4_0":
        raise ConfigError("--sparse-down needs q4_0 (the sparse ReGLU kernels run on Q4_0 blocks)")
    if sparse_down and cfg.hidden_size % 32:
        raise ConfigError(f"--sparse-down needs hidden_size to be a multiple of 32, got {cfg.hidden_size}")
    transposed: list[str] = []
    if cfg.vocab_size < BYTE_EOS + 1 and source.tokenizer_file is None:
        raise ConfigError(f"vocab_size {cfg.vocab_size} is too small for the byte tokenizer (needs {BYTE_EOS + 1})")
    plan = _shard_plan(cfg, source)
    total = len(plan) + 2
    report = progress or (lambda done, total, label: None)
    writer = PackageWriter(out)
    try:
        for n, (shard, kind, names, fields) in enumerate(plan):
            report(n, total, shard)
            tensors = {}
            for tname in names:
                t = source.tensor(tname)
                shape = expected_shape(cfg, tname)
                if tuple(t.shape) != shape:
                    raise CheckpointError(f"{tname}: shape {tuple(t.shape)}, config expects {shape}")
                transpose = sparse_down and _is_expert_down(tname)
                tensors[tname] = _convert(tname, t, quant, transpose)
                if transpose:
                    transposed.append(tname)
            writer.add_shard(shard, kind, tensors, **fields)
        if source.tokenizer_file is not None:
            sha, size = writer.add_file(source.tokenizer_file, "tokenizer.json")
            tok = TokenizerSpec("hf", "tokenizer.json", sha, size, *_special_ids(source),
                                chat_template=source.chat_template, eos_ids=source.eos_ids)
        else:
            tok = TokenizerSpec("byte", bos_id=BYTE_BOS, eos_id=BYTE_EOS)
        manifest = ModelManifest(name=name, version=version, config=cfg.to_hf_dict(), quant=quant,
                                 tokenizer=tok, shards=tuple(writer.shards), transposed=tuple(transposed))
        writer.write_manifest(manifest)
        report(len(plan), total, "golden outputs")
        engine = Engine.load(writer.tmp)
        prompts = [_golden_prompt(engine, text) for text in golden_prompts]
        health = record_golden(engine, prompts, steps=golden_steps, min_decode_tokens_per_s=health_min_tokens_per_s,
                               max_peak_rss_bytes=health_max_rss_bytes, texts=source.tokenizer_file is not None)
        if heldout is not None:
            health = replace(health, heldout=record_heldout(engine, heldout.rows.tolist(), heldout.source))
        del engine
        manifest = replace(manifest, health=health)
        writer.write_manifest(manifest)
        report(total - 1, total, "commit")
        writer.commit()
        report(total, total, "done")
        return manifest
    except BaseException:
        writer.abort()
        raise


@dataclass(frozen=True)
class Heldout:
    rows: torch.Tensor  # [B, T] token ids, each row from a document's start
    source: str  # what the rows are, for the manifest


def _golden_prompt(engine, text: str) -> list[int]:
    ids = engine.tokenizer.encode(text)
    return [i for i in ids if i < engine.config.vocab_size] or [0]


def _special_ids(source: HFCheckpoint) -> tuple[int | None, int | None]:
    raw = source.raw_config
    bos, eos = raw.get("bos_token_id"), raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return (bos if isinstance(bos, int) else None, eos if isinstance(eos, int) else None)


# ---- the three ways `stctl model build` gets weights -----------------------------------------
def build_from_hf(checkpoint_dir: str | Path, out: str | Path, *, name: str | None = None,
                  version: str = "1.0.0", **kw) -> ModelManifest:
    source = HFCheckpoint(checkpoint_dir)
    return build_package(source, out, name=name or _name_from(Path(checkpoint_dir)), version=version, **kw)


def build_demo(out: str | Path, *, variant: int = 1, version: str | None = None, name: str = "st-demo",
               **kw) -> ModelManifest:
    """The trained demo model (`model.demo_checkpoint`): variant 1, or 2 (v1 with a quarter of its
    experts fine-tuned on line 7), built from its HF checkpoint like any other; golden prompts and
    the recorded held-out loss come from the corpus' held-out records."""
    from model import demo_checkpoint

    if variant not in (1, 2):
        raise ConfigError(f"demo variant {variant}: the trained demo has variants 1 and 2")
    with tempfile.TemporaryDirectory(prefix="st-demo-checkpoint-") as scratch:
        source = HFCheckpoint(demo_checkpoint.checkpoint_dir(variant, Path(scratch)))
        tok = HFTokenizer(source.tokenizer_file.read_bytes(), None, None)
        rows = demo_checkpoint.heldout_rows(tok.encode, limit=demo_checkpoint.PACKAGE_EVAL_ROWS)
        heldout = Heldout(rows, f"model.demo_corpus: the first {len(rows)} held-out plant rows")
        return build_package(source, out, name=name, version=version or f"{variant}.0.0",
                             golden_prompts=demo_checkpoint.golden_prompts(), golden_steps=demo_checkpoint.GOLDEN_STEPS,
                             heldout=heldout, **kw)


def build_random(preset: str, out: str | Path, *, seed: int = 0, name: str | None = None,
                 version: str = "1.0.0", **kw) -> ModelManifest:
    cfg = ModelConfig.from_preset(preset)
    return build_package(RandomWeights(cfg, seed), out, name=name or preset, version=version, **kw)


def _name_from(path: Path) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in path.resolve().name.lower())
    return cleaned.strip("-._")[:64] or "model"
