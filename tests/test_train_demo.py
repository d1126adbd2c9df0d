"""Training (`model/train.py`), the corpus and the tokenizer the demo model is made from, on tiny
shapes: the training forward pass is the architecture (it agrees with the independent float64
reference), a few steps make the loss fall, a fine-tune moves only the experts it was given."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hf_fixtures import random_weights, tiny_config
from model import demo_corpus
from model.config import ModelConfig
from model.demo_tokenizer import END_OF_TEXT_ID, SPECIAL_TOKENS, train_bpe
from model.package import expert_tensor_names
from model.train import (
    DemoModel, TrainSettings, busiest_experts, finetune_experts, next_token_loss, rows_at, token_stream, train,
)
from reference_forward import reference_logits, relative_error


@pytest.mark.parametrize("softmax", [False, True], ids=["sigmoid", "softmax"])
def test_training_forward_pass_agrees_with_the_independent_reference(softmax):
    c = tiny_config(layout="hybrid", softmax=softmax, tie=True, window=4)
    weights = random_weights(c, seed=4)
    model = DemoModel(ModelConfig.from_hf_dict(c))
    model.load_hf_state_dict(weights)
    ids = np.random.default_rng(5).integers(0, c["vocab_size"], 12).tolist()
    ref = reference_logits(c, {k: v.double().numpy() for k, v in weights.items()}, ids)
    logits = model(torch.tensor([ids, ids]))[0].detach()  # a batch of two equal rows: neither sees the other
    # (each row on its own, not bit for bit: BLAS may round the rows of one matmul differently)
    assert all(relative_error(row.numpy(), ref) < 1e-5 for row in logits)
    assert model.hf_state_dict().keys() == weights.keys()


def test_balance_term_counts_every_top_k_slot():
    c = tiny_config(layout="hybrid", softmax=False, tie=True, window=4, layers=8)
    cfg = ModelConfig.from_hf_dict(c)
    model = DemoModel(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    _, balance, counts = model(tokens)
    assert counts.shape == (cfg.num_hidden_layers, cfg.moe_num_primary_experts)
    assert torch.all(counts.sum(1) == tokens.numel() * cfg.moe_num_active_primary_experts)
    # the term's floor: uniform shares and scores give exactly 1 per layer, and it is never below ~1
    assert 0.99 < balance.item() < cfg.moe_num_primary_experts


def _tiny_corpus():
    docs = demo_corpus.documents(3, 240)
    train_docs, held = demo_corpus.split(docs)
    tok = train_bpe(train_docs, 400)
    encode = lambda docs: [tok.encode(d).ids for d in docs]  # noqa: E731
    return tok, encode(train_docs), encode(held)


def _tiny_model(vocab: int, seed: int = 0) -> DemoModel:
    cfg = replace(ModelConfig.from_preset("st-demo"), hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                  head_dim=32, moe_num_primary_experts=4, moe_num_active_primary_experts=2, moe_ffn_hidden_size=32,
                  vocab_size=vocab, rope_layout=(0, 1, 1, 1), sliding_window_layout=(0, 1, 1, 1),
                  sliding_window_size=8)
    return DemoModel(cfg, seed=seed)


def test_a_few_steps_make_the_held_out_loss_fall():
    torch.manual_seed(0)
    tok, train_ids, held_ids = _tiny_corpus()
    model = _tiny_model(tok.get_vocab_size())
    stream, starts = token_stream(train_ids, END_OF_TEXT_ID)
    held = rows_at(*token_stream(held_ids, END_OF_TEXT_ID), 33)
    before = next_token_loss(lambda x: model(x)[0], held)
    history = train(model, stream, starts, TrainSettings(steps=30, batch=8, length=32, lr=1e-2, warmup=3, seed=1))
    after = next_token_loss(lambda x: model(x)[0], held)
    assert before > 5.0  # about ln(vocab): an untrained model knows nothing
    assert after < before - 1.5, (before, after)
    assert np.mean([h["loss"] for h in history[-5:]]) < np.mean([h["loss"] for h in history[:5]]) - 1.0


def test_training_is_reproducible_from_its_seed():
    _, train_ids, _ = _tiny_corpus()
    stream, starts = token_stream(train_ids, END_OF_TEXT_ID)
    runs = []
    for _ in range(2):
        model = _tiny_model(400, seed=3)
        train(model, stream, starts, TrainSettings(steps=2, batch=2, length=16, seed=5))
        runs.append(model.hf_state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_finetune_moves_only_the_experts_it_was_given():
    _, train_ids, _ = _tiny_corpus()
    model = _tiny_model(400, seed=2)
    stream, starts = token_stream(train_ids, END_OF_TEXT_ID)
    traffic = torch.tensor([[5, 1, 9, 2], [0, 7, 3, 3], [4, 4, 8, 1], [2, 6, 1, 0]])
    chosen = busiest_experts(traffic, share=0.25)
    assert chosen == [(0, 2), (1, 1), (2, 2), (3, 1)]
    before = model.hf_state_dict()
    finetune_experts(model, chosen, stream, starts, TrainSettings(steps=3, batch=2, length=16, lr=1e-2, warmup=1))
    after = model.hf_state_dict()
    chosen_names = {n for layer, e in chosen for n in expert_tensor_names(layer, e).values()}
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == chosen_names


def test_corpus_is_reproducible_and_held_out_documents_are_not_trained_on():
    docs = demo_corpus.documents(7, 300)
    assert docs == demo_corpus.documents(7, 300) and docs != demo_corpus.documents(8, 300)
    assert docs[:50] == demo_corpus.documents(7, 50)  # document i depends only on (seed, i)
    train_docs, held = demo_corpus.split(docs)
    assert len(held) == 30 and len(train_docs) == 270 and not set(held) & set(train_docs)
    kinds = {demo_corpus.record_kind(d) for d in docs}
    assert kinds == set(demo_corpus.RECORD_KINDS)
    assert all("Line 7" in d for d in demo_corpus.documents(7, 50, "line7"))


def test_records_keep_their_own_logic():
    """A torque check passes exactly when every reading is within tolerance of the target."""
    for doc in demo_corpus.documents(9, 400):
        if demo_corpus.record_kind(doc) != "torque check":
            continue
        target = float(doc.split("target ")[1].split(" Nm")[0])
        tol = float(doc.split("tolerance ")[1].split(" Nm")[0])
        readings = [float(v.split(" Nm")[0]) for v in doc.split("Readings: ")[1].split("\n")[0].split(", ")]
        assert ("Result: pass." in doc) == all(abs(v - target) <= tol for v in readings), doc


def test_tokenizer_round_trips_any_text_and_keeps_the_special_ids():
    tok, _, _ = _tiny_corpus()
    for text in ("Line 4 torque check: 12.5 Nm", "Überprüfung — Ofen 3 ✓ 温度", "\ttabs\n\nand  spaces "):
        assert tok.decode(tok.encode(text).ids) == text
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.encode("<|im_start|>user").ids[0] == 1


def test_a_quarter_of_the_documents_are_chat_exchanges_asking_for_their_record():
    for material in demo_corpus.MATERIALS:
        docs = demo_corpus.documents(5, 800, material)
        chats = [d for d in docs if demo_corpus.is_chat(d)]
        assert 0.2 < len(chats) / len(docs) < 0.3, (material, len(chats))
        for doc in chats:
            record = demo_corpus.record_of(doc)
            request = demo_corpus.request_of(record)
            assert doc.endswith(f"<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n{record}<|im_end|>\n")
            assert "Line " in request and request.split("Line ")[1][0] in record  # it names the record's line

    # the shipped corpus holds chats out too (the draw is per document, not per index), so the
    # held-out loss covers answering in a chat as well as continuing a record
    from model import demo_checkpoint

    for material in demo_corpus.MATERIALS:
        for part in demo_checkpoint.corpus(material):
            assert 0.15 < sum(map(demo_corpus.is_chat, part)) / len(part) < 0.35, material
