"""The memory plan: before any weight is read, what running a model at a context needs (weights,
KV cache, scratch, runtime) and how it fits a limit: fully resident, or streaming its layers through
a window of slots (layer_stream.py). Also the process's memory readings it plans with."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from ..errors import EdgeInferError
from .source import WeightSource
from .units import Unit, file_units


class MemoryLimitError(EdgeInferError):
    """The model does not run within the limit (or the memory available) at the context asked."""


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


def held_rss() -> int:
    """The process's resident bytes once the heap that was freed is given back (glibc keeps freed
    memory mapped: the tokenizer's parse leaves ~25 MB of it on SmolLM2, which the weights then
    reuse; counted as runtime it was counted twice)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass
    return process_rss()


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


# What loading the compiled kernels and their first calls add to the process: Numba's lowering
# registries and LLVM's code pages (measured, warm-up over the loaded model: 54-60 MB on SmolLM2,
# Gemma 3 270M and the 1B shape), with a little room. A tokenizer built before the plan is counted
# in the process as it stands, one still to build by its estimate (TokenizerSpec.held_bytes).
# Kernels loaded before the plan (jit_cache.preload) are in the process already; their first calls
# add 5 MB (measured on SmolLM2). A GGUF converted at load gives back each slab's file pages as it
# goes (storage/gguf_quants.gguf_matrix), so its load peaks within a few MB of what it then holds.
KERNELS_ALLOWANCE = 64 << 20
FIRST_CALLS_ALLOWANCE = 8 << 20


STREAM_SLOTS = 2  # a streamed unit computes in one slot while the next is read into the other


@dataclass(frozen=True)
class MemoryPlan:
    weights: int  # every tensor, as it is held once loaded (source.resident_bytes)
    slot: int  # the largest streamed unit (a layer, or the head)
    units: int
    kv_cache: int
    scratch: int
    runtime: int  # this process before loading, plus the kernels' allowance
    limit: int | None
    window: int | None  # slots for the streamed units; None: fully resident
    pinned: tuple[int | str, ...] = ()  # the keys of the units held across passes while the others stream
    pinned_bytes: int = 0
    streamed_bytes: int = 0  # read per forward pass

    @property
    def resident_need(self) -> int:
        return self.runtime + self.weights + self.kv_cache + self.scratch

    @property
    def need(self) -> int:
        if self.window is None:
            return self.resident_need
        return self.runtime + self.kv_cache + self.scratch + self.pinned_bytes + self.window * self.slot

    def describe(self) -> str:
        mb = lambda n: f"{n / 2**20:.0f} MB"  # noqa: E731
        largest = f" (largest layer {mb(self.slot)})" if self.slot < self.weights else ""  # a file that cannot stream: none
        head = (f"memory: weights {mb(self.weights)}{largest}, KV cache {mb(self.kv_cache)}, "
                f"scratch {mb(self.scratch)}, runtime {mb(self.runtime)}")
        if self.window is None:
            plan = f"fully resident, {mb(self.need)}"
        else:
            plan = (f"streaming: {len(self.pinned)} of {self.units} units pinned ({mb(self.pinned_bytes)}), the other "
                    f"{self.units - len(self.pinned)} read through a window of {self.window} slots "
                    f"({mb(self.window * self.slot)}), {mb(self.streamed_bytes)} read per token, {mb(self.need)}")
        return f"{head}; plan: {plan}" + (f" within --mem-limit {mb(self.limit)}" if self.limit else "")


def pin_units(units: list[Unit], room: int, slots: int) -> tuple[list[Unit], list[Unit]] | None:
    """(pinned, streamed): the units to hold across passes, largest first (the slots are as large as
    the largest streamed unit), so that they and `slots` slots for the others fit in `room` bytes;
    None when not even the slots fit. At least one unit streams."""
    pinned: list[Unit] = []
    streamed = sorted(units, key=lambda u: -u.size)  # stable: equal units stay in file order
    for unit in list(streamed):
        rest = [u for u in streamed if u is not unit]
        if rest and sum(p.size for p in pinned) + unit.size + slots * max(u.size for u in rest) <= room:
            pinned, streamed = pinned + [unit], rest
    if sum(p.size for p in pinned) + slots * max(u.size for u in streamed) > room:
        return None
    order = {u.key: i for i, u in enumerate(units)}
    return sorted(pinned, key=lambda u: order[u.key]), sorted(streamed, key=lambda u: order[u.key])


def plan_memory(source: WeightSource, context: int, limit: int | None, kv_cache: int, batch: int = 512,
                kernels_loaded: bool = False, tokenizer_built: bool = True) -> MemoryPlan:
    """What running `source` at `context` needs, and how: resident if it fits the limit (or, with no
    limit, the memory available now), else the units that fit pinned and the others streamed through
    STREAM_SLOTS slots (one if two do not fit). kv_cache: its bytes at `context`
    (kv_cache.cache_bytes). A layers-only source (a cluster worker's share) has no embedding or head
    to hold. tokenizer_built: the process holds the tokenizer already; else it is counted by its
    estimate."""
    c = source.config
    units = file_units(source, c.layers_only) if source.can_stream else None
    weights = sum(u.size for u in units) if units and c.layers_only else source.resident_bytes()
    tokens = min(batch, context)
    scratch = 4 * (tokens * (8 * c.hidden_size + 4 * c.intermediate_size) + c.num_heads * context + 2 * c.vocab_size)
    runtime = held_rss() + (FIRST_CALLS_ALLOWANCE if kernels_loaded else KERNELS_ALLOWANCE) + \
        (0 if tokenizer_built else source.tokenizer.held_bytes)
    slot = max(u.size for u in units) if units else weights
    plan = MemoryPlan(weights, slot, c.num_layers + (not c.layers_only), kv_cache, scratch, runtime, limit, None)
    budget = limit if limit is not None else available_memory()
    if plan.resident_need <= budget:
        return plan
    if units is None:
        raise MemoryLimitError(f"{source.path} needs {plan.resident_need / 2**20:.0f} MB resident but "
                             f"{'--mem-limit' if limit else 'this machine'} allows {budget / 2**20:.0f} MB; "
                             "streaming needs edgeinfer's single file: edgeinfer convert MODEL -o FILE --bits 4")
    for slots in (STREAM_SLOTS, 1):
        split = pin_units(units, budget - runtime - kv_cache - scratch, slots)
        if split is not None:
            pinned, streamed = split
            return MemoryPlan(weights, max(u.size for u in streamed), plan.units, kv_cache, scratch, runtime, limit,
                              slots, tuple(u.key for u in pinned), sum(u.size for u in pinned),
                              sum(u.size for u in streamed))
    least = runtime + kv_cache + scratch + slot
    raise MemoryLimitError(f"{'--mem-limit' if limit else 'available memory'} {budget / 2**20:.0f} MB is too small: "
                         f"the least this model runs in at --ctx {context} is {least / 2**20:.0f} MB (runtime "
                         f"{runtime / 2**20:.0f} + KV cache {kv_cache / 2**20:.0f} + scratch {scratch / 2**20:.0f} + "
                         f"one layer slot {slot / 2**20:.0f})")
