"""`manifests.ModelManifest`: the model package manifest parses, validates and serializes canonically.

The sample document is written here from DESIGN.md ("Model package"), not produced by the code
under test.
"""
from __future__ import annotations

import copy
import hashlib
import json

import pytest

from manifests import ManifestError, ModelManifest

SHA = hashlib.sha256(b"shard").hexdigest()
CONFIG = {
    "hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "moe_num_primary_experts": 4, "moe_num_active_primary_experts": 2, "moe_ffn_hidden_size": 64, "vocab_size": 320,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "rope_layout": [0, 1, 1, 1, 0, 1, 1, 1],
    "sliding_window_layout": [0, 1, 1, 1, 0, 1, 1, 1], "sliding_window_size": 8,
    "moe_primary_router_apply_softmax": False, "tie_word_embeddings": True,
}


def sample() -> dict:
    shards = [
        {"name": "embed", "file": "shards/embed.safetensors", "sha256": SHA, "size": 1000, "kind": "dense"},
        {"name": "layer.0", "file": "shards/layer.0.safetensors", "sha256": SHA, "size": 500, "kind": "dense",
         "layer": 0},
        {"name": "layer.0.expert.0", "file": "shards/layer.0.expert.0.safetensors", "sha256": SHA, "size": 300,
         "kind": "expert", "layer": 0, "expert": 0},
        {"name": "layer.0.expert.1", "file": "shards/layer.0.expert.1.safetensors", "sha256": SHA, "size": 300,
         "kind": "expert", "layer": 0, "expert": 1},
    ]
    return {
        "format": "smallthinker-fleet/model@1",
        "name": "st-demo",
        "version": "1.2.0",
        "config": dict(CONFIG),
        "quant": "q4_0",
        "tokenizer": {"kind": "byte", "bos_id": 256, "eos_id": 257},
        "shards": shards,
        "health": {
            "prompts": [{"prompt_ids": [1, 2, 3], "expected_ids": [4, 5],
                         "top_logits": [[[4, 3.5], [9, 1.25]], [[5, 2.0], [7, -1.0]]]}],
            "logit_tolerance": 0.1, "min_decode_tokens_per_s": 0.0, "max_peak_rss_bytes": None,
        },
    }


def encode(d) -> bytes:
    return json.dumps(d).encode()


def rejects(d, *mentions: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        ModelManifest.from_bytes(encode(d) if not isinstance(d, bytes) else d)
    for m in mentions:
        assert m in str(info.value), f"{info.value} does not mention {m!r}"
    return info.value


# ---- round trip --------------------------------------------------------------------------------------
def test_parse_then_serialize_round_trips_bytes_and_objects():
    m = ModelManifest.from_bytes(encode(sample()))
    data = m.to_bytes()
    again = ModelManifest.from_bytes(data)
    assert again == m
    assert again.to_bytes() == data, "serialization is not canonical"
    # key order and whitespace of the input do not matter
    shuffled = json.dumps(dict(reversed(list(sample().items()))), indent=4).encode()
    assert ModelManifest.from_bytes(shuffled).to_bytes() == data


def test_parsed_manifest_keeps_every_field():
    m = ModelManifest.from_bytes(encode(sample()))
    assert (m.name, m.version, m.quant) == ("st-demo", "1.2.0", "q4_0")
    assert m.config == CONFIG
    assert [s.name for s in m.shards] == [s["name"] for s in sample()["shards"]]
    experts = [s for s in m.shards if s.kind == "expert"]
    assert [(s.layer, s.expert) for s in experts] == [(0, 0), (0, 1)]
    assert m.shards[0].sha256 == SHA and m.shards[0].size == 1000
    assert m.health is not None and m.health.prompts[0].expected_ids == (4, 5)
    round_tripped = json.loads(m.to_bytes())
    assert round_tripped["format"] == "smallthinker-fleet/model@1"
    assert round_tripped["shards"] == sample()["shards"]
    assert round_tripped["config"] == CONFIG


def test_manifest_without_health_round_trips():
    d = sample()
    del d["health"]
    m = ModelManifest.from_bytes(encode(d))
    assert m.health is None
    assert ModelManifest.from_bytes(m.to_bytes()) == m


# ---- rejections ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["smallthinker-fleet/model@2", "other/model@1", "", 1, None])
def test_wrong_format_is_rejected(fmt):
    d = sample()
    d["format"] = fmt
    rejects(d, "format")


def test_missing_format_is_rejected():
    d = sample()
    del d["format"]
    rejects(d, "format")


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "01.0.0", "1.0.0.0", "", "latest", 1, None])
def test_bad_version_is_rejected(version):
    d = sample()
    d["version"] = version
    rejects(d, "version")


@pytest.mark.parametrize("field", ["name", "version", "config", "quant", "tokenizer", "shards"])
def test_missing_top_level_field_is_rejected(field):
    d = sample()
    del d[field]
    rejects(d, field)


@pytest.mark.parametrize("key", sorted(CONFIG))
def test_missing_config_field_is_rejected(key):
    d = sample()
    del d["config"][key]
    rejects(d, key)


@pytest.mark.parametrize("field", ["name", "file", "sha256", "size", "kind"])
def test_shard_missing_field_is_rejected(field):
    d = sample()
    del d["shards"][1][field]
    rejects(d, field)


@pytest.mark.parametrize("field", ["layer", "expert"])
def test_expert_shard_without_layer_or_expert_is_rejected(field):
    d = sample()
    del d["shards"][2][field]
    rejects(d, field)


@pytest.mark.parametrize("path", ["../x", "../x.safetensors", "shards/../../x", "shards/../x", "/etc/passwd",
                                  "a//b", "", ".", "..", "shards/", "a\\..\\b", "~/x"])
def test_shard_file_escaping_the_package_is_rejected(path):
    d = sample()
    d["shards"][2]["file"] = path
    rejects(d, "file")


@pytest.mark.parametrize("sha", ["abc", SHA[:-1], SHA + "0", "g" * 64, "", 123, None])
def test_bad_sha256_is_rejected(sha):
    d = sample()
    d["shards"][0]["sha256"] = sha
    rejects(d, "sha256")


@pytest.mark.parametrize("size", [-1, "100", 1.5, True, None])
def test_bad_size_is_rejected(size):
    d = sample()
    d["shards"][0]["size"] = size
    rejects(d, "size")


@pytest.mark.parametrize("kind", ["moe", "", None])
def test_unknown_shard_kind_is_rejected(kind):
    d = sample()
    d["shards"][0]["kind"] = kind
    rejects(d, "kind")


@pytest.mark.parametrize("field", ["name", "file"])
def test_duplicate_shard_names_or_files_are_rejected(field):
    d = sample()
    d["shards"][3][field] = d["shards"][2][field]
    rejects(d, "duplicate")


def test_empty_shard_list_is_rejected():
    d = sample()
    d["shards"] = []
    rejects(d, "shards")


@pytest.mark.parametrize("quant", ["q8_0", "Q4_0", "", None])
def test_unknown_quant_is_rejected(quant):
    d = sample()
    d["quant"] = quant
    rejects(d, "quant")


@pytest.mark.parametrize("name", ["", "Has Space", "../evil", "UPPER", "x" * 65])
def test_bad_model_name_is_rejected(name):
    d = sample()
    d["name"] = name
    rejects(d, "name")


def test_tokenizer_file_escaping_the_package_is_rejected():
    d = sample()
    d["tokenizer"] = {"kind": "hf", "file": "../tokenizer.json", "sha256": SHA, "size": 10}
    rejects(d, "tokenizer")


def test_hf_tokenizer_with_chat_template_and_eos_ids_round_trips():
    d = sample()
    d["tokenizer"] = {"kind": "hf", "file": "tokenizer.json", "sha256": SHA, "size": 10, "eos_id": 0,
                      "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}", "eos_ids": [0, 2]}
    m = ModelManifest.from_bytes(encode(d))
    assert m.tokenizer.eos_ids == (0, 2) and m.tokenizer.chat_template.startswith("{% for")
    assert ModelManifest.from_bytes(m.to_bytes()) == m and json.loads(m.to_bytes())["tokenizer"] == d["tokenizer"]


@pytest.mark.parametrize("change, mention", [
    ({"chat_template": ["a"]}, "chat_template"), ({"eos_ids": []}, "eos_ids"), ({"eos_ids": [0, -1]}, "eos_ids"),
    ({"eos_ids": 2}, "eos_ids"), ({"eos_ids": ["2"]}, "eos_ids"),
])
def test_malformed_chat_template_or_eos_ids_are_rejected(change, mention):
    d = sample()
    d["tokenizer"] = {"kind": "hf", "file": "tokenizer.json", "sha256": SHA, "size": 10, **change}
    rejects(d, mention)


def test_health_with_mismatched_top_logits_is_rejected():
    d = sample()
    d["health"]["prompts"][0]["top_logits"] = d["health"]["prompts"][0]["top_logits"][:1]
    rejects(d, "top_logits")


HELDOUT = {"loss": 0.5, "perplexity": 1.649, "tokens": 4, "source": "two rows", "tolerance": 0.02,
           "rows": [[1, 2, 3], [4, 5, 6]]}


def test_health_with_held_out_rows_round_trips():
    d = sample()
    d["health"]["heldout"] = copy.deepcopy(HELDOUT)
    m = ModelManifest.from_bytes(encode(d))
    assert m.health.heldout == HELDOUT and ModelManifest.from_bytes(m.to_bytes()) == m


@pytest.mark.parametrize("change, mention", [
    ({"loss": "0.5"}, "numeric loss"), ({"loss": float("nan")}, "numeric loss"),
    ({"tolerance": None}, "together"), ({"rows": None}, "together"), ({"tolerance": 0}, "tolerance"),
    ({"rows": []}, "rows"), ({"rows": [[1]]}, "rows"), ({"rows": [[1, -2]]}, "rows[0]"),
    ({"rows": [[1, True]]}, "rows[0]"), ({"rows": [[1, 2], "3 4"]}, "rows"),
])
def test_malformed_held_out_record_is_rejected(change, mention):
    d = sample()
    d["health"]["heldout"] = {**HELDOUT, **change}
    rejects(d, mention)


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"\xff\xfe\x00", b"[]", b"null", b"42", b'"manifest"'])
def test_malformed_json_is_a_manifest_error(data):
    with pytest.raises(ManifestError):
        ModelManifest.from_bytes(data)


def test_unknown_extra_fields_survive_a_round_trip():
    """Forward compatibility: unknown top-level fields survive a round trip."""
    d = sample()
    d["x_release_notes"] = "line 4 rollout"
    m = ModelManifest.from_bytes(encode(d))
    assert json.loads(m.to_bytes())["x_release_notes"] == "line 4 rollout"


def test_input_document_is_not_mutated():
    d = sample()
    snapshot = copy.deepcopy(d)
    ModelManifest.from_dict(d)
    assert d == snapshot
