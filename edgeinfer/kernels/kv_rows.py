"""The KV cache's row types, one interface for the attention kernels: a layer's keys or values are
(kv_heads, capacity, hd) rows of float32, of fp16 bits (uint16), or of 8 bits with a scale per 32
(`Q8Rows`, llama.cpp's q8_0 cache type). Kernels read 16 of them at a flat offset as float32 lanes
(`load_row`), write a row (`store_row`), and take a slot's or a layer's part (`rows_at`) and the
shape (`rows_shape`) whatever the type, so each attention kernel is written once.

q8_0 as llama.cpp quantizes it: per 32 values d = max|x| / 127, q = round(x / d) (to nearest even,
as its vector code rounds); the value is d * q. The scale is kept as float32 (llama.cpp: fp16), so
a position costs 36 bytes per 32 values against llama.cpp's 34 (and fp16's 64).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .simd import _ptr, abs_max, load_floats, mul, prefetch, splat, store_floats, store_rounded_i8

Q8_BLOCK = 32  # values per scale


class Q8Rows(NamedTuple):
    quants: np.ndarray  # (..., capacity, hd) int8
    scales: np.ndarray  # (..., capacity, hd // Q8_BLOCK) float32


CACHE_TYPES = ("f16", "f32", "q8_0")


def new_rows(shape: tuple[int, ...], cache_type: str, zeros: Callable = np.zeros):
    """Rows of `shape` (..., hd) in `cache_type`, made by `zeros(shape, dtype)`."""
    if cache_type == "q8_0":
        return Q8Rows(zeros(shape, np.int8), zeros(shape[:-1] + (shape[-1] // Q8_BLOCK,), np.float32))
    return zeros(shape, np.uint16 if cache_type == "f16" else np.float32)


def bytes_per_value(cache_type: str) -> float:
    return {"f32": 4, "f16": 2, "q8_0": 1 + 4 / Q8_BLOCK}[cache_type]


def map_rows(rows, fn: Callable):
    """fn applied to the arrays the rows are made of (numpy side: slicing, copying)."""
    return Q8Rows(fn(rows.quants), fn(rows.scales)) if isinstance(rows, Q8Rows) else fn(rows)


def as_float32(rows) -> np.ndarray:
    """The rows' values as float32 (numpy side)."""
    if isinstance(rows, Q8Rows):
        return rows.quants.astype(np.float32) * np.repeat(rows.scales, Q8_BLOCK, axis=-1)
    return rows.view(np.float16).astype(np.float32) if rows.dtype == np.uint16 else rows.copy()


def is_q8_type(rows) -> bool:
    """Whether a Numba type is Q8Rows' (for overloads)."""
    return isinstance(rows, types.NamedTuple) and rows.instance_class is Q8Rows


def rows_at(rows, i):
    """rows[i]: the part of a leading index (a layer, a slot)."""
    return map_rows(rows, lambda a: a[i])


@overload(rows_at)
def _rows_at(rows, i):
    if is_q8_type(rows):
        return lambda rows, i: Q8Rows(rows.quants[i], rows.scales[i])
    return lambda rows, i: rows[i]


def rows_shape(rows):
    return rows.quants.shape if isinstance(rows, Q8Rows) else rows.shape


@overload(rows_shape)
def _rows_shape(rows):
    if is_q8_type(rows):
        return lambda rows: rows.quants.shape
    return lambda rows: rows.shape


@intrinsic
def _float_at(typingctx, arr, offset):
    """The float32 at flat offset `offset` of a contiguous array of any shape."""
    def codegen(context, builder, signature, args):
        return builder.load(_ptr(context, builder, signature.args[0], args[0], args[1], ir.FloatType()))
    return types.float32(arr, offset), codegen


def load_row(rows, offset):
    """Values offset .. offset + 15 (flat, within one row) as 16 float32 lanes."""


@overload(load_row)
def _load_row(rows, offset):
    if is_q8_type(rows):
        return lambda rows, offset: mul(load_floats(rows.quants, offset), splat(_float_at(rows.scales, offset >> 5)))
    return lambda rows, offset: load_floats(rows, offset)


def widened(rows) -> bool:
    """Whether load_row converts these rows (fp16, 8 bits) rather than loading float32 as it is."""


@overload(widened)
def _widened(rows):
    plain = isinstance(rows, types.Array) and rows.dtype == types.float32
    return (lambda rows: False) if plain else (lambda rows: True)


def prefetch_rows(rows, first, end):
    """Hint that the flat elements first..end-1 will be read soon: rows a pass reaches next, a line
    (or less) at a time."""


@overload(prefetch_rows)
def _prefetch_rows(rows, first, end):
    if is_q8_type(rows):
        def q8(rows, first, end):
            for o in range(first, end, 64):
                prefetch(rows.quants, o)
        return q8

    step = 64 // (rows.dtype.bitwidth // 8)

    def plain(rows, first, end):
        for o in range(first, end, step):
            prefetch(rows, o)
    return plain


def store_row(rows, offset, source, at, hd):
    """rows[offset:offset + hd] (flat) = source[at:at + hd] (float32), hd a multiple of 32."""


@overload(store_row)
def _store_row(rows, offset, source, at, hd):
    if is_q8_type(rows):
        def store_q8(rows, offset, source, at, hd):
            for b in range(0, hd, Q8_BLOCK):
                lo, hi = load_floats(source, at + b), load_floats(source, at + b + 16)
                d = abs_max(lo, hi) / np.float32(127)
                inv = splat(np.float32(1) / d if d > 0 else np.float32(0))
                store_rounded_i8(rows.quants, offset + b, mul(lo, inv))
                store_rounded_i8(rows.quants, offset + b + 16, mul(hi, inv))
                _set_float(rows.scales, (offset + b) >> 5, d)
        return store_q8

    def store_floats_row(rows, offset, source, at, hd):
        for d in range(0, hd, 16):
            store_floats(rows, offset + d, load_floats(source, at + d))
    return store_floats_row


@intrinsic
def _set_float(typingctx, arr, offset, x):
    """The float32 at flat offset `offset` of a contiguous array = x."""
    def codegen(context, builder, signature, args):
        builder.store(args[2], _ptr(context, builder, signature.args[0], args[0], args[1], ir.FloatType()))
        return context.get_dummy_value()
    return types.none(arr, offset, types.float32), codegen


@njit(cache=True)
def quantize_rows(x, rows):
    """x (..., hd) float32, contiguous, into rows of the same shape (any type): tests and numpy callers."""
    hd = x.shape[-1]
    flat = x.reshape(x.size)
    for r in range(x.size // hd):
        store_row(rows, r * hd, flat, r * hd, hd)
