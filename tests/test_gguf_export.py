"""GGUF export: the file llama.cpp's `smallthinker` loader reads, checked with gguf's own reader.

Every check reads the package's shards with safetensors directly (not through the engine), so an
export that reorders experts, swaps gate/up or re-quantizes a single block shows up as a byte
mismatch.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from safetensors.numpy import load_file

from model import demo_checkpoint
from model.build import build_demo, build_from_hf, build_package, build_random
from model.checkpoint import RandomWeights
from model.config import ModelConfig
from model.errors import PackageError
from model.gguf_export import export_gguf
from model.package import read_manifest
from hf_fixtures import make_checkpoint

Q4_0, F32 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.F32

# RoPE everywhere, no SWA, untied lm_head: the 4B preset's shape, shrunk.
TINY = ModelConfig(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    moe_num_primary_experts=4, moe_num_active_primary_experts=2, moe_ffn_hidden_size=64, vocab_size=288,
    rope_theta=1.5e6, rms_norm_eps=1e-6, rope_layout=(1, 1), sliding_window_layout=(0, 0), sliding_window_size=4096,
    moe_primary_router_apply_softmax=True, tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("gguf-demo")
    build_demo(root / "pkg")
    result = export_gguf(root / "pkg", root / "demo.gguf")
    return root / "pkg", root / "demo.gguf", result


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf-untied")
    build_package(RandomWeights(TINY, seed=3), root / "pkg", name="tiny", version="1.0.0")
    export_gguf(root / "pkg", root / "tiny.gguf")
    return root / "pkg", root / "tiny.gguf"


def field(reader: GGUFReader, key: str):
    return reader.get_field(key).contents()


def shard_tensors(pkg: Path, shard: str) -> dict[str, np.ndarray]:
    manifest = read_manifest(pkg)
    return load_file(pkg / manifest.shard(shard).file)


def tensor(reader: GGUFReader, name: str):
    found = [t for t in reader.tensors if t.name == name]
    assert found, f"{name} missing from the GGUF"
    return found[0]


def test_metadata_matches_the_config(demo):
    pkg, path, result = demo
    cfg = ModelConfig.from_hf_dict(read_manifest(pkg).config)
    r = GGUFReader(path)
    assert result["path"] == str(path) and result["bytes"] == path.stat().st_size
    assert field(r, "general.architecture") == "smallthinker"
    assert field(r, "general.file_type") == 2  # MOSTLY_Q4_0
    expected = {
        "embedding_length": cfg.hidden_size, "block_count": cfg.num_hidden_layers,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
        "rope.dimension_count": cfg.head_dim, "expert_count": cfg.moe_num_primary_experts,
        "expert_used_count": cfg.moe_num_active_primary_experts,
        "expert_feed_forward_length": cfg.moe_ffn_hidden_size,
        "expert_gating_func": 2,  # sigmoid: the demo does not apply softmax
        "attention.sliding_window": cfg.sliding_window_size, "vocab_size": cfg.vocab_size,
    }
    for key, value in expected.items():
        assert field(r, f"smallthinker.{key}") == value, key
    assert field(r, "smallthinker.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(r, "smallthinker.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert field(r, "smallthinker.attention.sliding_window_pattern") == [bool(v) for v in cfg.sliding_window_layout]
    # llama.cpp forces a 4096 window; the export says so instead of hiding it
    assert any("4096" in note for note in result["llama_cpp_notes"])


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Path:
    """The st-demo shape with random weights: the byte tokenizer (the trained demo has a BPE)."""
    root = tmp_path_factory.mktemp("gguf-bytes")
    build_random("st-demo", root / "pkg", seed=1)
    export_gguf(root / "pkg", root / "bytes.gguf")
    return root / "bytes.gguf"


def test_byte_vocabulary_maps_ids_to_bytes(byte_level):
    r = GGUFReader(byte_level)
    tokens = field(r, "tokenizer.ggml.tokens")
    vocab = ModelConfig.from_preset("st-demo").vocab_size
    assert field(r, "tokenizer.ggml.model") == "llama" and len(tokens) == vocab
    assert tokens[ord("A")] == "<0x41>" and tokens[0x20] == "\u2581"
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == (256, 257)
    assert field(r, "tokenizer.ggml.add_bos_token") is False


def test_demo_bpe_exports_as_qwen2_vocabulary_with_its_special_tokens(demo):
    pkg, path, result = demo
    r = GGUFReader(path)
    tokens = field(r, "tokenizer.ggml.tokens")
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "qwen2"
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] and field(r, "tokenizer.ggml.merges")
    assert field(r, "tokenizer.ggml.eos_token_id") == read_manifest(pkg).tokenizer.eos_id == 0
    assert not any("tokenizer" in note for note in result["llama_cpp_notes"])


def test_demo_gguf_carries_the_chat_template_and_the_package_name(demo):
    pkg, path, _ = demo
    manifest = read_manifest(pkg)
    checkpoint = demo_checkpoint.WEIGHTS_DIR / "v1"
    template = json.loads((checkpoint / "tokenizer_config.json").read_text())["chat_template"]
    eos = json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"]
    assert manifest.tokenizer.chat_template == template and list(manifest.tokenizer.eos_ids) == eos == [0, 2]
    r = GGUFReader(path)
    assert field(r, "tokenizer.chat_template") == template
    assert (field(r, "general.name"), field(r, "general.version")) == (manifest.name, manifest.version)


def test_a_package_without_a_chat_template_exports_none(byte_level):
    assert GGUFReader(byte_level).get_field("tokenizer.chat_template") is None


def test_tensor_shapes_and_types(demo):
    pkg, path, result = demo
    cfg = ModelConfig.from_hf_dict(read_manifest(pkg).config)
    D, F, E, V = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.moe_num_primary_experts, cfg.vocab_size
    r = GGUFReader(path)
    names = [t.name for t in r.tensors]
    assert len(names) == result["tensors"] == 2 + 10 * cfg.num_hidden_layers
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    expected = {
        "token_embd.weight": (Q4_0, [D, V]), "output_norm.weight": (F32, [D]),
        "blk.3.attn_norm.weight": (F32, [D]), "blk.3.ffn_norm.weight": (F32, [D]),
        "blk.3.attn_q.weight": (Q4_0, [D, cfg.q_dim]), "blk.3.attn_k.weight": (Q4_0, [D, cfg.kv_dim]),
        "blk.3.attn_v.weight": (Q4_0, [D, cfg.kv_dim]), "blk.3.attn_output.weight": (Q4_0, [cfg.q_dim, D]),
        "blk.3.ffn_gate_inp.weight": (F32, [D, E]),
        "blk.3.ffn_gate_exps.weight": (Q4_0, [D, F, E]), "blk.3.ffn_up_exps.weight": (Q4_0, [D, F, E]),
        "blk.3.ffn_down_exps.weight": (Q4_0, [F, D, E]),
    }
    for name, (qtype, shape) in expected.items():
        t = tensor(r, name)
        assert (t.tensor_type, list(t.shape)) == (qtype, shape), name


def test_q4_0_bytes_are_the_package_bytes(demo):
    pkg, path, _ = demo
    cfg = ModelConfig.from_hf_dict(read_manifest(pkg).config)
    r = GGUFReader(path)
    embed = shard_tensors(pkg, "embed")["model.embed_tokens.weight"]
    assert np.array_equal(tensor(r, "token_embd.weight").data, embed)
    for i in range(cfg.num_hidden_layers):
        dense = shard_tensors(pkg, f"layer.{i}")
        base = f"model.layers.{i}"
        for gguf_name, hf_name in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                                   ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj")):
            assert np.array_equal(tensor(r, f"blk.{i}.{gguf_name}.weight").data, dense[f"{base}.{hf_name}.weight"])
        assert np.array_equal(tensor(r, f"blk.{i}.ffn_gate_inp.weight").data,
                              dense[f"{base}.block_sparse_moe.primary_router.weight"])
        assert np.array_equal(tensor(r, f"blk.{i}.attn_norm.weight").data, dense[f"{base}.input_layernorm.weight"])
        for part in ("gate", "up", "down"):
            stacked = tensor(r, f"blk.{i}.ffn_{part}_exps.weight").data  # [E, out, bytes]
            for e in range(cfg.moe_num_primary_experts):
                shard = shard_tensors(pkg, f"layer.{i}.expert.{e}")
                assert np.array_equal(stacked[e], shard[f"{base}.block_sparse_moe.experts.{e}.{part}.weight"]), \
                    (i, part, e)


def test_untied_lm_head_becomes_output(untied):
    pkg, path = untied
    r = GGUFReader(path)
    head = shard_tensors(pkg, "head")
    out = tensor(r, "output.weight")
    assert out.tensor_type == Q4_0 and list(out.shape) == [TINY.hidden_size, TINY.vocab_size]
    assert np.array_equal(out.data, head["lm_head.weight"])
    assert np.array_equal(tensor(r, "output_norm.weight").data, head["model.norm.weight"])
    assert field(r, "smallthinker.expert_gating_func") == 1  # softmax
    assert r.get_field("smallthinker.attention.sliding_window") is None  # no SWA: llama.cpp ropes every layer


def test_refuses_to_overwrite(untied, tmp_path):
    pkg, _ = untied
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(PackageError, match="refusing to overwrite"):
        export_gguf(pkg, out)
    assert out.read_bytes() == b"keep me"
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def test_progress_reports_every_tensor(untied, tmp_path):
    pkg, _ = untied
    calls: list[tuple[int, int, str]] = []
    result = export_gguf(pkg, tmp_path / "p.gguf", progress=lambda d, t, label: calls.append((d, t, label)))
    assert [c[0] for c in calls] == list(range(result["tensors"] + 1))
    assert all(c[1] == result["tensors"] for c in calls) and calls[-1][2] == "done"


def test_bf16_package_is_refused(tmp_path):
    build_package(RandomWeights(TINY, seed=1), tmp_path / "bf16", quant="bf16", name="tiny", version="1.0.0")
    with pytest.raises(PackageError, match="q4_0"):
        export_gguf(tmp_path / "bf16", tmp_path / "bf16.gguf")
    assert not (tmp_path / "bf16.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]


def test_sparse_down_package_is_refused(tmp_path):
    build_package(RandomWeights(TINY, seed=1), tmp_path / "pkg", name="tiny", version="1.0.0", sparse_down=True)
    with pytest.raises(PackageError, match="--sparse-down"):
        export_gguf(tmp_path / "pkg", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_layout_llama_cpp_cannot_express_is_refused(tmp_path):
    nope_everywhere = replace(TINY, rope_layout=(0, 0))  # llama.cpp ropes every layer without SWA
    build_package(RandomWeights(nope_everywhere, seed=1), tmp_path / "pkg", name="tiny", version="1.0.0")
    with pytest.raises(PackageError, match="rope_layout"):
        export_gguf(tmp_path / "pkg", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_not_a_package_is_a_clear_error(tmp_path):
    with pytest.raises(PackageError, match="not a model package"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")


def test_tampered_shard_leaves_no_file(untied, tmp_path):
    pkg, _ = untied
    copy = tmp_path / "pkg"
    copy.mkdir()
    for f in pkg.rglob("*"):
        if f.is_file():
            (copy / f.relative_to(pkg)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(pkg)).write_bytes(f.read_bytes())
    victim = copy / read_manifest(copy).shard("layer.1.expert.2").file
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256"):
        export_gguf(copy, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def qwen_style_tokenizer_json(vocab_limit: int) -> str:
    """A small byte-level BPE with Qwen2's split regex, trained here (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from model.gguf_export import _QWEN2_SPLIT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_limit, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the factory line runs the model", "tokens and merges, 123 times"] * 20, trainer)
    return tok.to_str()


def test_hf_tokenizer_becomes_a_gpt2_vocabulary(tmp_path):
    ckpt, cfg, _ = make_checkpoint(tmp_path / "ckpt", shards=2, layers=2, layout="rope", tie=False)
    (ckpt / "tokenizer.json").write_text(qwen_style_tokenizer_json(cfg["vocab_size"] - 10))
    build_from_hf(ckpt, tmp_path / "pkg", name="tiny-hf")
    result = export_gguf(tmp_path / "pkg", tmp_path / "hf.gguf")
    r = GGUFReader(tmp_path / "hf.gguf")
    tokens = field(r, "tokenizer.ggml.tokens")
    vocab = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "qwen2"
    assert len(tokens) == cfg["vocab_size"]  # padded to the embedding rows
    assert all(tokens[i] == text for text, i in vocab.items())
    assert field(r, "tokenizer.ggml.merges") and result["llama_cpp_notes"] == []


def test_named_chat_templates_and_an_eos_list_reach_the_manifest(tmp_path):
    ckpt, cfg, _ = make_checkpoint(tmp_path / "ckpt", shards=1, layers=2, layout="rope", tie=False)
    (ckpt / "tokenizer.json").write_text(qwen_style_tokenizer_json(cfg["vocab_size"] - 10))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": "{{ messages }}"}]}))
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    tok = build_from_hf(ckpt, tmp_path / "pkg", name="tiny-hf").tokenizer
    assert (tok.chat_template, tok.eos_ids) == ("{{ messages }}", (7, 9))
