"""The torch-int4 packed expert cache: a load is one read of a file packed once per host, and the
result is bit-identical to repacking the verified shard; a bad cache file is never used."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from model import Engine
from model.build import build_demo
from model.kernels import Q4Matrix
from model.package import expert_tensor_names, load_shard, read_manifest
from model.packed_cache import HEADER_BYTES, MAGIC, layout_key, prune

PROMPT = list(range(60, 100))
CONTEXT = 96


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packed")
    build_demo(root / "pkg")
    return root / "pkg"


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "packed"
    monkeypatch.setenv("ST_PACKED_CACHE", str(root))
    return root


def _engine(pkg: Path, budget_slots: int | None = None) -> Engine:
    """A torch-int4 engine with every expert resident (read at load), or a budget of that many slots."""
    if budget_slots is None:
        return Engine.load(pkg, kernel="torch-int4", max_context=CONTEXT)
    sizing = Engine.load(pkg, kernel="torch-int4", memory_budget_bytes=2**40, max_context=CONTEXT)  # reads no expert
    budget = sizing.dense_bytes + sizing.kv_cache_bytes(CONTEXT) + budget_slots * sizing.transformer.experts.slot_bytes
    # no look-ahead: every read is then a miss, so loads + packs count the misses
    return Engine.load(pkg, kernel="torch-int4", memory_budget_bytes=budget, max_context=CONTEXT, lookahead=False)


def _run(engine: Engine) -> tuple[torch.Tensor, list[int]]:
    return engine.logits(PROMPT), list(engine.generate(PROMPT, 16, temperature=0.9, seed=5))


def _files(root: Path) -> list[Path]:
    return sorted((root / layout_key()).glob("*.int4"))


def test_the_layout_key_names_the_torch_version_and_cpu_capability():
    key = layout_key()
    assert torch.__version__ in key
    assert torch.backends.cpu.get_cpu_capability().lower() in key


def test_experts_are_packed_once_per_host_then_loaded_without_repacking(package, cache_root, monkeypatch):
    monkeypatch.setenv("ST_PACKED_CACHE", "off")
    repacking = _engine(package, budget_slots=6)
    assert repacking.transformer.experts.packed is None
    reference = _run(repacking)

    monkeypatch.setenv("ST_PACKED_CACHE", str(cache_root))
    first = _engine(package, budget_slots=6)
    logits, tokens = _run(first)
    assert torch.equal(logits, reference[0]) and tokens == reference[1]
    store = first.transformer.experts
    experts = read_manifest(package).expert_shards()
    n_experts = len(experts)
    assert store.packed.loads + store.packed.packs == store.stats()["expert_cache_misses"]
    # each expert the run routed to packed once (one file per source shard), then loaded; a trained
    # router leaves a few experts unused by one prompt
    files = _files(cache_root)
    assert store.packed.packs == len(files) > n_experts // 2 and store.packed.loads > 0
    assert {f.stem for f in files} <= {s.sha256 for s in experts}

    # a new engine (as in a new process): every expert comes from its packed file, bit-identical results
    second = _engine(package, budget_slots=6)
    logits, tokens = _run(second)
    assert torch.equal(logits, reference[0]) and tokens == reference[1]
    store = second.transformer.experts
    assert store.packed.packs == 0 and store.packed.loads == store.stats()["expert_cache_misses"] > n_experts
    # the packed slot replaces the shard image plus its repacked copy
    assert store.slot_bytes < repacking.transformer.experts.slot_bytes


def test_a_packed_file_holds_the_int4_pack_of_its_verified_shard(package, cache_root):
    engine = _engine(package)  # unlimited: every expert packed at load
    manifest = read_manifest(package)
    entry = manifest.expert_shards()[5]
    tensors = load_shard(package, entry)
    names = expert_tensor_names(entry.layer, entry.expert)
    gate_up = Q4Matrix(torch.cat([tensors[names["gate"]], tensors[names["up"]]]), "torch-int4")
    down = Q4Matrix(tensors[names["down"]], "torch-int4")
    store = engine.transformer.experts
    views = store.packed_layout.views(_read_image(cache_root / layout_key() / f"{entry.sha256}.int4"))
    assert torch.equal(views["gate_up.packed"], gate_up.packed) and torch.equal(views["gate_up.scales"], gate_up.scales)
    assert torch.equal(views["down.packed"], down.packed) and torch.equal(views["down.scales"], down.scales)


def _read_image(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "payload":
        data[HEADER_BYTES + 1000] ^= 0x10
    elif how == "truncated":
        del data[len(data) // 2:]
    elif how == "other-key":
        length = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
        header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + length])
        header["key"] = "torch-0.0-avx512"
        blob = json.dumps(header, separators=(",", ":")).encode()
        data[len(MAGIC):HEADER_BYTES] = (len(blob).to_bytes(4, "little") + blob).ljust(HEADER_BYTES - len(MAGIC), b"\0")
    elif how == "not-a-pack":
        data[:len(MAGIC)] = b"\0" * len(MAGIC)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["payload", "truncated", "other-key", "not-a-pack"])
def test_a_bad_packed_file_is_packed_again_from_its_shard(package, cache_root, how):
    reference = _run(_engine(package))  # packs every expert
    victim = _files(cache_root)[3]
    good = victim.read_bytes()
    _damage(victim, how)
    engine = _engine(package)
    logits, tokens = _run(engine)
    assert torch.equal(logits, reference[0]) and tokens == reference[1]
    packed = engine.transformer.experts.packed
    assert packed.packs == 1 and packed.loads == len(_files(cache_root)) - 1
    assert victim.read_bytes() == good


def test_an_unwritable_cache_never_fails_inference(package, cache_root, monkeypatch):
    reference = _run(_engine(package))
    for f in _files(cache_root):
        f.unlink()
    (cache_root / layout_key()).rmdir()
    cache_root.rmdir()
    cache_root.write_text("a file where the cache directory should be")
    engine = _engine(package, budget_slots=6)
    logits, tokens = _run(engine)
    assert torch.equal(logits, reference[0]) and tokens == reference[1]
    packed = engine.transformer.experts.packed
    assert packed.write_errors == 1 and packed.loads == 0
    assert not any(p.name.endswith(".tmp") for p in cache_root.parent.iterdir())


def test_a_cache_file_of_another_expert_is_not_taken_for_this_one(package, cache_root):
    """Files are found by their shard's sha256: a file renamed to another expert's name fails the
    header check (its source sha256 differs) and is packed again."""
    reference = _run(_engine(package))
    a, b = _files(cache_root)[:2]
    os.replace(a, b)
    engine = _engine(package)
    logits, tokens = _run(engine)
    assert torch.equal(logits, reference[0]) and tokens == reference[1]
    assert engine.transformer.experts.packed.packs == 2  # the renamed file's and the missing one's


def test_prune_keeps_the_named_experts_and_foreign_files(tmp_path):
    root, key = tmp_path / "packed", layout_key()
    keep, drop = "a" * 64, "b" * 64
    files = {
        "kept": root / key / f"{keep}.int4",
        "dropped": root / key / f"{drop}.int4",
        "other-key": root / "torch-0.0-avx512" / f"{keep}.int4",
        "stale-temp": root / key / "x1.tmp",
        "fresh-temp": root / key / "x2.tmp",  # may be a write in progress
        "foreign": root / key / "README",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    os.utime(files["stale-temp"], (0, 0))
    assert prune(root, {keep}) == 3
    assert {name for name, path in files.items() if path.exists()} == {"kept", "fresh-temp", "foreign"}
    assert not (root / "torch-0.0-avx512").exists()
    assert prune(tmp_path / "absent", {keep}) == 0
