"""The engine and llama.cpp compute the same logits from the same exported Q4_0 bytes.

Skipped when llama-cpp-python is not installed. llama.cpp's `smallthinker` always uses a 4096-token
window with NoPE on layers i % 4 == 0 once any layer slides, so the models here use exactly that
layout (window 4096, prompts shorter than it) or no SWA at all; the demo package itself (window 16,
trained) is checked on the first 16 tokens of a held-out record: text it knows, where neither side
sits on a near-tie (on 16 arbitrary ids the trained model's top two logits often nearly tie).

Weights come from `hf_fixtures.random_weights`: every sub-layer writes about as much into the
residual as the residual holds, so a wrong RoPE layout, mask, router input, gating function or
expert order moves the logits far beyond the tolerance (RandomWeights' 0.02-std matrices would
leave the logits dominated by the embedding and hide such errors).

Tolerance: both sides multiply the same Q4_0 weights but round the activations differently:
llama.cpp rounds them to Q8_0 before every Q4_0 product (and keeps K/V in f16), the engine's C
kernel rounds them to int8 per 32 values with its own scales, and sums run in different orders.
Measured on these models against an exact float64 forward pass (tests/reference_forward.py),
llama.cpp and the engine's C kernel are equally far from exact: 2-5% relative error over all
logits, about 1% median per position; the larger per-position outliers sit where two router
logits nearly tie and one side picks another expert. A wrong gating function moves the logits
by 35-42% and a wrong RoPE layout by 26-30% on the same models. The bounds below (8% overall,
3% median per position, top-1 agreement on 90% of positions) sit between the two.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from hf_fixtures import random_weights, tiny_config, write_checkpoint  # noqa: E402

from model import Engine, demo_checkpoint  # noqa: E402
from model.build import build_demo, build_from_hf  # noqa: E402
from model.gguf_export import export_gguf  # noqa: E402

# The st-demo preset's shape; 8 layers keep its 1:3 NoPE/SWA layout meaningful.
DEMO_DIMS = dict(hidden=256, layers=8, heads=8, kv_heads=2, head_dim=32, experts=16, active=4, ffn=256, vocab=320)
VARIANTS = {
    # the demo's layout and routing, with the window llama.cpp uses
    "hybrid-swa4096-sigmoid-tied": dict(layout="hybrid", window=4096, softmax=False, tie=True),
    # the 4B preset: RoPE everywhere, no SWA, sigmoid routing, separate lm_head
    "rope-sigmoid-untied": dict(layout="rope", softmax=False, tie=False, rope_theta=1.5e6),
    # the 21B preset's routing: softmax over the top-k
    "hybrid-swa4096-softmax-untied": dict(layout="hybrid", window=4096, softmax=True, tie=False),
}
PROMPT = [(37 * i + 11) % 256 for i in range(96)]
MAX_REL_ERROR, MAX_MEDIAN_POS_REL_ERROR, MIN_TOP1_AGREEMENT = 8e-2, 3e-2, 0.90


def llama_cpp_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=len(ids) + 8, n_batch=len(ids), n_ubatch=len(ids),
                          logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def engine_logits(package: Path, ids: list[int]) -> np.ndarray:
    return Engine.load(package).logits(ids).double().numpy()


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    per_pos = np.linalg.norm(theirs - ours, axis=1) / np.linalg.norm(ours, axis=1)
    return {
        "rel_error": float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours)),
        "median_pos_rel_error": float(np.median(per_pos)),
        "max_pos_rel_error": float(per_pos.max()),
        "top1_agreement": float(np.mean(theirs.argmax(1) == ours.argmax(1))),
    }


def assert_agrees(stats: dict[str, float]) -> None:
    assert stats["rel_error"] < MAX_REL_ERROR, stats
    assert stats["median_pos_rel_error"] < MAX_MEDIAN_POS_REL_ERROR, stats
    assert stats["top1_agreement"] >= MIN_TOP1_AGREEMENT, stats


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config(**DEMO_DIMS, **VARIANTS[request.param])
    # two checkpoint files: exercises the index path of the HF reader
    write_checkpoint(root / "ckpt", cfg, random_weights(cfg, seed=7, gain=0.5), shards=2)
    build_from_hf(root / "ckpt", root / "pkg", name="crosscheck")
    export_gguf(root / "pkg", root / "model.gguf")
    return request.param, root / "pkg", root / "model.gguf"


def test_logits_agree_with_llama_cpp(exported):
    name, pkg, gguf_path = exported
    stats = agreement(engine_logits(pkg, PROMPT), llama_cpp_logits(gguf_path, PROMPT))
    print(name, stats)
    assert_agrees(stats)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("demo")
    build_demo(root / "pkg")
    export_gguf(root / "pkg", root / "demo.gguf")
    return root / "pkg", root / "demo.gguf"


def test_demo_package_agrees_within_its_window(demo):
    pkg, gguf_path = demo
    record = demo_checkpoint.corpus("plant")[1][0]  # held out: never trained on
    # the demo slides a 16-token window, llama.cpp 4096: equal up to 16 tokens
    ids = Engine.load(pkg).tokenizer.encode(record)[:16]
    stats = agreement(engine_logits(pkg, ids), llama_cpp_logits(gguf_path, ids))
    print("st-demo", stats)
    assert_agrees(stats)


def test_demo_vocabulary_tokenizes_like_its_tokenizer_json(demo):
    from tokenizers import Tokenizer

    pkg, gguf_path = demo
    reference = Tokenizer.from_file(str(pkg / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, vocab_only=True, verbose=False)
    for text in (demo_checkpoint.corpus("plant")[1][0], "Line 3, press 7: températures OK!\n"):
        ids = llm.tokenize(text.encode(), add_bos=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert llm.detokenize(ids).decode() == text


def test_demo_chat_template_reaches_llama_cpp_and_renders_chatml(demo):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    pkg, gguf_path = demo
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    assert template == json.loads((demo_checkpoint.WEIGHTS_DIR / "v1" / "tokenizer_config.json").read_text())[
        "chat_template"]
    messages = [{"role": "system", "content": "You write line records."},
                {"role": "user", "content": "Line 4 torque check:"}]
    prompt = Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="")(messages=messages).prompt
    assert prompt == ("<|im_start|>system\nYou write line records.<|im_end|>\n"
                      "<|im_start|>user\nLine 4 torque check:<|im_end|>\n<|im_start|>assistant\n")
    engine = Engine.load(pkg)
    assert engine.tokenizer.chat_template.render(messages) == prompt  # the agent's renderer agrees
    # the markers are single special tokens on both sides
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids[0] == 1 and ids.count(2) == 2 and ids == engine.tokenizer.encode(prompt)
    engine.close()


def test_create_chat_completion_renders_the_prompt_like_the_agent(demo):
    """llama.cpp's `create_chat_completion` renders the GGUF's template itself: it must come to the
    same prompt tokens as the agent's renderer. (The answers are not compared: the demo slides a
    16-token window, which llama.cpp's smallthinker cannot express, and a chat prompt is longer.)"""
    pkg, gguf_path = demo
    messages = [{"role": "system", "content": "You write line records."},
                {"role": "user", "content": "Write the torque check record for Line 4, station S3 press."}]
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, n_threads=1, verbose=False)
    theirs = llm.create_chat_completion(messages=messages, max_tokens=2, temperature=0.0)
    engine = Engine.load(pkg)
    ours = engine.tokenizer.encode(engine.tokenizer.chat_template.render(messages))
    engine.close()
    assert theirs["usage"]["prompt_tokens"] == len(ours)
    assert llm.tokenize(engine.tokenizer.chat_template.render(messages).encode(), add_bos=False, special=True) == ours


def test_bpe_vocabulary_tokenizes_like_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer

    from test_gguf_export import qwen_style_tokenizer_json

    cfg = tiny_config(layers=2, layout="rope", tie=False)
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, random_weights(cfg, seed=1), shards=2)
    (ckpt / "tokenizer.json").write_text(qwen_style_tokenizer_json(cfg["vocab_size"] - 10))
    build_from_hf(ckpt, tmp_path / "pkg", name="tiny-hf")
    export_gguf(tmp_path / "pkg", tmp_path / "hf.gguf")
    reference = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(tmp_path / "hf.gguf"), n_ctx=64, vocab_only=True, verbose=False)
    for text in ("the factory line runs the model", "Tokens and merges, 123 times!\n  indented", "don't stop"):
        assert llm.tokenize(text.encode(), add_bos=False) == reference.encode(text).ids, text
