"""The sliding-window memory scheduler (TPI-LLM): a model larger than memory runs with W units resident.

A unit is what the single file stores contiguously and page-aligned: one layer, or the output head.
W slots are allocated once; a reader thread fills them with the next units in the order the
forward pass uses them (layer 0, 1, ..., head, then layer 0 again for the next token) while the
current unit computes. Reads are explicit `preadv` calls into the slots (they release the GIL) and
each unit's pages are dropped from the page cache after the read, so resident memory is what the
scheduler decides, not what the kernel happens to cache.

The forward pass asks for units in order (`acquire`, `release`); anything else (an interrupted
pass, a new request) re-aligns the window on the unit asked for.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgeInferError, ModelFormatError
from .quantize import matrix_from_parts
from .safetensors import DTYPES, PAGE, to_float32
from .source import HEAD, WeightSource, unit_of


@dataclass(frozen=True)
class Unit:
    key: int | str  # a layer index, or HEAD (the unit holding the output matrix)
    start: int  # byte offset in the file (page-aligned)
    size: int  # bytes to read, rounded up to whole pages
    data_end: int  # where its last tensor ends, from start: a shorter read means a truncated file
    entries: dict[str, tuple[int, str, tuple[int, ...]]]  # stored tensor -> (offset in the unit, dtype, shape)


def file_units(source: "SingleFileSource", head: bool = True) -> list[Unit]:  # noqa: F821 (single.py imports us)
    """The layers, then (unless `head` is false: a cluster worker) the unit holding the output matrix
    (the embedding's, when tied)."""
    f = source.file
    spans: dict[int | str, list[str]] = {}
    for stored in f.entries:
        owner = source.owner_of(stored)
        if owner is not None:
            spans.setdefault(unit_of(owner), []).append(stored)
    head_name = "model.embed_tokens.weight" if source.config.tie_embeddings else "lm_head.weight"
    keys = list(range(source.config.num_layers)) + ([unit_of(head_name)] if head else [])
    units = []
    for key in keys:
        names = spans[key]
        begin = min(f.offset(n) for n in names) // PAGE * PAGE
        end = max(f.offset(n) + f.entries[n].nbytes for n in names)
        entries = {n: (f.offset(n) - begin, f.entries[n].dtype, f.entries[n].shape) for n in names}
        units.append(Unit(key if isinstance(key, int) else HEAD, begin, -(-(end - begin) // PAGE) * PAGE,
                          end - begin, entries))
    return units


class UnitView(WeightSource):
    """The tensors of one unit, as views into the slot that holds it (nothing is copied)."""

    def __init__(self, source: "SingleFileSource", unit: Unit, slot: np.ndarray):  # noqa: F821
        self.config, self.tokenizer, self.path, self.format = source.config, source.tokenizer, source.path, "slot"
        self._source, self._unit, self._slot = source, unit, slot

    def _stored(self, name: str) -> np.ndarray:
        offset, dtype, shape = self._unit.entries[name]
        count = int(np.prod(shape, dtype=np.int64))
        return self._slot[offset:offset + count * DTYPES[dtype].itemsize].view(DTYPES[dtype]).reshape(shape)

    def has(self, name: str) -> bool:
        return name in self._unit.entries or self._source.quantized_parts(name) is not None

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self._source.stored_shape(name)

    def float32(self, name: str) -> np.ndarray:
        matrix = self.quantized(name)
        return to_float32(self._stored(name), self._unit.entries[name][1]) if matrix is None else matrix.dequantize()

    def quantized(self, name: str):
        parts = self._source.quantized_parts(name)
        if parts is None:
            return None
        (kind, rows, cols), entries = parts
        return matrix_from_parts(kind, rows, cols, [self._stored(e.name) for e in entries], copy=False)


@dataclass
class StreamStats:
    bytes_read: int = 0
    read_seconds: float = 0.0  # the reader thread's time in preadv
    wait_seconds: float = 0.0  # the compute's time blocked on a unit not yet read
    units: int = 0
    passes: int = 0  # forward passes (each reads every unit once)
    busy_seconds: float = 0.0  # from each pass's first acquire to its head's release

    @property
    def read_mb_s(self) -> float:
        return self.bytes_read / self.read_seconds / 1e6 if self.read_seconds else 0.0

    def describe(self) -> str:
        per_pass = self.bytes_read / max(self.passes, 1) / 1e6
        waited = self.wait_seconds / self.busy_seconds if self.busy_seconds else 0.0
        return (f"stream: {per_pass:.0f} MB read per forward pass at {self.read_mb_s:.0f} MB/s; the compute "
                f"waited for reads {waited:.0%} of the time")


@dataclass
class _Load:
    unit: int  # index into the units list
    slot: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class LayerStream:
    """W slots cycling over the units; acquire(i) returns unit i's view once it is read."""

    def __init__(self, source: "SingleFileSource", window: int, head: bool = True):  # noqa: F821
        self.source, self.units = source, file_units(source, head)
        if window < 1:
            raise EdgeInferError("the streaming window needs at least one unit slot")
        self.window = min(window, len(self.units))
        slot_bytes = max(u.size for u in self.units)
        self._free = [aligned_buffer(slot_bytes) for _ in range(self.window)]
        self._fd, self.direct = open_direct(source.path)
        self._pending: deque[_Load] = deque()
        self._requests: deque[_Load] = deque()
        self._wake = threading.Condition()
        self._next = 0
        self.stats = StreamStats()
        self._pass_started = time.perf_counter()
        # A daemon: it lives as long as the model, waiting for requests, and ends with the process.
        self._reader = threading.Thread(target=self._read_loop, name="edgeinfer-prefetch", daemon=True)
        self._reader.start()
        self._fill()

    def index(self, key: int | str) -> int:
        return next(i for i, u in enumerate(self.units) if u.key == key)

    def acquire(self, key: int | str) -> UnitView:
        i = self.index(key)
        if i == 0:
            self._pass_started = time.perf_counter()
        if not self._pending or self._pending[0].unit != i:
            self._realign(i)
        load = self._pending[0]
        if not load.done.is_set():
            t = time.perf_counter()
            load.done.wait()
            self.stats.wait_seconds += time.perf_counter() - t
        if load.error is not None:
            raise load.error
        return UnitView(self.source, self.units[i], load.slot)

    def release(self, key: int | str) -> None:
        if self.index(key) == len(self.units) - 1:  # the end of a forward pass
            self.stats.passes += 1
            self.stats.busy_seconds += time.perf_counter() - self._pass_started
        load = self._pending.popleft()
        self._free.append(load.slot)
        self._fill()

    def _fill(self) -> None:
        """Queue the next units, in forward order, into the free slots."""
        with self._wake:
            while self._free:
                load = _Load(self._next, self._free.pop())
                self._next = (self._next + 1) % len(self.units)
                self._pending.append(load)
                self._requests.append(load)
            self._wake.notify()

    def _realign(self, i: int) -> None:
        for load in self._pending:
            load.done.wait()
            self._free.append(load.slot)
        self._pending.clear()
        self._next = i
        self._fill()

    def _read_loop(self) -> None:
        while True:
            with self._wake:
                while not self._requests:
                    self._wake.wait()
                load = self._requests.popleft()
            unit = self.units[load.unit]
            t = time.perf_counter()
            try:
                self._read(unit, load.slot)
            except Exception as exc:  # handed to the compute thread, which raises it
                load.error = exc
            self.stats.read_seconds += time.perf_counter() - t
            self.stats.bytes_read += unit.size
            self.stats.units += 1
            load.done.set()

    def _read(self, unit: Unit, slot: np.ndarray) -> None:
        view = memoryview(slot)[:unit.size]
        got = 0
        while got < unit.size:
            n = os.preadv(self._fd, [view[got:]], unit.start + got)
            if n == 0:
                break
            got += n
        if got < unit.data_end:  # the last unit may end before its last page; nothing may end early
            raise ModelFormatError(f"{self.source.path}: the file ends inside layer data (truncated while "
                                   "the model was running?)")
        if not self.direct:  # read through the page cache: let the kernel drop what we read
            os.posix_fadvise(self._fd, unit.start, unit.size, os.POSIX_FADV_DONTNEED)


def open_direct(path: str) -> tuple[int, bool]:
    """The file opened for O_DIRECT reads (bypassing the page cache: page-aligned slots, offsets and
    sizes make that possible), or for plain reads where the filesystem refuses it (tmpfs)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except (OSError, AttributeError):
        return os.open(path, os.O_RDONLY), False


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned buffer of nbytes (O_DIRECT-friendly, and whole pages for the reads)."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    skip = -raw.ctypes.data % PAGE
    return raw[skip:skip + nbytes]


class StreamedRows:
    """Embedding rows read from the file on demand (one 4-row block per token, a few KB), so the
    table is never resident: `rows(ids)` as DenseLinear and QuantLinear have it."""

    def __init__(self, source: "SingleFileSource", name: str):  # noqa: F821
        self.source, self.name = source, name
        self._fd = os.open(source.path, os.O_RDONLY)
        self._parts = source.quantized_parts(name)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.stack([self._row(int(i)) for i in ids]).astype(np.float32)

    def _row(self, i: int) -> np.ndarray:
        f = self.source.file
        if self._parts is None:
            entry = f.entries[self.name]
            row_bytes = entry.nbytes // entry.shape[0]
            raw = os.pread(self._fd, row_bytes, f.offset(self.name) + i * row_bytes)
            return to_float32(np.frombuffer(raw, DTYPES[entry.dtype]), entry.dtype)
        (kind, _, cols), entries = self._parts
        block, parts = i // 4, []
        for e in entries:  # each part is (blocks, bytes per block): one block of 4 interleaved rows
            per_block = e.nbytes // e.shape[0]
            raw = os.pread(self._fd, per_block, f.offset(e.name) + block * per_block)
            parts.append(np.frombuffer(raw, DTYPES[e.dtype]).reshape(1, -1))
        return matrix_from_parts(kind, 4, cols, parts, copy=False).dequantize(np.array([i % 4]))[0]


def parse_size(text: str) -> int:
    """'2G', '512M', '1.5GB', '40m', '123456' -> bytes (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(number)
    except ValueError:
        raise EdgeInferError(f"--mem-limit takes a size such as 2G or 512M, got {text!r}") from None
    if value <= 0:
        raise EdgeInferError(f"--mem-limit must be positive, got {text!r}")
    return int(value * units[unit])


def process_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


# What the compiled kernels and their first calls add to the process (measured: SmolLM2 warm-up adds
# ~110 MB of RSS over the imports), with room to spare.
KERNELS_ALLOWANCE = 160 << 20


@dataclass(frozen=True)
class MemoryPlan:
    weights: int  # every tensor, as the file stores it
    slot: int  # the largest unit (a layer, or the head)
    units: int
    kv_cache: int
    scratch: int
    runtime: int  # this process before loading, plus the kernels' allowance
    limit: int | None
    window: int | None  # None: fully resident

    @property
    def resident_need(self) -> int:
        return self.runtime + self.weights + self.kv_cache + self.scratch

    @property
    def need(self) -> int:
        if self.window is None:
            return self.resident_need
        return self.runtime + self.kv_cache + self.scratch + self.window * self.slot

    def describe(self) -> str:
        mb = lambda n: f"{n / 2**20:.0f} MB"  # noqa: E731
        head = (f"memory: weights {mb(self.weights)} (largest layer {mb(self.slot)}), KV cache {mb(self.kv_cache)}, "
                f"scratch {mb(self.scratch)}, runtime {mb(self.runtime)}")
        if self.window is None:
            plan = f"fully resident, {mb(self.need)}"
        else:
            plan = (f"streaming, window of {self.window} of {self.units} layer slots ({mb(self.window * self.slot)}), "
                    f"{mb(self.need)}")
        return f"{head}; plan: {plan}" + (f" within --mem-limit {mb(self.limit)}" if self.limit else "")


def plan_memory(source: WeightSource, context: int, limit: int | None, kv_cache: int, batch: int = 512,
                ends: bool = True) -> MemoryPlan:
    """What running `source` at `context` needs, and how: resident if it fits the limit (or, with no
    limit, the memory available now), else the widest window that does. kv_cache: its bytes at
    `context` (model.cache_size). ends: whether the embedding and head are loaded (not on a cluster
    worker)."""
    c = source.config
    streamable = hasattr(source, "quantized_parts")
    weights = source.file_size() if ends or not streamable else sum(u.size for u in file_units(source, head=False))
    tokens = min(batch, context)
    scratch = 4 * (tokens * (8 * c.hidden_size + 4 * c.intermediate_size) + c.num_heads * context + 2 * c.vocab_size)
    runtime = process_rss() + KERNELS_ALLOWANCE
    slot = max(u.size for u in file_units(source, ends)) if streamable else weights
    units = c.num_layers + ends
    plan = MemoryPlan(weights, slot, units, kv_cache, scratch, runtime, limit, None)
    budget = limit if limit is not None else available_memory()
    if plan.resident_need <= budget:
        return plan
    window = min(units, (budget - runtime - kv_cache - scratch) // slot)
    if not streamable:
        raise EdgeInferError(f"{source.path} needs {plan.resident_need / 2**20:.0f} MB resident but "
                             f"{'--mem-limit' if limit else 'this machine'} allows {budget / 2**20:.0f} MB; "
                             "streaming needs edgeinfer's single file: edgeinfer convert MODEL -o FILE --bits 4")
    if window < 1:
        least = runtime + kv_cache + scratch + slot
        raise EdgeInferError(f"{'--mem-limit' if limit else 'available memory'} {budget / 2**20:.0f} MB is too small: "
                             f"the least this model runs in at --ctx {context} is {least / 2**20:.0f} MB (runtime "
                             f"{runtime / 2**20:.0f} + KV cache {kv_cache / 2**20:.0f} + scratch {scratch / 2**20:.0f} + "
                             f"one layer slot {slot / 2**20:.0f})")
    return MemoryPlan(weights, slot, units, kv_cache, scratch, runtime, limit, int(window))
