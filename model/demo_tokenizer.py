"""The demo model's tokenizer: a small byte-level BPE trained on the demo corpus, in HF's files.

Rule: the tokenizer is the kind SmallThinker ships (Qwen2's split regex, then byte-level BPE, so
any UTF-8 text encodes and decodes back unchanged; `model.tokenizer.HFTokenizer` loads it and
`model.gguf_export` writes it as llama.cpp's "qwen2" vocabulary), its special tokens come first
(ids 0-2) and `train_bpe` is deterministic for the same texts and vocabulary size.
`write_hf_files` writes the three files a released checkpoint has beside its weights:
`tokenizer.json`, `tokenizer_config.json` (special tokens and the ChatML chat template) and
`generation_config.json` (its end-of-text ids).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from model.gguf_export import _QWEN2_SPLIT

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)  # ids 0, 1, 2
END_OF_TEXT_ID, IM_END_ID = 0, 2

# SmallThinker's instruct template (ChatML): each message as <|im_start|>role\n...<|im_end|>\n,
# then the assistant's turn opened when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A `tokenizers.Tokenizer` with at most `vocab_size` ids trained on `texts`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, "special tokens must keep ids 0-2"
    return tok


def write_hf_files(tok, out: Path) -> list[Path]:
    """tokenizer.json, tokenizer_config.json and generation_config.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "tokenizer.json", out / "tokenizer_config.json", out / "generation_config.json"]
    files[0].write_text(tok.to_str(pretty=False) + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, "add_bos_token": False,
        "bos_token": None, "eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT, "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END], "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in enumerate(SPECIAL_TOKENS)},
    }
    files[1].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"eos_token_id": [END_OF_TEXT_ID, IM_END_ID], "pad_token_id": END_OF_TEXT_ID, "do_sample": False}
    files[2].write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    return files
