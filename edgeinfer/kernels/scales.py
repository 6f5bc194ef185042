"""A quantised matrix's per-group scales (and minima) and the block layout both 4- and 8-bit matrices
share (q4.py, q8.py): one home for how a group's scale is stored and read.

Rows go in blocks of 16, one vector lane per row; per group (32 or 16 columns) a block holds its
16 rows' scales side by side. A scale is stored one of two ways:
- plain: one value per group, fp16 bits (uint16) when fp16 holds every value exactly (Q4_0, Q4_1,
  Q8_0), else float32;
- `SuperScales`, the K-quants' (and IQ4_XS's) own two levels: an fp16 d per 256 columns and a small
  integer per group (int8: Q4_K's 6-bit scales and minima, Q6_K's signed 8-bit ones, ...). The
  group's scale is d * q computed in float32, which is exact (an 11-bit significand times an
  integer of at most 8 bits), so it equals gguf's own value and the plain float32 one it replaces,
  bit for bit. It costs 8 bits per group and 16 per 256 columns, not 32 per group: Q4_K is held at
  4.625 bits per weight instead of 6 (its file: 4.5), Q6_K at 6.56 (q6.py), as in its file.
Kernels read a block's part (`block_scales`), the number of groups in it (`group_count`) and a
group's 16 scales as float32 lanes (`group_scale`) whatever the kind.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import types
from numba.extending import overload

from .simd import load_floats, mul, prefetch

ROWS = 16  # rows per block: one per lane
SUPER = 256  # columns per d of SuperScales (a K-quant's super-block)


class SuperScales(NamedTuple):
    d: np.ndarray  # fp16 bits (uint16): interleaved (blocks, supers * ROWS), row-major (rows, supers)
    q: np.ndarray  # int8: interleaved (blocks, groups * ROWS), row-major (rows, groups)
    shift: int  # log2 of the groups per d: 3 for groups of 32, 4 for groups of 16


def interleave(a: np.ndarray, per_chunk: int, rows_padded: int, chunks: int, block_rows: int) -> np.ndarray:
    """(rows, chunks * per_chunk) -> (blocks, chunks * block_rows * per_chunk): for each chunk, the
    block's rows' pieces side by side; zero rows and chunks padded."""
    out = np.zeros((rows_padded, chunks * per_chunk), a.dtype)
    out[:a.shape[0], :a.shape[1]] = a
    blocks = rows_padded // block_rows
    return np.ascontiguousarray(out.reshape(blocks, block_rows, chunks, per_chunk).transpose(0, 2, 1, 3)
                                .reshape(blocks, chunks * block_rows * per_chunk))  # also for no rows (a headless shard)


def deinterleave(a: np.ndarray, per_chunk: int, rows: int, width: int, block_rows: int,
                 ids: np.ndarray | None = None) -> np.ndarray:
    """The rows (all, or those in `ids`) back in row-major order, padding dropped."""
    chunks = a.shape[1] // (block_rows * per_chunk)
    if ids is None:
        blocks = a.shape[0]
        return (a.reshape(blocks, chunks, block_rows, per_chunk).transpose(0, 2, 1, 3)
                .reshape(blocks * block_rows, chunks * per_chunk)[:rows, :width])  # (also no rows)
    ids = np.asarray(ids)
    picked = a[ids // block_rows].reshape(len(ids), chunks, block_rows, per_chunk)[np.arange(len(ids)), :, ids % block_rows, :]
    return picked.reshape(len(ids), chunks * per_chunk)[:, :width]


def stored_scales(a: np.ndarray) -> np.ndarray:
    """Plain scales (or minima) as the kernels load them: fp16 bits (uint16) when every value is an
    fp16 exactly, else float32. Lossless either way; the kernels widen fp16 with vcvtph2ps."""
    a = np.asarray(a, np.float32)
    halves = a.astype(np.float16)
    return halves.view(np.uint16) if np.array_equal(halves.astype(np.float32), a) else np.ascontiguousarray(a)


def scale_values(a) -> np.ndarray:
    """Row-major scales (plain, or SuperScales (rows, supers) and (rows, groups)) as float32."""
    if isinstance(a, SuperScales):
        d = np.repeat(a.d.view(np.float16).astype(np.float32), 1 << a.shift, axis=1)[:, :a.q.shape[1]]
        return d * a.q.astype(np.float32)
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else np.array(a, np.float32)


def super_scales(d: np.ndarray, q: np.ndarray) -> SuperScales:
    """Row-major SuperScales from d (rows, columns / 256) as float32 or fp16 and q (rows, groups)."""
    per_super = q.shape[1] // d.shape[1] if d.shape[1] else 8
    return SuperScales(np.ascontiguousarray(np.asarray(d, np.float16)).view(np.uint16),
                       np.ascontiguousarray(q, np.int8), per_super.bit_length() - 1)


def interleave_scales(s, rows_padded: int, groups: int):
    """Row-major scales (float values, or SuperScales) -> the kernels' blocks (plain: stored_scales)."""
    if isinstance(s, SuperScales):
        supers = -(-groups // (1 << s.shift))
        return SuperScales(interleave(s.d, 1, rows_padded, supers, ROWS), interleave(s.q, 1, rows_padded, groups, ROWS),
                           s.shift)
    return interleave(stored_scales(s), 1, rows_padded, groups, ROWS)


def deinterleave_scales(s, rows: int, groups: int, ids: np.ndarray | None = None, raw: bool = False):
    """The blocks' scales back in row-major order as float32 values; SuperScales kept as they are
    when `raw` (plain ones are values either way: fp16 bits would read as numbers)."""
    if isinstance(s, SuperScales):
        supers = -(-groups // (1 << s.shift))
        out = SuperScales(deinterleave(s.d, 1, rows, supers, ROWS, ids), deinterleave(s.q, 1, rows, groups, ROWS, ids),
                          s.shift)
        return out if raw else scale_values(out)
    return scale_values(deinterleave(s, 1, rows, groups, ROWS, ids))


def activation_span(s) -> int:
    """Values per activation scale for a matrix with scales `s`: 256 for a K-quant's (SuperScales),
    as llama.cpp quantises the activations of its K-quant dot products (Q8_K): the same rounding of
    the inputs, not the same sums' order, so outputs stay close to llama.cpp's rather than equal
    (greedy tokens and perplexity against it: bench/RESULTS.md); 32 otherwise (Q8_0's blocks)."""
    return SUPER if isinstance(s, SuperScales) else 32


def keeps_super_scales(c0: int, c1: int) -> bool:
    """Whether columns c0 .. c1 - 1 of a matrix keep its two-level scales (whole super-blocks)."""
    return c0 % SUPER == 0 and c1 % SUPER == 0


def select_scales(s, rows: slice, g0: int, g1: int):
    """Row-major scales of `rows` and groups g0 .. g1 - 1: SuperScales stay so on whole 256-column
    super-blocks, else they become their float32 values (exact, 32 bits per group)."""
    if isinstance(s, SuperScales):
        per, group = 1 << s.shift, SUPER >> s.shift
        if keeps_super_scales(g0 * group, g1 * group):
            return SuperScales(s.d[rows, g0 // per:g1 // per], s.q[rows, g0:g1], s.shift)
        return scale_values(s)[rows, g0:g1]
    return s[rows, g0:g1]


def scales_nbytes(s) -> int:
    return s.d.nbytes + s.q.nbytes if isinstance(s, SuperScales) else s.nbytes


def concat_scales(parts: list):
    """Scales of row slabs (whole blocks) joined: SuperScales part by part; plain ones as float32 when
    any needs it (fp16 widens exactly)."""
    if isinstance(parts[0], SuperScales):
        return SuperScales(np.concatenate([p.d for p in parts]), np.concatenate([p.q for p in parts]), parts[0].shift)
    if any(p.dtype == np.float32 for p in parts):
        parts = [scale_values(p) for p in parts]
    return np.concatenate(parts)


def is_super_type(s) -> bool:
    """Whether a Numba type is SuperScales' (for overloads)."""
    return isinstance(s, types.NamedTuple) and s.instance_class is SuperScales


def block_scales(s, block):
    """A block's scales (s[block])."""


@overload(block_scales, inline="always")
def _block_scales(s, block):
    if is_super_type(s):
        return lambda s, block: SuperScales(s.d[block], s.q[block], s.shift)
    return lambda s, block: s[block]


def group_count(s):
    """The groups in a block's scales."""


@overload(group_count, inline="always")
def _group_count(s):
    if is_super_type(s):
        return lambda s: s.q.shape[0] // ROWS
    return lambda s: s.shape[0] // ROWS


def group_scale(s, g):
    """Group g's 16 scales of a block as float32 lanes."""


@overload(group_scale, inline="always")
def _group_scale(s, g):
    if is_super_type(s):
        return lambda s, g: mul(load_floats(s.d, (g >> s.shift) * ROWS), load_floats(s.q, g * ROWS))
    return lambda s, g: load_floats(s, g * ROWS)


def prefetch_scales(s, g):
    """Hint that group g's scales will be read soon."""


@overload(prefetch_scales, inline="always")
def _prefetch_scales(s, g):
    if is_super_type(s):
        def fetch(s, g):
            prefetch(s.q, g * ROWS)
            prefetch(s.d, (g >> s.shift) * ROWS)
        return fetch
    return lambda s, g: prefetch(s, g * ROWS)
