"""The sliding-window layer stream (TPI-LLM): a model larger than memory runs with the units that fit
pinned in memory and the others read, every forward pass, through a window of W slots.

A unit is what the single file stores contiguously and page-aligned: one layer, or the output head.
Pinned units are read once ("LLM in a flash" keeps what fits resident). W slots are allocated once; a
reader thread fills them with the next streamed units in the order the forward pass uses them
(layer 0, 1, ..., head, then layer 0 again for the next token) while the current unit computes. Reads are explicit `preadv` calls into the slots (they release the GIL) and
each unit's pages are dropped from the page cache after the read, so resident memory is what the
stream decides, not what the kernel happens to cache.

The forward pass asks for units in order (`acquire`, `release`); anything else (an interrupted
pass, a new request) re-aligns the window on the unit asked for.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EdgeInferError, ModelFormatError
from ..kernels.q4 import ROWS  # rows per block of a 4/8-bit matrix (q8.py shares it)
from .direct_io import aligned_buffer, open_direct
from .quantize import matrix_from_parts
from .safetensors import DTYPES, to_float32
from .units import Unit, UnitView, file_units

if TYPE_CHECKING:
    from .single import SingleFileSource


@dataclass
class StreamStats:
    bytes_read: int = 0
    read_seconds: float = 0.0  # the reader thread's time in preadv
    wait_seconds: float = 0.0  # the compute's time blocked on a unit not yet read
    units: int = 0
    passes: int = 0  # forward passes (each reads every streamed unit once)
    busy_seconds: float = 0.0  # from each pass's first acquire to its head's release
    pinned_bytes: int = 0  # read once, held across passes

    @property
    def read_mb_s(self) -> float:
        return self.bytes_read / self.read_seconds / 1e6 if self.read_seconds else 0.0

    def describe(self) -> str:
        per_pass = self.bytes_read / max(self.passes, 1) / 1e6
        waited = self.wait_seconds / self.busy_seconds if self.busy_seconds else 0.0
        return (f"stream: {per_pass:.0f} MB read per forward pass at {self.read_mb_s:.0f} MB/s "
                f"({self.pinned_bytes / 1e6:.0f} MB pinned); the compute waited for reads {waited:.0%} of the time")


@dataclass
class _Load:
    unit: int  # index into the streamed units
    slot: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class LayerStream:
    """The pinned units, and W slots cycling over the others; acquire(key) returns the unit's view
    once it is read."""

    def __init__(self, source: SingleFileSource, window: int, layers_only: bool = False,
                 pinned: tuple[int | str, ...] = ()):
        """pinned: the keys of the units held across passes (memory_plan.py chooses them)."""
        self.source, self.units = source, file_units(source, layers_only)
        if window < 1:
            raise EdgeInferError("the streaming window needs at least one unit slot")
        self.streamed = [u for u in self.units if u.key not in pinned]
        self.window = min(window, len(self.streamed))
        slot_bytes = max((u.size for u in self.streamed), default=0)
        self._free = [aligned_buffer(slot_bytes) for _ in range(self.window)]
        self._fd, self.direct = open_direct(source.path)
        self.stats = StreamStats()
        self._pinned = {u.key: self._read_pinned(u) for u in self.units if u.key in pinned}
        self._pending: deque[_Load] = deque()
        self._requests: deque[_Load] = deque()
        self._wake = threading.Condition()
        self._next = 0
        self._pass_started = time.perf_counter()
        # A daemon: it lives as long as the model, waiting for requests, and ends with the process.
        self._reader = threading.Thread(target=self._read_loop, name="edgeinfer-prefetch", daemon=True)
        self._reader.start()
        self._fill()

    def _read_pinned(self, unit: Unit) -> UnitView:
        buffer = aligned_buffer(unit.size)
        self._read(unit, buffer)
        self.stats.pinned_bytes += unit.size
        return UnitView(self.source, unit, buffer)

    def acquire(self, key: int | str) -> UnitView:
        if key == self.units[0].key:
            self._pass_started = time.perf_counter()
        if key in self._pinned:
            return self._pinned[key]
        i = next(i for i, u in enumerate(self.streamed) if u.key == key)
        if not self._pending or self._pending[0].unit != i:
            self._realign(i)
        load = self._pending[0]
        if not load.done.is_set():
            t = time.perf_counter()
            load.done.wait()
            self.stats.wait_seconds += time.perf_counter() - t
        if load.error is not None:
            raise load.error
        return UnitView(self.source, self.streamed[i], load.slot)

    def release(self, key: int | str) -> None:
        if key == self.units[-1].key:  # the end of a forward pass
            self.stats.passes += 1
            self.stats.busy_seconds += time.perf_counter() - self._pass_started
        if key in self._pinned:
            return
        load = self._pending.popleft()
        self._free.append(load.slot)
        self._fill()

    def settle(self) -> None:
        """Wait for the reads already queued ahead (the slots refilled for the next pass)."""
        for load in list(self._pending):
            load.done.wait()

    def _fill(self) -> None:
        """Queue the next streamed units, in forward order, into the free slots."""
        with self._wake:
            while self._free:
                load = _Load(self._next, self._free.pop())
                self._next = (self._next + 1) % len(self.streamed)
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
            unit = self.streamed[load.unit]
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



class StreamedRows:
    """Embedding rows read from the file on demand (one block of ROWS rows per token, some KB), so
    the table is never resident: `rows(ids)` as DenseLinear and QuantLinear have it."""

    def __init__(self, source: SingleFileSource, name: str):
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
        block, parts = i // ROWS, []
        for e in entries:  # each part is (blocks, bytes per block): one block of ROWS rows
            per_block = e.nbytes // e.shape[0]
            raw = os.pread(self._fd, per_block, f.offset(e.name) + block * per_block)
            parts.append(np.frombuffer(raw, DTYPES[e.dtype]).reshape(1, -1))
        return matrix_from_parts(kind, ROWS, cols, parts, copy=False).dequantize(np.array([i % ROWS]))[0]
