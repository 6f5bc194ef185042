"""The KV cache: keys (after RoPE) and values of every layer, preallocated for `capacity` positions.

It owns its layout and its updates. The forward pass takes the next positions (`reserve`), appends
each layer's new keys and values (`append`; the fused decode layer appends through the same kernel,
kernels/kv_store.py), gives the kernels a layer's arrays (`layer`) and, when the tokens have been
through every layer, counts them in (`commit`); `truncate` forgets the positions past a length.

With LUT attention a key is its codes (`lut`), `k` holds only EXACT_SLOTS float keys per layer and
KV head (the first positions and a ring of the recent ones, which score exactly, kept by the LUT
kernels themselves), and values are fp16 (uint16 bits), as NoMAD keeps them: at long contexts the
value pass is then most of attention's reads. Exact attention keeps keys and values in the cache
type the path chose (kernels/kv_rows.py): fp16 by default, q8_0, or float32 (the float32 path's).

A local layer (a sliding window of W positions, Gemma 3's, Mistral's) with exact attention holds
only its window once the context is longer: a ring of W rows, position p in row p % W (`rows`).
Its decode step attends over the whole ring once it has wrapped (kernels/decode_layer.py:
attended_rows); a prompt chunk's attention takes its rows in position order, gathered (`add`). A
ring forgets: truncating it to fewer than length - 1 positions once it has wrapped keeps nothing
(`truncate`), as llama.cpp's sliding-window cache does.
"""

from __future__ import annotations

import functools
import mmap
from typing import NamedTuple

import numpy as np

from .config import ModelConfig
from .errors import ContextOverflowError, EdgeInferError
from .kernels.kv_rows import as_float32, bytes_per_value, map_rows, new_rows, rows_at, rows_shape
from .kernels.kv_store import append_kv
from .kernels.lut_attention import EXACT_SLOTS, KEYS_PER_BLOCK, lut_buffers
from .run_path import RunPath, choose_path
from .storage.memory_plan import MemoryLimitError, MemoryPlan, plan_memory
from .storage.source import WeightSource


class LayerKV(NamedTuple):
    keys: object  # (kv_heads, rows or EXACT_SLOTS, head_dim) rows (kernels/kv_rows.py); LUT: float32
    values: object  # (kv_heads, rows, head_dim) rows: one per position, or a local layer's ring
    lut: tuple  # (codebooks, codes, tables, sums) of LUT attention, empty arrays for exact attention


def lazy_zeros(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """Zeros whose pages become resident as they are written. numpy advises huge pages for large
    arrays, and with the cache's layout (each head's positions contiguous) the first token's keys
    would then make every head's whole 2 MB page resident: a 7B model's 4096-token cache took 4.3 GB
    of RSS before anything was cached. A plain anonymous mapping has no such advice."""
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1)), dtype, count).reshape(shape)


def layer_rows(config: ModelConfig, capacity: int, rings: bool = True) -> list[int]:
    """Rows of each layer's cache for `capacity` positions: one per position, or a local layer's
    window when that is shorter (a ring; `rings` False keeps every position)."""
    return [min(capacity, config.window(i)) if rings and config.window(i) else capacity
            for i in range(config.num_layers)]


def gathered(rows, index: np.ndarray, extra: int):
    """A copy of rows (kv_heads, n, hd) of any type holding rows[:, index] then `extra` zero rows."""
    return map_rows(rows, lambda a: np.concatenate([a[:, index], np.zeros((a.shape[0], extra) + a.shape[2:], a.dtype)],
                                                   axis=1))


class KVCache:
    def __init__(self, config: ModelConfig, capacity: int, codebooks: list[np.ndarray] | None = None,
                 cache_type: str = "f32", kernels: bool = False, rings: bool = True):
        """codebooks: per layer, for LUT attention (whose values are fp16 and exact keys float32).
        cache_type: the keys' and values' type (kernels/kv_rows.py: f32, f16 or q8_0). kernels:
        whether the 4/8-bit path's kernels write it (else numpy does: the float32 path runs on CPUs
        without them, with a float32 cache). rings: whether local layers hold only their window
        (exact attention only: the LUT kernels keep codes by position)."""
        self.rows = layer_rows(config, capacity, rings and codebooks is None)
        shape = lambda n: (config.num_kv_heads, n, config.head_dim)  # noqa: E731
        if codebooks is None:
            self.k = [new_rows(shape(n), cache_type, lazy_zeros) for n in self.rows]
        else:
            self.k = [lazy_zeros(shape(EXACT_SLOTS)) for _ in self.rows]
        self.v = [new_rows(shape(n), cache_type, lazy_zeros) for n in self.rows]
        self.lut = [lut_buffers(books, config.num_heads, capacity) for books in codebooks or [None] * config.num_layers]
        self.capacity, self.length, self.kernels = capacity, 0, kernels

    @staticmethod
    def size(config: ModelConfig, capacity: int, cache_type: str, d_sub: int | None) -> int:
        """Bytes of the keys, codes and values of a cache as __init__ makes it (d_sub: LUT attention's)."""
        per_row = config.num_kv_heads * config.head_dim
        if d_sub is None:
            return int(2 * per_row * sum(layer_rows(config, capacity)) * bytes_per_value(cache_type))
        values = int(per_row * config.num_layers * capacity * bytes_per_value(cache_type))
        blocks = -(-capacity // KEYS_PER_BLOCK)
        return values + config.num_layers * per_row * (EXACT_SLOTS * 4 + blocks * KEYS_PER_BLOCK // (2 * d_sub))

    @classmethod
    def over(cls, k: list, v: list, capacity: int, kernels: bool) -> "KVCache":
        """A cache (exact attention) of `capacity` positions over given key and value rows, per
        layer (kv_heads, rows, hd)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.capacity, cache.length, cache.kernels = k, v, capacity, 0, kernels
        cache.rows = [rows_shape(rows)[1] for rows in k]
        cache.lut = [lut_buffers(None, 0, 0)] * len(k)
        return cache

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i], self.lut[i])

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values (LUT attention's codes apart)."""
        return sum(a.nbytes for rows in self.k + self.v for a in (rows if isinstance(rows, tuple) else (rows,)))

    def reserve(self, count: int) -> int:
        """The first of the next `count` positions, which must fit."""
        if self.length + count > self.capacity:
            raise ContextOverflowError(f"{self.length + count} tokens exceed the context of {self.capacity}")
        return self.length

    def append(self, layer: int, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Keys (after RoPE) and values (kv_heads, count, head_dim) float32 of positions start..,
        each into its row (a ring keeps the last of them)."""
        n = self.rows[layer]
        keep = min(keys.shape[1], n)
        start, keys, values = start + keys.shape[1] - keep, keys[:, -keep:], values[:, -keep:]
        row = start % n
        split = min(keep, n - row)
        self._store(layer, row, keys[:, :split], values[:, :split])
        if split < keep:
            self._store(layer, 0, keys[:, split:], values[:, split:])

    def _store(self, layer: int, row: int, keys: np.ndarray, values: np.ndarray) -> None:
        if self.kernels:  # the kernel reads them as flat arrays
            append_kv(self.k[layer], self.v[layer], self.lut[layer], np.ascontiguousarray(keys),
                      np.ascontiguousarray(values), row)
        else:
            self.k[layer][:, row:row + keys.shape[1]] = keys
            self.v[layer][:, row:row + values.shape[1]] = values

    def add(self, layer: int, start: int, keys: np.ndarray, values: np.ndarray) -> tuple[object, object, int]:
        """append(), and the rows of positions first..start + count - 1 in position order for the
        chunk's attention (exact attention): (keys, values, first): the layer's own rows (first 0),
        or, where its ring has no room for them in order, a copy, from the first position the
        chunk's first token sees."""
        n, end = self.rows[layer], start + keys.shape[1]
        if end <= n:
            self.append(layer, start, keys, values)
            return self.k[layer], self.v[layer], 0
        first = max(0, start + 1 - n)  # a ring's rows are its window
        held = np.arange(first, start) % n
        part = KVCache.over([gathered(self.k[layer], held, end - start)], [gathered(self.v[layer], held, end - start)],
                            end - first, self.kernels)
        part.append(0, start - first, keys, values)
        self.append(layer, start, keys, values)
        return part.k[0], part.v[0], first

    def float_keys(self, layer: int, start: int, end: int) -> np.ndarray:
        """Keys (kv_heads, end - start, head_dim) of positions start..end-1 as float32 (exact
        attention), which the layer must still hold."""
        n = self.rows[layer]
        if start < self.length - n:
            raise EdgeInferError(f"layer {layer} holds only its last {n} positions, not {start}..{end - 1}")
        return as_float32(map_rows(self.k[layer], lambda a: a[:, np.arange(start, end) % n]))

    def commit(self, count: int) -> None:
        """The tokens at the next `count` positions are in every layer."""
        self.length += count

    def truncate(self, length: int) -> int:
        """Forget the positions past `length`. Returns the length kept: `length`, or 0 where a ring
        has overwritten positions the ones after `length` would attend to (it holds its last
        window: that leaves them only when at most one position is cut)."""
        length = min(self.length, length)
        if any(self.length > n and length < self.length - 1 for n in self.rows):
            length = 0
        self.length = length
        return length


def cache_bytes(source: WeightSource, capacity: int, path: RunPath) -> int:
    """Bytes of the KV cache a model of `source` on `path` makes for `capacity` positions, known
    before any weight is read (the memory plan's)."""
    books = source.key_codebooks() if path.lut else None
    return KVCache.size(source.config, capacity, path.cache_type, books.d_sub if books else None)


def model_memory_plan(source: WeightSource, context: int, limit: int | None, quantized: bool,
                      attention: str = "exact", sequences: int = 1, cache_type: str = "f16",
                      kernels_loaded: bool = False, tokenizer_built: bool = True) -> MemoryPlan:
    """What a model of `source` needs at `context` and how it fits `limit` (storage/memory_plan.py),
    its KV cache sized for the path it will run, `sequences` times (a server's slots)."""
    path = choose_path(source, quantized, attention, cache_type=cache_type)
    return plan_memory(source, context, limit, sequences * cache_bytes(source, context, path),
                       kernels_loaded=kernels_loaded, tokenizer_built=tokenizer_built)


class SlotCaches:
    """The KV caches of sequences decoded together (the server's batch): per layer one key and one
    value array of shape (slots, kv_heads, rows, hd), so that a layer's caches of every slot are one
    array for the batched kernel; `slot(s)` is slot s's cache, a KVCache over its part, with its own
    length. Exact attention. Pages become resident as they are written."""

    def __init__(self, config: ModelConfig, capacity: int, slots: int, kernels: bool, cache_type: str = "f32"):
        shape = lambda n: (slots, config.num_kv_heads, n, config.head_dim)  # noqa: E731
        rows = layer_rows(config, capacity)
        self.k = [new_rows(shape(n), cache_type, lazy_zeros) for n in rows]
        self.v = [new_rows(shape(n), cache_type, lazy_zeros) for n in rows]
        self.caches = [KVCache.over([rows_at(k, s) for k in self.k], [rows_at(v, s) for v in self.v], capacity, kernels)
                       for s in range(slots)]
        self.capacity = capacity

    def slot(self, s: int) -> KVCache:
        return self.caches[s]


SMALLEST_CONTEXT = 256  # below this a model is of little use: the plan refuses rather than shrink further
CONTEXT_STEP = 256


def fitting_memory_plan(source: WeightSource, context: int, limit: int | None, quantized: bool,
                        attention: str = "exact", sequences: int = 1, cache_type: str = "f16",
                        kernels_loaded: bool = False, tokenizer_built: bool = True) -> tuple[MemoryPlan, int]:
    """model_memory_plan at `context`, or, when the KV cache at that context leaves no plan that
    fits, at a smaller context (a multiple of CONTEXT_STEP, at least SMALLEST_CONTEXT): the largest
    at which the weights stay resident, else the largest at which they stream. (plan, context);
    MemoryLimitError when not even the smallest context fits."""
    @functools.cache  # one plan per context: the runtime it counts is measured (it grows as kernels
    def plan(n: int) -> MemoryPlan | None:  # load beside), and the plan returned must be the one that fit
        try:
            return model_memory_plan(source, n, limit, quantized, attention, sequences, cache_type, kernels_loaded,
                                     tokenizer_built)
        except MemoryLimitError:
            return None

    found = plan(context)
    if found is not None or context <= SMALLEST_CONTEXT:
        return found or model_memory_plan(source, context, limit, quantized, attention, sequences, cache_type,
                                          kernels_loaded, tokenizer_built), context
    steps = range(SMALLEST_CONTEXT // CONTEXT_STEP, (context - 1) // CONTEXT_STEP + 1)
    for resident_only in (True, False):
        fits = lambda k: (p := plan(k * CONTEXT_STEP)) is not None and (p.window is None or not resident_only)  # noqa: E731
        if fits(steps[0]):
            low, high = 0, len(steps) - 1  # the need grows with the context: the last index that fits
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if fits(steps[mid]) else (low, mid - 1)
            n = steps[low] * CONTEXT_STEP
            return plan(n), n
    # its error says what the smallest context needs
    return (model_memory_plan(source, SMALLEST_CONTEXT, limit, quantized, attention, sequences, cache_type,
                              kernels_loaded, tokenizer_built), SMALLEST_CONTEXT)
