"""The shipped demo checkpoint (`model/demo_weights/`) and the packages `build_demo` makes of it:
files as recorded, a real held-out loss (recomputed here in plain torch), golden prompts that the
engine reproduces after Q4_0, readable continuations of held-out records, and a v1 -> v2 delta
made of exactly the fine-tuned experts' shards."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from model import Engine, demo_checkpoint, demo_corpus
from model.config import ModelConfig
from model.health import check_golden
from model.package import expert_shard, read_manifest
from model.tokenizer import HFTokenizer
from model.train import DemoModel, next_token_loss
from stctl.delta import diff_manifests

pytest_plugins = ["release_fixtures"]

HELDOUT_LOSS_BOUND = 0.75  # nats per token on held-out records; an untrained model scores ~6.6
Q4_0_LOSS_MARGIN = 0.1  # the quantized package may lose at most this much on the same rows
V1 = demo_checkpoint.WEIGHTS_DIR / "v1"


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return HFTokenizer((V1 / "tokenizer.json").read_bytes(), None, 0)


def test_shipped_files_match_their_recorded_sha256():
    v1, v2 = demo_checkpoint.verify(1), demo_checkpoint.verify(2)
    assert set(v1["files"]) == set(demo_checkpoint.V1_FILES)
    assert set(v2["files"]) == {demo_checkpoint.V2_EXPERTS} and v2["base"]["files"] == v1["files"]
    assert all(v1["bytes"][name] == (V1 / name).stat().st_size for name in v1["files"])


def test_config_is_a_smallthinker_hf_config_of_the_st_demo_shape():
    raw = json.loads((V1 / "config.json").read_text())
    assert raw["architectures"] == ["SmallThinkerForCausalLM"] and raw["model_type"] == "smallthinker"
    assert ModelConfig.from_hf_dict(raw) == ModelConfig.from_preset("st-demo")
    generation = json.loads((V1 / "generation_config.json").read_text())
    template = json.loads((V1 / "tokenizer_config.json").read_text())["chat_template"]
    assert raw["eos_token_id"] in generation["eos_token_id"] and "<|im_start|>" in template


def test_held_out_loss_in_plain_torch_is_below_the_bound(tokenizer):
    cfg = ModelConfig.from_preset("st-demo")
    model = DemoModel(cfg)
    model.load_hf_state_dict(load_file(str(V1 / "model.safetensors")))
    rows = demo_checkpoint.heldout_rows(tokenizer.encode, limit=demo_checkpoint.PACKAGE_EVAL_ROWS)
    loss = next_token_loss(lambda x: model(x)[0], rows)
    record = demo_checkpoint.read_record(1)
    assert loss < HELDOUT_LOSS_BOUND and record["heldout_loss"] < HELDOUT_LOSS_BOUND
    assert record["heldout_loss_at_init"] > 5.0


def test_package_records_its_held_out_loss_after_q4_0(demo_packages, tokenizer):
    health = read_manifest(demo_packages[0]).health
    rows = demo_checkpoint.heldout_rows(tokenizer.encode, limit=demo_checkpoint.PACKAGE_EVAL_ROWS)
    assert health.heldout["rows"] == rows.tolist()  # what a device re-measures
    assert health.heldout["tokens"] == demo_checkpoint.PACKAGE_EVAL_ROWS * (demo_checkpoint.EVAL_LENGTH - 1)
    assert health.heldout["loss"] < HELDOUT_LOSS_BOUND + Q4_0_LOSS_MARGIN


def test_health_check_re_measures_the_held_out_loss_and_fails_another_model(demo_packages):
    v1, v2 = (read_manifest(p).health for p in demo_packages)
    engine = Engine.load(demo_packages[0])
    report = check_golden(engine, v1)
    assert report.passed, report.detail
    assert abs(report.heldout_loss - v1.heldout["loss"]) <= v1.heldout["tolerance"]
    engine.close()
    # v2 (a quarter of the experts fine-tuned) against v1's held-out record alone: golden prompts out of the way
    engine = Engine.load(demo_packages[1])
    report = check_golden(engine, replace(v1, prompts=()))
    engine.close()
    assert not report.passed and "held-out loss" in report.detail, report.detail
    assert report.heldout_loss - v1.heldout["loss"] > v1.heldout["tolerance"]


def test_greedy_completions_of_golden_prompts_equal_the_manifest(demo_packages):
    prompts = demo_checkpoint.golden_prompts()
    for package in demo_packages:
        manifest = read_manifest(package)
        engine = Engine.load(package)
        assert [g.prompt_text for g in manifest.health.prompts] == prompts
        for golden in manifest.health.prompts:
            out = list(engine.generate(list(golden.prompt_ids), len(golden.expected_ids)))
            assert out == list(golden.expected_ids)
            assert engine.tokenizer.decode(out) == golden.expected_text
        engine.close()


def _corpus_words() -> set[str]:
    docs = demo_checkpoint.corpus("plant")[0]
    return {w for d in docs for w in re.findall(r"[A-Za-z]+", d)}


def test_held_out_prompts_continue_in_corpus_words(demo_packages):
    words = _corpus_words()
    engine = Engine.load(demo_packages[0])
    said = []
    for doc in [d for d in demo_checkpoint.corpus("plant")[1] if not demo_corpus.is_chat(d)][:12]:
        prompt = demo_corpus.prompt_of(doc)
        out = engine.generate(engine.tokenizer.encode(prompt), 24, stop_ids=engine.tokenizer.stop_ids)
        said += re.findall(r"[A-Za-z]+", engine.tokenizer.decode(list(out)))
    engine.close()
    assert len(said) > 50
    assert sum(w in words for w in said) / len(said) > 0.9, said


def test_v2_changes_only_the_fine_tuned_experts_shards(demo_packages):
    record = demo_checkpoint.read_record(2)
    chosen = {expert_shard(layer, e) for layer, e in record["experts"]}
    cfg = ModelConfig.from_preset("st-demo")
    assert len(chosen) == cfg.num_hidden_layers * cfg.moe_num_primary_experts // 4
    v1, v2 = (read_manifest(p) for p in demo_packages)
    delta = diff_manifests(v1, v2)
    assert set(delta.changed_shards) == chosen
    assert 0 < delta.bytes_to_ship < delta.bytes_full / 3
    # and the fine-tune learned its new material while the old records stayed about as good
    assert record["heldout_loss"]["line7"] < record["heldout_loss_v1"]["line7"] - 0.3
    assert record["heldout_loss"]["plant"] < record["heldout_loss_v1"]["plant"] + 0.05


def test_v2_checkpoint_is_v1_plus_the_changed_tensors(tmp_path):
    folder = demo_checkpoint.checkpoint_dir(2, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    changed = {name for name, file in index.items() if file == demo_checkpoint.V2_EXPERTS}
    v1 = load_file(str(V1 / "model.safetensors"))
    v2 = load_file(str(folder / demo_checkpoint.V2_EXPERTS))
    assert changed == set(v2) == set(demo_checkpoint.read_record(2)["changed_tensors"])
    assert all(".block_sparse_moe.experts." in name for name in changed)
    assert all(not torch.equal(v1[name], v2[name]) for name in changed)
