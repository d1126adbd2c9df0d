"""Experts on a memory budget: a fixed pool of slots, a replacement policy, background readers.

Rules this module keeps:
- Memory is allocated once: `slots` buffers of one expert file each, sized from the budget.
  Loading an expert is one `pread` of its whole file (header and three tensors) into a free slot,
  with O_DIRECT where the file system allows it: the read bypasses the page cache, so the
  budget is all the memory the experts take (a page-cache copy would count against a memory
  cgroup, and on a PC at its limit would evict the slots' own pages). Nothing is allocated per
  load; the matrices the forward pass uses are views of the slot (bf16 matrices are widened
  copies, rebuilt after each read and counted with their slot).
- The torch-int4 kernel wants its own packed layout: its slots hold an expert's file from the
  per-host packed cache (`model.packed_cache`), read the same way, and the matrices are views
  of it. An expert missing from that cache is read from its shard once, packed in its slot and
  written to the cache; the shards stay the source of truth.
- An expert is used only from a slot whose read completed; a shard file is checked against the
  manifest's size and sha256 the first time it is read in this process, from the bytes in the
  slot (reads after that trust the file, which the agent re-verifies at install and in every
  health check).
- A slot in use (`use` context) or waiting for its read is never evicted; the policy picks the
  victim among the rest.
- `prefetch` (called right after a layer's router, before its attention) queues the missing
  experts to the reader threads, so reads overlap attention; `use` waits only for what has not
  arrived.
- Look-ahead (on by default, with prefetch under a budget) also queues the next layer's likely
  experts behind the current layer's reads; it stops itself where its guesses mostly miss.
- Counters: a lookup is a hit when the expert was resident when the router asked for it and
  still is when the layer uses it, a miss otherwise (every miss is read once, every read is a
  miss); a prefetch hit is a miss whose read finished before the expert was needed.
"""
from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from manifests import ModelManifest, ShardEntry
from model.direct_io import WholeFileReader, align_up, aligned_bytes
from model.errors import BudgetError, IntegrityError, PackageError
from model.kernels import DenseReGLUExpert, Q4Matrix, backend
from model.matrices import make_expert
from model.model import Expert
from model.package import NotARegularFile, expert_tensor_names, parse_shard_header
from model.packed_cache import PackedExpertCache, PackedLayout, default_root

_PARTS = ("gate", "up", "down")
_READ_TIMEOUT_S = 60.0
# Reader threads: two, so one read's Python work (open, checks, views) overlaps the other's device
# time, as a device queue would; the storage simulator still serves one read at a time.
_READERS = 2


# ---- replacement policies ---------------------------------------------------------------------
class LRUPolicy:
    """Evict an expert never used since its read first, else the one used least recently."""

    name = "lru"

    def __init__(self) -> None:
        self.order: OrderedDict = OrderedDict()

    def touch(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key) -> None:
        self.order.pop(key, None)

    def victim(self, candidates: set):
        never_used = candidates - self.order.keys()  # e.g. read on a look-ahead guess that was wrong
        if never_used:
            return min(never_used)
        return next((k for k in self.order if k in candidates), None)


class LFUPolicy:
    """Evict the expert with the lowest decayed use count (hot experts stay; ties go to the oldest)."""

    name = "lfu"

    def __init__(self, decay: float = 0.98) -> None:
        self.decay, self.clock = decay, 0
        self.score: dict = {}
        self.last: dict = {}

    def touch(self, key) -> None:
        self.clock += 1
        age = self.clock - self.last.get(key, self.clock)
        self.score[key] = self.score.get(key, 0.0) * self.decay ** age + 1.0
        self.last[key] = self.clock

    def remove(self, key) -> None:
        self.score.pop(key, None)
        self.last.pop(key, None)

    def victim(self, candidates: set):
        def current(k):
            return self.score.get(k, 0.0) * self.decay ** (self.clock - self.last.get(k, self.clock))

        return min(candidates, key=lambda k: (current(k), self.last.get(k, 0)), default=None)


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


# ---- storage ----------------------------------------------------------------------------------
class StorageSim:
    """A simulated eMMC or SATA SSD: one device serving one read at a time at `mbps` MB/s after
    `latency_us` per read. Reads from several threads queue for the device, as on real storage."""

    def __init__(self, mbps: float, latency_us: float = 0.0):
        if mbps <= 0 or latency_us < 0:
            raise ValueError("storage simulation needs mbps > 0 and latency_us >= 0")
        self.mbps, self.latency_us = mbps, latency_us
        self._lock = threading.Lock()
        self._busy_until = 0.0

    def wait(self, nbytes: int, started: float) -> None:
        """Called after a real read of `nbytes` that began at `started`: sleep until the
        simulated device would have delivered it."""
        with self._lock:
            begin = max(started, self._busy_until)
            self._busy_until = begin + self.latency_us / 1e6 + nbytes / (self.mbps * 1e6)
            done = self._busy_until
        left = done - time.perf_counter()
        if left > 0:
            time.sleep(left)


@dataclass(frozen=True)
class StoreOptions:
    """How an expert store reads and keeps experts (the loader sizes its pool from the budget).

    `policy`: which resident expert a read evicts (`POLICIES`). `prefetch`: the missing experts
    are queued to the background readers right after a layer's router. `lookahead` (with
    prefetch, under a budget): the next layer's likely experts, guessed by its router on the
    current residual, are queued too; it stops itself where its guesses mostly miss
    (`ExpertStore.prefetch_ahead`). `packed_cache_dir`: where the torch-int4 kernel keeps
    experts packed (None: `$ST_PACKED_CACHE` or `~/.cache/smallthinker-fleet/packed`; see
    `model.packed_cache`). `storage`: a simulated slow device every read waits for (benchmarks).
    """

    policy: str = "lru"
    prefetch: bool = True
    lookahead: bool = True
    packed_cache_dir: Path | None = None
    storage: StorageSim | None = None


@dataclass
class _Layout:
    """Where an expert file's gate, up and down tensors sit: (file offset, length) each; gate
    and up are adjacent, so a slot holding the file holds the fused gate_up as one view."""

    ranges: tuple[tuple[int, int], ...]


def _parse_layout(entry: ShardEntry, image: torch.Tensor, part_bytes: tuple[int, ...]) -> _Layout:
    """The layout of the verified expert file in `image`: parsed from the bytes already read, so an
    expert's file is read once, past the page cache (a separate header read would leave its
    read-ahead there)."""
    _, tensors = parse_shard_header(lambda offset, n: image[offset:offset + n].numpy().tobytes(), entry.size, entry.file)
    ranges = []
    for part, expected in zip(_PARTS, part_bytes):
        name = expert_tensor_names(entry.layer, entry.expert)[part]
        stored = tensors.get(name)
        if stored is None:
            raise PackageError(f"{entry.file}: missing tensor {name}")
        if stored.length != expected:
            raise PackageError(f"{entry.file}: {name} has {stored.length} bytes, expected {expected}")
        ranges.append((stored.offset, stored.length))
    (gate_at, gate_len), (up_at, _), _ = ranges
    if up_at != gate_at + gate_len:
        raise PackageError(f"{entry.file}: gate and up tensors are not adjacent (not written by stctl?)")
    return _Layout(tuple(ranges))


def _part_shapes(cfg, quant: str, transposed_down: bool = False) -> tuple[tuple[int, int], ...]:
    """Stored shapes of gate, up, down (or downT): Q4_0 blocks (uint8) or bf16 elements."""
    D, Fh = cfg.hidden_size, cfg.moe_ffn_hidden_size
    if quant == "q4_0":
        down = (Fh, D // 32 * 18) if transposed_down else (D, Fh // 32 * 18)
        return ((Fh, D // 32 * 18), (Fh, D // 32 * 18), down)
    return ((Fh, D), (Fh, D), (D, Fh))


def _int4_tensors(expert: DenseReGLUExpert) -> dict[str, torch.Tensor]:
    """A torch-int4 expert's packed tensors, by the names its packed cache file uses."""
    return {f"{part}.{name}": t for part, m in (("gate_up", expert.gate_up), ("down", expert.down))
            for name, t in m.int4_pack().items()}


def expert_bytes(cfg, quant: str) -> int:
    """Bytes one expert occupies in a slot."""
    itemsize = 1 if quant == "q4_0" else 2
    return sum(r * c * itemsize for r, c in _part_shapes(cfg, quant))


# ---- the store --------------------------------------------------------------------------------
class _Slot:
    def __init__(self, index: int, buf: torch.Tensor, weights: Expert | None):
        self.index, self.buf, self.weights = index, buf, weights
        self.key = None
        self.ready = threading.Event()
        self.error: Exception | None = None
        self.pins = 0
        self.held = False  # pinned by the router's lookup (`prefetch`) until `use` takes the pin
        self.prefetched = False  # its read was queued by `prefetch` (counts a prefetch hit when used)
        self.ahead = False  # read on a look-ahead guess that no lookup has confirmed yet


class ExpertStore:
    """Expert cache with a byte budget over a package's expert shards (q4_0 or bf16)."""

    # Look-ahead keeps guessing while at least half its guesses prove right (judged after 256),
    # and per layer (judged after 32 guesses for that layer): 91% were right on this project's
    # random-weight 4B shape; on the trained demo model 91-95% for every layer but the second,
    # whose router the first layer's residual predicts only 31% of the time
    # (benchmarks/routing_truth.py): those reads are better left to the real lookups.
    lookahead_probation = 256
    lookahead_layer_probation = 32
    lookahead_min_hit_rate = 0.5

    def __init__(self, package_dir: Path, manifest: ModelManifest, config, *, kernel: str | None = None,
                 options: StoreOptions = StoreOptions()):
        """Check the package's experts and size one slot (`slot_bytes`); `allocate` then makes the pool."""
        self.package_dir, self.manifest, self.cfg = package_dir, manifest, config
        self.entries = {(e.layer, e.expert): e for e in manifest.expert_shards()}
        expected = {(i, e) for i in range(config.num_hidden_layers) for e in range(config.moe_num_primary_experts)}
        if set(self.entries) != expected:
            missing = sorted(expected - set(self.entries))[:1]
            raise PackageError(f"manifest lacks expert shards, e.g. layer {missing[0][0]} expert {missing[0][1]}"
                               if missing else "manifest lists experts the config does not have")
        down_names = {expert_tensor_names(i, e)["down"] for i, e in self.entries}
        transposed = down_names & set(manifest.transposed)
        if transposed and transposed != down_names:
            raise PackageError("manifest transposes the down matrix of some experts but not all")
        self.sparse = bool(transposed)  # down stored [F, D]: sparse ReGLU over active rows
        if self.sparse and manifest.quant != "q4_0":
            raise PackageError("transposed expert down matrices need quant q4_0")
        self.shapes = _part_shapes(config, manifest.quant, self.sparse)
        dtype, itemsize = (torch.uint8, 1) if manifest.quant == "q4_0" else (torch.bfloat16, 2)
        self.part_bytes = tuple(r * c * itemsize for r, c in self.shapes)
        self.expert_bytes = expert_bytes(config, manifest.quant)
        self.kernel, self.dtype = kernel, dtype
        self.image_bytes = align_up(max(e.size for e in self.entries.values()))  # the largest file
        self.reader = WholeFileReader()
        self.buffer_bytes, copy_bytes = self.image_bytes, 0
        self.packed = self.packed_layout = None
        int4 = manifest.quant == "q4_0" and (kernel or backend()) == "torch-int4"
        root = None
        if int4 and not self.sparse:
            root = Path(options.packed_cache_dir) if options.packed_cache_dir is not None else default_root()
        if root is not None:  # slots hold packed cache files (an expert is packed in its slot once)
            self.packed = PackedExpertCache(root)
            self.packed_layout = PackedLayout(_int4_tensors(self._expert_from_parts(*self._blank_parts())))
            self.buffer_bytes = max(self.image_bytes, align_up(self.packed_layout.file_bytes))
        elif int4 or manifest.quant != "q4_0":
            # packed (sparse torch-int4) or float32 (bf16) copies, rebuilt after each read and
            # counted against the budget with the slot they come from
            copy_bytes = self._expert_from_parts(*self._blank_parts()).nbytes
        self.slot_bytes = self.buffer_bytes + copy_bytes
        self.policy_name, self.prefetch_enabled, self.storage = options.policy, options.prefetch, options.storage
        self.lookahead = options.lookahead and options.prefetch
        self.readers: list[threading.Thread] = []  # started by `allocate`, stopped by `close`

    def allocate(self, budget_bytes: int | None) -> None:
        """Make the slot pool: as many slots as `budget_bytes` holds (None: every expert, read now)."""
        config = self.cfg
        total = len(self.entries)
        n_slots = total if budget_bytes is None else min(total, budget_bytes // self.slot_bytes)
        minimum = config.moe_num_active_primary_experts
        if n_slots < minimum:
            raise BudgetError(f"expert budget {budget_bytes} bytes holds {n_slots} experts; "
                              f"a layer needs {minimum} ({minimum * self.slot_bytes} bytes)")
        self.slots = [self._make_slot(i) for i in range(n_slots)]
        if budget_bytes is not None:
            # touched now, so the budget is resident from load: a slot's first read does not fault
            # its pages in mid-decode (under a memory cgroup at its limit each fault reclaims a page)
            for slot in self.slots:
                slot.buf.zero_()
        self.free = list(reversed(self.slots))
        self.where: dict = {}  # (layer, expert) -> slot
        self.policy = POLICIES[self.policy_name]()
        self.layouts: dict = {}
        self.lock = threading.Lock()
        self.counter_lock = threading.Lock()  # read counters (readers and `use` both count)
        self.hits = self.misses = self.prefetch_hits = self.bytes_read = self.outstanding = 0
        self.counted_hits: set = set()  # the last lookup's hits (a later read turns one into a miss)
        self.lookahead_reads = self.lookahead_hits = 0
        self.lookahead_paused = False
        self.lookahead_by_layer: dict[int, list[int]] = {}  # layer guessed -> [reads, hits]
        self.lookahead_paused_layers: set[int] = set()
        self.read_seconds = 0.0
        self.queue: queue.Queue = queue.Queue()
        self.readers = [threading.Thread(target=self._reader_loop, name=f"expert-reader-{i}", daemon=True)
                        for i in range(_READERS)]
        for reader in self.readers:
            reader.start()
        self.all_resident = False
        if budget_bytes is None:
            self.lookahead = False
            self.preload()
            self.resident_weights = {key: slot.weights for key, slot in self.where.items()}
            self.resident = {key: nullcontext(w) for key, w in self.resident_weights.items()}
            self.all_resident = True

    def _make_slot(self, index: int) -> _Slot:
        return _Slot(index, aligned_bytes(self.buffer_bytes), None)

    def _blank_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero gate_up and down tensors of one expert's shapes (to size the copies a kernel makes)."""
        (f, cols), _, down_shape = self.shapes
        return torch.zeros(2 * f, cols, dtype=self.dtype), torch.zeros(*down_shape, dtype=self.dtype)

    def _expert_in(self, image: torch.Tensor, layout: _Layout) -> Expert:
        """The expert whose weights are views of the file image in a slot."""
        (f, cols), _, down_shape = self.shapes
        (gate_at, gate_len), (_, up_len), (down_at, down_len) = layout.ranges
        gate_up = image[gate_at:gate_at + gate_len + up_len].view(self.dtype).view(2 * f, cols)
        down = image[down_at:down_at + down_len].view(self.dtype).view(*down_shape)
        return self._expert_from_parts(gate_up, down)

    def _expert_from_parts(self, gate_up: torch.Tensor, down: torch.Tensor) -> Expert:
        """gate_up [2F, .] (gate rows, then up rows) and down (or downT) as the kernel wants them,
        repacked (if the kernel repacks) in the slot itself."""
        return make_expert(gate_up, down, self.manifest.quant, self.kernel, sparse=self.sparse, in_place=True)

    @property
    def nbytes(self) -> int:
        return len(self.slots) * self.slot_bytes

    @property
    def capacity(self) -> int:
        return len(self.slots)

    # ---- reading ----------------------------------------------------------------------------
    def _read_into(self, key, slot: _Slot) -> None:
        entry = self.entries[key]
        started = time.perf_counter()
        packed = self.packed
        if packed is not None and packed.load(self.packed_layout, entry.sha256, slot.buf):
            if self.storage:
                self.storage.wait(self.packed_layout.file_bytes, started)
            slot.weights = self._packed_expert(slot.buf)
            weight_bytes = self.packed_layout.payload_bytes
        else:
            self._read_shard(entry, slot.buf)
            if self.storage:
                self.storage.wait(entry.size, started)
            layout = self.layouts.get(key)
            if layout is None:  # the first read of this file in this process: check it, then parse it
                if hashlib.sha256(slot.buf[:entry.size].numpy()).hexdigest() != entry.sha256:
                    raise IntegrityError(f"{entry.file}: sha256 mismatch (corrupt or tampered shard)")
                layout = self.layouts[key] = _parse_layout(entry, slot.buf, self.part_bytes)
            slot.weights = self._expert_in(slot.buf, layout)
            if packed is not None:  # the repacked copies move into the slot (and the cache)
                self.packed_layout.write(slot.buf, _int4_tensors(slot.weights), entry.sha256)
                packed.save(self.packed_layout, entry.sha256, slot.buf)
                slot.weights = self._packed_expert(slot.buf)
            weight_bytes = self.expert_bytes
        with self.counter_lock:
            self.bytes_read += weight_bytes  # weights, not file headers
            self.read_seconds += time.perf_counter() - started

    def _packed_expert(self, image: torch.Tensor) -> DenseReGLUExpert:
        """The expert whose torch-int4 matrices are views of a packed cache file in a slot."""
        t, D, F = self.packed_layout.views(image), self.cfg.hidden_size, self.cfg.moe_ffn_hidden_size
        return DenseReGLUExpert(Q4Matrix.from_int4_pack(t["gate_up.packed"], t["gate_up.scales"], 2 * F, D),
                                Q4Matrix.from_int4_pack(t["down.packed"], t["down.scales"], D, F))

    def _read_shard(self, entry: ShardEntry, image: torch.Tensor) -> None:
        """The whole shard file into `image` with one read."""
        try:
            got = self.reader.read(self.package_dir / entry.file, entry.size, image)
        except FileNotFoundError:
            raise IntegrityError(f"{entry.file}: missing from package {self.package_dir}") from None
        except NotARegularFile:
            raise IntegrityError(f"{entry.file}: not a regular file") from None
        if got != entry.size:
            raise IntegrityError(f"{entry.file}: size {got} bytes, manifest says {entry.size}")

    def _reader_loop(self) -> None:
        while (job := self.queue.get()) is not None:
            key, slot = job
            try:
                self._read_into(key, slot)
            except Exception as e:  # handed to the thread that waits for this slot
                slot.error = e
            slot.ready.set()

    # ---- slots ------------------------------------------------------------------------------
    def _claim_slot(self, key) -> _Slot | None:
        """A slot for `key`, evicting by policy; None when every slot is pinned. Caller holds lock."""
        if self.free:
            slot = self.free.pop()
        else:
            candidates = {k for k, s in self.where.items() if s.pins == 0 and s.ready.is_set()}
            victim = self.policy.victim(candidates)
            if victim is None:
                return None
            slot = self.where.pop(victim)
            self.policy.remove(victim)
        slot.key, slot.error, slot.prefetched, slot.ahead = key, None, False, False
        slot.ready.clear()
        self.where[key] = slot
        return slot

    def _drop(self, slot: _Slot) -> None:
        """Forget a slot whose read failed. Caller holds lock."""
        if self.where.get(slot.key) is slot:
            del self.where[slot.key]
        self.policy.remove(slot.key)
        slot.key = None
        self.free.append(slot)

    def preload(self) -> None:
        """Read every expert now (unlimited budget): no reads during decode."""
        for key in self.entries:
            with self.lock:
                slot = self._claim_slot(key)
            self._read_into(key, slot)
            slot.ready.set()
        self.bytes_read = 0

    def prefetch(self, layer: int, expert_ids: list[int]) -> list[int]:
        """Count the router's lookups and queue reads for the missing experts (if prefetch is on);
        returns the experts in the order they will be ready: resident ones first, then the
        missing ones in the order their reads were queued. One token's choice (at most top-k
        experts) stays pinned until used, so reading the missing ones cannot evict the resident
        ones; a batch's (prefill) can be larger than the pool, so only its reads are pinned."""
        if self.all_resident:
            self.hits += len(expert_ids)
            return expert_ids
        hold_hits = len(expert_ids) <= self.cfg.moe_num_active_primary_experts
        resident, guessed, missing = [], [], []
        with self.lock:
            self.counted_hits.clear()
            for e in expert_ids:
                key = (layer, e)
                slot = self.where.get(key)
                if slot is not None and slot.ahead:  # read on a look-ahead guess: a miss, already queued
                    slot.ahead, slot.prefetched = False, True
                    self.misses += 1
                    self.lookahead_hits += 1
                    self.lookahead_by_layer[layer][1] += 1
                    guessed.append(e)
                    self._hold(slot)
                    continue
                if slot is not None:
                    self.hits += 1
                    self.counted_hits.add(key)
                    resident.append(e)
                    if hold_hits and not slot.held:
                        self._hold(slot)
                    continue
                self.misses += 1
                missing.append(e)
                if not self.prefetch_enabled:
                    continue
                slot = self._claim_slot(key)
                if slot is None:
                    continue  # every slot busy: `use` reads it when needed
                slot.prefetched = True
                self._hold(slot)
                self.queue.put((key, slot))
        return resident + guessed + missing

    def prefetch_ahead(self, layer: int, expert_ids: list[int]) -> None:
        """Look-ahead: queue reads for the experts `layer` will probably pick (its router on the
        previous layer's residual), behind the reads already queued. Nothing is pinned or counted:
        the layer's own lookup counts a guessed expert as a miss (and a prefetch hit if it arrived),
        and a wrong guess is an ordinary evictable slot (`lookahead_reads` - `lookahead_hits`).
        Look-ahead stops for good (`lookahead_paused`) once `lookahead_probation` guesses were
        read and fewer than `lookahead_min_hit_rate` of them were right, and for one layer
        (`lookahead_paused_layers`) once `lookahead_layer_probation` guesses for that layer were."""
        if not self.lookahead or self.lookahead_paused or layer in self.lookahead_paused_layers:
            return
        if self.lookahead_reads >= self.lookahead_probation and \
                self.lookahead_hits < self.lookahead_min_hit_rate * self.lookahead_reads:
            self.lookahead_paused = True  # its guesses mostly miss here: they would only cost reads
            return
        reads, hits = self.lookahead_by_layer.setdefault(layer, [0, 0])
        if reads >= self.lookahead_layer_probation and hits < self.lookahead_min_hit_rate * reads:
            self.lookahead_paused_layers.add(layer)  # this layer's router is not predictable one layer early
            return
        with self.lock:
            for e in expert_ids:
                key = (layer, e)
                if key in self.where:
                    continue
                slot = self._claim_slot(key)
                if slot is None:
                    return
                slot.ahead = True
                self.lookahead_reads += 1
                self.lookahead_by_layer[layer][0] += 1
                self.queue.put((key, slot))

    def _hold(self, slot: _Slot) -> None:
        slot.held = True
        slot.pins += 1
        self.outstanding += 1

    def resident_experts(self, layer: int, expert_ids: list[int]) -> list | None:
        """The experts' weights with no pin and no wait when every expert stays resident for good
        (unlimited budget), so a layer can run them all in one call; else None (use `use`)."""
        if not self.all_resident:
            return None
        return [self.resident_weights[(layer, e)] for e in expert_ids]

    def use(self, layer: int, expert: int):
        """The expert's weights, pinned (never evicted) for the duration of the block."""
        if self.all_resident:  # nothing is ever evicted or read: no pin, no lock
            return self.resident[(layer, expert)]
        return self._use_slot((layer, expert))

    @contextmanager
    def _use_slot(self, key):
        with self.lock:
            slot = self.where.get(key)
            must_read = slot is None
            if must_read:
                if key in self.counted_hits:  # a batch's reads evicted it after its lookup: it missed
                    self.counted_hits.discard(key)
                    self.hits -= 1
                    self.misses += 1
                slot = self._claim_slot(key)
                if slot is None:
                    raise BudgetError("every expert slot is pinned; the budget is too small for this batch")
                slot.pins += 1
            elif slot.held:  # the lookup's pin becomes this use's pin
                slot.held = False
                self.outstanding -= 1
                if slot.prefetched:
                    slot.prefetched = False
                    if slot.ready.is_set():
                        self.prefetch_hits += 1
            else:
                slot.pins += 1
        try:
            if must_read:
                try:
                    self._read_into(key, slot)
                except Exception as e:
                    slot.error = e
                slot.ready.set()
            elif not slot.ready.wait(_READ_TIMEOUT_S):
                raise IntegrityError(f"reading {self.entries[key].file} timed out")
            if slot.error is not None:
                raise slot.error
            with self.lock:
                self.policy.touch(key)
            yield slot.weights
        finally:
            with self.lock:
                slot.pins -= 1
                if slot.error is not None and slot.pins == 0 and slot.key == key:
                    self._drop(slot)

    def settle(self) -> None:
        """Release lookup pins a forward pass did not consume (e.g. it stopped on an error)."""
        if not self.outstanding:
            return
        with self.lock:
            for slot in self.slots:
                if slot.held:
                    slot.ready.wait(_READ_TIMEOUT_S)
                    slot.held = slot.prefetched = False
                    slot.pins -= 1
                    if slot.error is not None and slot.pins == 0:
                        self._drop(slot)
            self.outstanding = 0

    def close(self) -> None:
        """Stop the reader threads once the reads queued so far are done; idempotent. Reads
        after that happen in the thread that uses the expert (no prefetch, no look-ahead)."""
        self.prefetch_enabled = self.lookahead = False
        readers, self.readers = self.readers, []
        for _ in readers:
            self.queue.put(None)
        for reader in readers:
            reader.join(_READ_TIMEOUT_S)

    def stats(self) -> dict:
        return {"expert_cache_hits": self.hits, "expert_cache_misses": self.misses,
                "prefetch_hits": self.prefetch_hits, "bytes_read": self.bytes_read}
