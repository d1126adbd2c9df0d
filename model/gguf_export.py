"""Export a model package to a GGUF file that llama.cpp loads as its `smallthinker` architecture.

Rule: weights are copied, never recomputed. Every Q4_0 matrix goes into the GGUF byte for byte as
the package's verified shard holds it (a layer's experts stacked in expert order into one 3D
tensor), norms and routers stay f32. The file appears complete or not at all (temp file in the
same folder, then `os.replace`) and never replaces an existing file. A package whose layout
llama.cpp cannot express is refused with a PackageError; where llama.cpp only approximates it
(its sliding window is always 4096 tokens), the result lists the difference in `llama_cpp_notes`.

What llama.cpp reads (src/models/smallthinker.cpp, llama-model.cpp of llama.cpp):
- `smallthinker.attention.sliding_window` present and > 0 switches SWA on; the window itself is
  then forced to 4096, the per-layer `sliding_window_pattern` array says which layers slide, and
  RoPE is skipped on every layer i with i % 4 == 0. Without that key: no SWA, RoPE everywhere.
- `expert_gating_func` 1 = softmax, 2 = sigmoid, over all router logits, then top-k and
  renormalised to sum 1: the same weights as DESIGN.md's softmax/sigmoid over the top-k.
- `output.weight` absent means the output head is the token embedding (tied).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.constants import GGML_QUANT_VERSION

from common.files import put_in_place
from manifests import ManifestError, ModelManifest
from model.config import ModelConfig
from model.errors import ConfigError, PackageError
from model.package import (
    EMBED_SHARD, EMBED_TENSOR, HEAD_SHARD, LM_HEAD_TENSOR, NORM_TENSOR, expert_shard, expert_tensor_names,
    layer_shard, layer_tensor_names, load_shard, read_manifest, read_verified,
)
from model.quant import QK4_0, Q4_0_BYTES

ARCH = "smallthinker"
LLAMA_CPP_SWA_WINDOW = 4096  # llama.cpp overrides any sliding window with this
LLAMA_CPP_NOPE_STEP = 4  # with SWA on, llama.cpp skips RoPE on layers i % 4 == 0
CONTEXT_LENGTH = 4096  # n_ctx_train written to the file; the config has no max position

Progress = Callable[[int, int, str], None]  # (done, total, label)
Loader = Callable[[], np.ndarray]


@dataclass(frozen=True)
class _Tensor:
    """One GGUF tensor: its name, numpy shape as stored (uint8 bytes for Q4_0), type, and a loader."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    load: Loader

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.qtype == GGMLQuantizationType.Q4_0 else np.float32)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def export_gguf(package_dir: str | os.PathLike, out_path: str | os.PathLike,
                progress: Progress | None = None) -> dict:
    """Write the package at `package_dir` as a llama.cpp GGUF at `out_path`.

    Returns `{"path", "tensors", "bytes", "arch", "llama_cpp_notes"}`. Raises PackageError (its
    IntegrityError subclass for a corrupt shard) with a one-line message on a package it cannot
    export, an existing `out_path`, or a file it cannot write.
    """
    package_dir, out = Path(package_dir), Path(out_path)
    if out.exists():
        raise PackageError(f"{out}: already exists; refusing to overwrite")
    manifest = read_manifest(package_dir)
    cfg = _exportable_config(manifest)
    notes = _llama_cpp_notes(cfg)
    plan = _tensor_plan(package_dir, manifest, cfg)
    report = progress or (lambda done, total, label: None)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    except OSError as e:
        raise PackageError(f"{out}: cannot write there ({e.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write_file(tmp, package_dir, manifest, cfg, plan, notes, report)
        os.chmod(tmp, 0o644)  # mkstemp made it private; a model file is for other users' runtimes too
        if out.exists():
            raise PackageError(f"{out}: appeared while exporting; refusing to overwrite")
        put_in_place(tmp, out)
    except OSError as e:
        raise PackageError(f"{out}: writing failed ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    report(len(plan), len(plan), "done")
    return {"path": str(out), "tensors": len(plan), "bytes": out.stat().st_size, "arch": ARCH,
            "llama_cpp_notes": notes}


def _write_file(path: Path, package_dir: Path, manifest: ModelManifest, cfg: ModelConfig, plan: list[_Tensor],
                notes: list[str], report: Progress) -> None:
    """Header, metadata and tensor table first, then each tensor's data as its loader reads it."""
    writer = GGUFWriter(None, ARCH)
    try:
        _write_metadata(writer, manifest, cfg)
        _write_vocabulary(writer, package_dir, manifest, cfg, notes)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, t in enumerate(plan):
            report(done, len(plan), t.name)
            writer.write_tensor_data(_checked(t, t.load()))
    finally:
        writer.close()
    _fsync(path)


# ---- what can be exported ----------------------------------------------------------------------
def _exportable_config(manifest: ModelManifest) -> ModelConfig:
    if manifest.quant != "q4_0":
        raise PackageError(f"package quant is {manifest.quant}; GGUF export copies Q4_0 blocks, "
                           "so it needs a q4_0 package")
    if manifest.transposed:
        raise PackageError(f"package stores {len(manifest.transposed)} matrices transposed (built with --sparse-down); "
                           "their Q4_0 blocks run along the other dimension and would need re-quantizing, so "
                           "export a package built without --sparse-down")
    try:
        cfg = ModelConfig.from_hf_dict(manifest.config)
        cfg.check_quantizable()
    except ConfigError as e:
        raise PackageError(f"manifest config: {e}") from None
    expected_rope = llama_cpp_rope_layout(cfg)
    if cfg.rope_layout != expected_rope:
        raise PackageError(
            f"rope_layout {list(cfg.rope_layout)} cannot be expressed for llama.cpp, which uses "
            f"{list(expected_rope)} for this sliding-window layout")
    return cfg


def llama_cpp_rope_layout(cfg: ModelConfig) -> tuple[int, ...]:
    """The RoPE layout llama.cpp computes: NoPE on i % 4 == 0 when any layer slides, else RoPE everywhere."""
    if any(cfg.sliding_window_layout):
        return tuple(0 if i % LLAMA_CPP_NOPE_STEP == 0 else 1 for i in range(cfg.num_hidden_layers))
    return (1,) * cfg.num_hidden_layers


def _llama_cpp_notes(cfg: ModelConfig) -> list[str]:
    window = cfg.sliding_window_size
    if any(cfg.sliding_window_layout) and window != LLAMA_CPP_SWA_WINDOW:
        return [f"llama.cpp slides a {LLAMA_CPP_SWA_WINDOW}-token window, the package {window}: outputs agree "
                f"only while the context is at most {min(window, LLAMA_CPP_SWA_WINDOW)} tokens"]
    return []


# ---- metadata ----------------------------------------------------------------------------------
def _write_metadata(w: GGUFWriter, manifest: ModelManifest, cfg: ModelConfig) -> None:
    w.add_name(manifest.name)
    w.add_version(manifest.version)
    w.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.moe_ffn_hidden_size)
    w.add_expert_feed_forward_length(cfg.moe_ffn_hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.moe_num_primary_experts)
    w.add_expert_used_count(cfg.moe_num_active_primary_experts)
    w.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX if cfg.moe_primary_router_apply_softmax
                             else ExpertGatingFuncType.SIGMOID)
    w.add_vocab_size(cfg.vocab_size)
    if any(cfg.sliding_window_layout):
        w.add_sliding_window(cfg.sliding_window_size)
        w.add_sliding_window_pattern([bool(v) for v in cfg.sliding_window_layout])


# ---- vocabulary ----------------------------------------------------------------------------------
def _write_vocabulary(w: GGUFWriter, package_dir: Path, manifest: ModelManifest, cfg: ModelConfig,
                      notes: list[str]) -> None:
    spec = manifest.tokenizer
    if spec.kind == "byte":
        _write_byte_vocabulary(w, cfg.vocab_size)
    else:
        data = read_verified(package_dir, None, file=spec.file, sha256=spec.sha256, size=spec.size)
        _write_bpe_vocabulary(w, data, cfg.vocab_size, notes)
    if spec.bos_id is not None:
        w.add_bos_token_id(spec.bos_id)
    if spec.eos_id is not None:
        w.add_eos_token_id(spec.eos_id)
    w.add_add_bos_token(False)  # the engine never prepends BOS; keep llama.cpp's ids the same
    w.add_add_eos_token(False)
    if spec.chat_template is not None:
        w.add_chat_template(spec.chat_template)


SPM_SPACE = "\u2581"  # SentencePiece writes a space as this character before looking tokens up


def _write_byte_vocabulary(w: GGUFWriter, vocab_size: int) -> None:
    """The byte tokenizer (id = UTF-8 byte, 256 BOS, 257 EOS) as a SentencePiece byte-fallback vocab.

    Every byte is a `<0xNN>` byte token except the space, which SentencePiece rewrites to U+2581
    before lookup, so id 32 is that piece: llama.cpp then tokenizes text to the same ids.
    """
    tokens = [SPM_SPACE if b == 0x20 else f"<0x{b:02X}>" for b in range(256)] + ["<s>", "</s>"]
    types = [TokenType.NORMAL if b == 0x20 else TokenType.BYTE for b in range(256)] + [TokenType.CONTROL] * 2
    tokens += [f"<unused{i}>" for i in range(len(tokens), vocab_size)]
    types += [TokenType.UNUSED] * (vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab_size)
    w.add_token_types(types)
    w.add_add_space_prefix(False)


# The pre-tokenizer regex of Qwen2/Qwen3 tokenizers (SmallThinker's vocabulary), llama.cpp's "qwen2".
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _write_bpe_vocabulary(w: GGUFWriter, data: bytes, vocab_size: int, notes: list[str]) -> None:
    """A tokenizer.json byte-level BPE as llama.cpp's "gpt2" vocab, padded to `vocab_size` rows."""
    try:
        tok = json.loads(data)
        model = tok["model"]
        if model.get("type") != "BPE":
            raise PackageError(f"tokenizer.json model {model.get('type')!r}: only BPE exports to GGUF")
        vocab: dict[str, int] = dict(model["vocab"])
        added = {a["id"]: a for a in tok.get("added_tokens") or []}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise PackageError(f"tokenizer.json: unreadable for GGUF export ({e})") from None
    vocab.update({a["content"]: i for i, a in added.items()})
    if vocab and max(vocab.values()) >= vocab_size:
        raise PackageError(f"tokenizer.json has ids up to {max(vocab.values())}, vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = TokenType.NORMAL
    for i, a in added.items():
        types[i] = TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED
    pre = "qwen2" if _QWEN2_SPLIT in _split_regexes(tok.get("pre_tokenizer")) else "default"
    if pre == "default":
        notes.append("tokenizer.json pre-tokenizer is not Qwen2's; llama.cpp splits text with its default "
                     "GPT-2 rules, so its text tokenization may differ (token ids fed directly agree)")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)


def _split_regexes(node: object) -> list[str]:
    """Every `Split` regex inside a tokenizer.json pre_tokenizer (a Sequence nests them)."""
    if isinstance(node, list):
        return [r for child in node for r in _split_regexes(child)]
    if not isinstance(node, dict):
        return []
    own = [node["pattern"]["Regex"]] if isinstance(node.get("pattern"), dict) and "Regex" in node["pattern"] else []
    return own + _split_regexes(node.get("pretokenizers"))


# ---- tensors -----------------------------------------------------------------------------------
def _entry(manifest: ModelManifest, name: str):
    try:
        return manifest.shard(name)
    except ManifestError:
        raise PackageError(f"manifest lists no shard {name!r}") from None


def _q4_shape(out_f: int, in_f: int) -> tuple[int, int]:
    return out_f, in_f // QK4_0 * Q4_0_BYTES


class _Shard:
    """One shard, read and verified on first use; each tensor is released once handed out."""

    def __init__(self, package_dir: Path, manifest: ModelManifest, name: str):
        self.package_dir, self.entry = package_dir, _entry(manifest, name)
        self._tensors: dict[str, torch.Tensor] | None = None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = load_shard(self.package_dir, self.entry)
        return self._tensors

    def take(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise PackageError(f"{self.entry.file}: tensor {name} missing")
        return _as_numpy(self.tensors.pop(name))


class _ExpertStack:
    """A layer's experts read once, handed out as [E, out, bytes] stacks, each released once taken."""

    def __init__(self, package_dir: Path, manifest: ModelManifest, layer: int, n_experts: int):
        self.shards = [(_Shard(package_dir, manifest, expert_shard(layer, e)), expert_tensor_names(layer, e))
                       for e in range(n_experts)]
        self.stacks: dict[str, np.ndarray] | None = None

    def take(self, part: str) -> np.ndarray:
        if self.stacks is None:
            experts = [{p: shard.take(name) for p, name in names.items()} for shard, names in self.shards]
            self.stacks = {p: np.stack([ex[p] for ex in experts]) for p in ("gate", "up", "down")}
        return self.stacks.pop(part)


def _tensor_plan(package_dir: Path, manifest: ModelManifest, cfg: ModelConfig) -> list[_Tensor]:
    """Every GGUF tensor in file order, each with a loader that reads (and verifies) its shard then."""
    D, V = cfg.hidden_size, cfg.vocab_size
    Q4, F32 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.F32
    embed, head = _Shard(package_dir, manifest, EMBED_SHARD), _Shard(package_dir, manifest, HEAD_SHARD)
    plan = [_Tensor("token_embd.weight", _q4_shape(V, D), Q4, _loader(embed, EMBED_TENSOR)),
            _Tensor("output_norm.weight", (D,), F32, _loader(head, NORM_TENSOR))]
    if not cfg.tie_word_embeddings and LM_HEAD_TENSOR in head.tensors:  # as the engine decides
        plan.append(_Tensor("output.weight", _q4_shape(V, D), Q4, _loader(head, LM_HEAD_TENSOR)))
    for i in range(cfg.num_hidden_layers):
        plan += _layer_plan(i, cfg, _Shard(package_dir, manifest, layer_shard(i)),
                            _ExpertStack(package_dir, manifest, i, cfg.moe_num_primary_experts))
    return plan


def _layer_plan(i: int, cfg: ModelConfig, layer: _Shard, experts: _ExpertStack) -> list[_Tensor]:
    D, E, F = cfg.hidden_size, cfg.moe_num_primary_experts, cfg.moe_ffn_hidden_size
    Q4, F32 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.F32
    n, blk = layer_tensor_names(i), f"blk.{i}"
    return [
        _Tensor(f"{blk}.attn_norm.weight", (D,), F32, _loader(layer, n["input_layernorm"])),
        _Tensor(f"{blk}.attn_q.weight", _q4_shape(cfg.q_dim, D), Q4, _loader(layer, n["q_proj"])),
        _Tensor(f"{blk}.attn_k.weight", _q4_shape(cfg.kv_dim, D), Q4, _loader(layer, n["k_proj"])),
        _Tensor(f"{blk}.attn_v.weight", _q4_shape(cfg.kv_dim, D), Q4, _loader(layer, n["v_proj"])),
        _Tensor(f"{blk}.attn_output.weight", _q4_shape(D, cfg.q_dim), Q4, _loader(layer, n["o_proj"])),
        _Tensor(f"{blk}.ffn_norm.weight", (D,), F32, _loader(layer, n["post_attention_layernorm"])),
        _Tensor(f"{blk}.ffn_gate_inp.weight", (E, D), F32, _loader(layer, n["router"])),
        _Tensor(f"{blk}.ffn_gate_exps.weight", (E, *_q4_shape(F, D)), Q4, _loader(experts, "gate")),
        _Tensor(f"{blk}.ffn_up_exps.weight", (E, *_q4_shape(F, D)), Q4, _loader(experts, "up")),
        _Tensor(f"{blk}.ffn_down_exps.weight", (E, *_q4_shape(D, F)), Q4, _loader(experts, "down")),
    ]


def _loader(source: _Shard | _ExpertStack, key: str) -> Loader:
    return lambda: source.take(key)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.dtype == torch.uint8 else t.to(torch.float32).numpy()


def _checked(t: _Tensor, data: np.ndarray) -> np.ndarray:
    if data.dtype != t.dtype or tuple(data.shape) != t.shape:
        raise PackageError(f"{t.name}: package holds {data.dtype} {tuple(data.shape)}, expected {t.dtype} {t.shape}")
    return np.ascontiguousarray(data)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
