"""Bad input to the builder and the loader: a ModelError with a clear one-line message, nothing written.

Builder cases start from a valid tiny checkpoint and break one thing. After the error, the output
directory must not exist and its parent must hold nothing new (no partial or temp directory).
Loader cases copy a good package and alter its bytes: loading (or, for lazily read experts, the
first use) must raise IntegrityError naming the altered shard file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_fixtures import random_weights, tiny_config, write_checkpoint
from model import Engine
from model.build import build_from_hf
from model.errors import IntegrityError, ModelError, PackageError

REQUIRED_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "moe_num_primary_experts", "moe_num_active_primary_experts", "moe_ffn_hidden_size", "vocab_size",
                 "rope_theta", "rms_norm_eps", "rope_layout", "sliding_window_layout", "sliding_window_size",
                 "moe_primary_router_apply_softmax"]
EXPERT_UP = "model.layers.7.block_sparse_moe.experts.3.up.weight"  # last layer: found late in the build


@pytest.fixture(scope="module")
def base():
    cfg = tiny_config()
    return cfg, random_weights(cfg, seed=11)


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def assert_build_fails(ckpt: Path, tmp_path: Path, *mentions: str, quant: str = "q4_0",
                       error: type = ModelError) -> ModelError:
    """build_from_hf raises `error` mentioning each of `mentions`; no output, parent left as it was."""
    parent = tmp_path / "out-parent"
    parent.mkdir(exist_ok=True)
    before = _listing(parent)
    out = parent / "pkg"
    with pytest.raises(ModelError) as info:
        build_from_hf(ckpt, out, quant=quant, name="bad", version="1.0.0")
    err = info.value
    assert isinstance(err, error), f"{type(err).__name__}: {err}"
    message = str(err)
    assert message.strip() and "\n" not in message, f"not a one-line message: {message!r}"
    for m in mentions:
        assert m.lower() in message.lower(), f"message {message!r} does not mention {m!r}"
    assert not out.exists(), "a package directory was left behind"
    assert _listing(parent) == before, f"left in the output's parent: {sorted(set(_listing(parent)) - set(before))}"
    return err


# ---- config.json ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_config_key_is_named(tmp_path, base, key):
    cfg, weights = base
    broken = {k: v for k, v in cfg.items() if k != key}
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights, raw_config=json.dumps(broken))
    assert_build_fails(ckpt, tmp_path, key)


@pytest.mark.parametrize("field,value,mention", [
    ("rope_layout", [1, 0, 1], "rope_layout"),                    # not one entry per layer
    ("sliding_window_layout", [2] * 8, "sliding_window_layout"),  # entries must be 0/1
    ("num_key_value_heads", 3, "num_key_value_heads"),            # 4 heads not a multiple of 3
    ("hidden_size", "64", "hidden_size"),                         # wrong JSON type
    ("moe_num_active_primary_experts", 9, "moe_num_active_primary_experts"),  # more than 8 experts
])
def test_invalid_config_value_is_named(tmp_path, base, field, value, mention):
    cfg, weights = base
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights, raw_config=json.dumps(dict(cfg, **{field: value})))
    assert_build_fails(ckpt, tmp_path, mention)


def test_config_json_that_is_not_json_is_rejected(tmp_path, base):
    cfg, weights = base
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights, raw_config="{\"hidden_size\": 64,")
    assert_build_fails(ckpt, tmp_path, "config.json")


@pytest.mark.parametrize("file", ["tokenizer_config.json", "generation_config.json"])
def test_tokenizer_side_files_that_are_not_json_objects_are_rejected(tmp_path, base, file):
    cfg, weights = base
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights)
    (ckpt / file).write_text('{"chat_template": ')
    assert_build_fails(ckpt, tmp_path, file)
    (ckpt / file).write_text('["not an object"]')
    assert_build_fails(ckpt, tmp_path, file)


def test_missing_config_json_is_rejected(tmp_path, base):
    cfg, weights = base
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights)
    (ckpt / "config.json").unlink()
    assert_build_fails(ckpt, tmp_path, "config.json")


def test_checkpoint_directory_that_does_not_exist_is_rejected(tmp_path):
    assert_build_fails(tmp_path / "nowhere", tmp_path, "nowhere")


# ---- tensors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,shape", [
    ("model.layers.2.self_attn.q_proj.weight", (64, 32)),       # [out, in] of the wrong size
    ("model.layers.1.block_sparse_moe.primary_router.weight", (7, 64)),  # 7 router rows for 8 experts
    ("model.layers.6.self_attn.k_proj.weight", "transpose"),    # [in, out] instead of [out, in]
    (EXPERT_UP, (64, 96)),
    ("model.embed_tokens.weight", (300, 64)),                   # vocab mismatch
    ("model.norm.weight", (65,)),
])
def test_tensor_with_wrong_shape_is_named(tmp_path, base, name, shape):
    cfg, weights = base
    weights = dict(weights)
    if shape == "transpose":
        assert weights[name].shape[0] != weights[name].shape[1]
        weights[name] = weights[name].t().contiguous()
    else:
        weights[name] = torch.randn(shape)
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights)
    assert_build_fails(ckpt, tmp_path, name)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float64, torch.bool])
def test_tensor_with_unsupported_dtype_is_named(tmp_path, base, dtype):
    cfg, weights = base
    weights = dict(weights)
    weights[EXPERT_UP] = torch.ones(weights[EXPERT_UP].shape, dtype=dtype)
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights)
    err = assert_build_fails(ckpt, tmp_path, EXPERT_UP)
    assert "dtype" in str(err).lower() or str(dtype).split(".")[-1] in str(err)


@pytest.mark.parametrize("name", [EXPERT_UP, "model.norm.weight", "model.layers.0.block_sparse_moe.primary_router.weight",
                                  "model.embed_tokens.weight"])
def test_missing_tensor_is_named(tmp_path, base, name):
    cfg, weights = base
    weights = {k: v for k, v in weights.items() if k != name}
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights)
    assert_build_fails(ckpt, tmp_path, name)


def test_separate_head_config_without_lm_head_uses_no_stale_tensor_and_missing_layer_tensor_fails(tmp_path, base):
    """A missing tensor in a sharded checkpoint (index lists it nowhere) fails the same way."""
    cfg, weights = base
    weights = {k: v for k, v in weights.items() if k != EXPERT_UP}
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights, shards=3)
    assert_build_fails(ckpt, tmp_path, EXPERT_UP)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_truncated_safetensors_file_is_rejected(tmp_path, base, shards, keep):
    cfg, weights = base
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights, shards=shards)
    victim = sorted(ckpt.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * keep)])
    assert_build_fails(ckpt, tmp_path, victim.name)


def test_index_pointing_at_a_missing_shard_file_is_rejected(tmp_path, base):
    cfg, weights = base
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights, shards=2)
    victim = sorted(ckpt.glob("*.safetensors"))[0]
    victim.unlink()
    assert_build_fails(ckpt, tmp_path, victim.name)


def test_q4_0_build_rejects_dims_that_are_not_multiples_of_32(tmp_path):
    cfg = tiny_config(hidden=48, heads=3, kv_heads=1, head_dim=16)
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, random_weights(cfg, seed=1))
    assert_build_fails(ckpt, tmp_path, "32")


def test_existing_output_is_never_overwritten(tmp_path, base):
    cfg, weights = base
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights, shards=2)
    parent = tmp_path / "out-parent"
    out = parent / "pkg"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("operator data")
    with pytest.raises(PackageError) as info:
        build_from_hf(ckpt, out, quant="q4_0", name="x", version="1.0.0")
    assert "exist" in str(info.value).lower() and "\n" not in str(info.value)
    assert _listing(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "operator data"
    assert _listing(parent) == ["pkg"]
    # an existing empty directory or a file is refused as well
    empty = parent / "empty"
    empty.mkdir()
    with pytest.raises(PackageError):
        build_from_hf(ckpt, empty, quant="bf16", name="x", version="1.0.0")
    assert _listing(empty) == []
    file = parent / "file"
    file.write_text("x")
    with pytest.raises(PackageError):
        build_from_hf(ckpt, file, quant="q4_0", name="x", version="1.0.0")
    assert file.read_text() == "x" and _listing(parent) == ["empty", "file", "pkg"]


@pytest.mark.parametrize("kw,mention", [(dict(quant="q8_0"), "q8_0"), (dict(version="v1"), "v1"),
                                        (dict(name="Bad Name!"), "Bad Name!")])
def test_bad_build_options_are_rejected_before_writing(tmp_path, base, kw, mention):
    cfg, weights = base
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, weights, shards=2)
    parent = tmp_path / "out-parent"
    parent.mkdir()
    args = {"quant": "q4_0", "name": "ok", "version": "1.0.0", **kw}
    with pytest.raises(ModelError) as info:
        build_from_hf(ckpt, parent / "pkg", **args)
    assert mention in str(info.value)
    assert _listing(parent) == []


# ---- loading a package whose bytes changed ------------------------------------------------------------
@pytest.fixture(scope="module")
def good_package(tmp_path_factory, base) -> Path:
    cfg, weights = base
    root = tmp_path_factory.mktemp("goodpkg")
    ckpt = write_checkpoint(root / "ckpt", cfg, weights, shards=2)
    out = root / "pkg"
    build_from_hf(ckpt, out, quant="q4_0", name="good", version="1.0.0")
    return out


def _copy(pkg: Path, tmp_path: Path) -> tuple[Path, dict]:
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    return dst, json.loads((dst / "manifest.json").read_text())


def _flip_byte(path: Path, where: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_good_package_loads(good_package):
    engine = Engine.load(good_package)
    assert engine.logits([1, 2, 3]).shape == (3, engine.config.vocab_size)


@pytest.mark.parametrize("shard", ["embed", "head", "layer.3", "layer.5.expert.2"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_loading_a_package_with_altered_shard_bytes_raises_integrity_error_naming_it(good_package, tmp_path, shard, damage):
    pkg, manifest = _copy(good_package, tmp_path)
    entry = next(s for s in manifest["shards"] if s["name"] == shard)
    path = pkg / entry["file"]
    if damage == "flip":
        _flip_byte(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    else:
        path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(IntegrityError) as info:
        Engine.load(pkg)
    assert entry["file"] in str(info.value) and "\n" not in str(info.value)


def test_missing_shard_file_is_named_at_load(good_package, tmp_path):
    pkg, manifest = _copy(good_package, tmp_path)
    entry = next(s for s in manifest["shards"] if s["kind"] == "expert")
    (pkg / entry["file"]).unlink()
    with pytest.raises(PackageError) as info:
        Engine.load(pkg)
    assert entry["file"] in str(info.value)


def test_budgeted_engine_refuses_a_tampered_expert_when_it_is_first_read(good_package, tmp_path):
    """With a memory budget experts are read on demand: the hash check must still happen before use."""
    pkg, manifest = _copy(good_package, tmp_path)
    layer0 = [s for s in manifest["shards"] if s["kind"] == "expert" and s["layer"] == 0]
    for s in layer0:  # whatever the router picks in layer 0 is tampered
        _flip_byte(pkg / s["file"], 0.9)
    budget = 3 * sum(s["size"] for s in manifest["shards"]) + 64 * 2**20
    try:
        engine = Engine.load(pkg, memory_budget_bytes=budget)
    except IntegrityError as e:  # eager verification is fine too
        assert any(s["file"] in str(e) for s in layer0)
        return
    with pytest.raises(IntegrityError) as info:
        engine.logits([1, 2, 3, 4])
    assert any(s["file"] in str(info.value) for s in layer0), str(info.value)


@pytest.mark.parametrize("content", [b"{not json", b"{}", b'{"format": "smallthinker-fleet/model@1"}'])
def test_malformed_manifest_is_a_package_error(good_package, tmp_path, content):
    pkg, _ = _copy(good_package, tmp_path)
    (pkg / "manifest.json").write_bytes(content)
    with pytest.raises(PackageError) as info:
        Engine.load(pkg)
    assert "\n" not in str(info.value)


def test_directory_without_manifest_is_a_package_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError):
        Engine.load(tmp_path / "empty")
    with pytest.raises(PackageError):
        Engine.load(tmp_path / "does-not-exist")


def test_manifest_shard_path_escaping_the_package_is_refused(good_package, tmp_path):
    pkg, manifest = _copy(good_package, tmp_path)
    outside = tmp_path / "evil.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    manifest["shards"][0]["file"] = "../evil.safetensors"
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError):
        Engine.load(pkg)


def test_weights_written_by_a_failed_build_do_not_appear_later(tmp_path, base):
    """A build that fails late (last layer's expert) leaves nothing; the same out then builds cleanly."""
    cfg, weights = base
    bad = dict(weights)
    bad[EXPERT_UP] = torch.ones(bad[EXPERT_UP].shape, dtype=torch.int32)
    ckpt = write_checkpoint(tmp_path / "bad", cfg, bad, shards=2)
    assert_build_fails(ckpt, tmp_path, EXPERT_UP)
    good = write_checkpoint(tmp_path / "good", cfg, weights, shards=2)
    out = tmp_path / "out-parent" / "pkg"
    build_from_hf(good, out, quant="q4_0", name="ok", version="1.0.0")
    assert (out / "manifest.json").is_file()
    assert _listing(out.parent) == ["pkg"]
    assert np.isfinite(Engine.load(out).logits([5, 6]).numpy()).all()
