"""8-bit weights (GGUF Q8_0 laid out losslessly as bytes; files converted before the narrower
layouts (q6.py, IQ4 in q4.py) hold Q2_K, Q3_K, the 5-bit and IQ4 types so too), rows in blocks of 16
as in q4.py, and their GEMV and GEMM with int8 activations.

A weight is a byte b (0..255) in a group of 32 or 16 weights with a scale and an offset:
w = scale * b + factor * offset. Types whose integers are signed (Q8_0: -127..127) store them + 128,
the offset is the scale itself and the factor -128, so w = scale * (b - 128) and no offset is
stored; types with a minimum (Q2_K) store the unsigned integer, the minimum as the offset and factor
1. Scales and minima are stored as scales.py says: fp16 bits when fp16 holds them exactly (Q8_0),
else the K-quants' fp16 d per 256 columns times an integer per group.

Layout (q4.py's, with bytes for nibbles): rows in blocks of 16, one lane per row; for each 16
columns (a unit), 4 loads of 64 bytes, load i holding in lane r row r's bytes 4i..4i+3 of the unit;
then each group's 16 scales (and minima). Columns are padded to whole 64s (4 units).

Kernel: 4 byte dot products (vpdpbusd: the unsigned weights against 4 int8 activations broadcast)
give the 16 rows' dots over a unit; its term is
    term = scale * x_scale * (b . x) + offset * factor * x_scale * (1 . x)
with (1 . x) over the unit's 16 activations (activations.py: `halves`). As in q4.py, each row's
terms go into 4 running sums by unit index mod 4, added at the end as ((0 + 1) + (2 + 3)): the
order of the 4-row layout before this one (its lanes were the 4 units of a 64-column chunk), so
outputs kept their bits. The GEMM runs four tokens over each unit, sharing its loads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .activations import GROUP, Q8Activations
from .kinds import kind
from .q4 import check_operands, from_blocks, gemm_block, group_term, prefetch_ahead, store_rows, to_blocks
from .scales import (ROWS, SuperScales, activation_span, block_scales, deinterleave_scales, group_count, group_scale, interleave_scales,
                     scales_nbytes, select_scales)
from .simd import (accumulate_units, accumulator, accumulator4, broadcast4, dpbusd, fixed_unit, into0, into1, into2, into3, load_i8, total4, zeros_i32)

UNIT = 16  # columns per unit: 16 rows x 16 bytes, 4 loads
WEIGHTS_PER_LOAD = 64  # columns are padded to whole 64s
PARALLEL_MIN_BYTES = 4 << 20  # as in q4.py: below this, waking threads costs more than it saves
SIGNED_FACTOR = -128.0  # bytes holding int8 + 128


KINDS = (kind("q8"),)


@dataclass(frozen=True)
class Q8Matrix:
    packed: np.ndarray  # (blocks, units * 256) uint8
    scales: object  # (blocks, groups * ROWS) fp16 bits (uint16) or float32, or SuperScales (scales.py)
    offsets: object  # minima laid out as scales, or the scales themselves (signed bytes)
    offset_factor: float  # -128 (signed bytes) or 1 (minima)
    rows: int
    cols: int
    bits = 8
    kind = KINDS[0]  # its kernels' one loop (kinds.py)
    lookup = False  # (q4.py's IQ4 nibbles index a table; bytes are their values)

    @property
    def group(self) -> int:
        """Weights per scale: 32 or 16."""
        q = self.scales.q if isinstance(self.scales, SuperScales) else self.scales
        units, groups = self.packed.shape[1] // 256, q.shape[1] // ROWS
        return UNIT * units // groups if groups else GROUP

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is self.scales else scales_nbytes(self.offsets)
        return self.packed.nbytes + scales_nbytes(self.scales) + extra

    @classmethod
    def from_values(cls, values: np.ndarray, scales: np.ndarray, minima: np.ndarray | None = None) -> "Q8Matrix":
        """From integers (rows, cols) and per-group scales (rows, cols/group, group 32 or 16): signed
        integers (-128..127) without minima, w = scale * value; unsigned (0..255) with them,
        w = scale * value + minimum. Scales and minima: float values, or SuperScales (scales.py)."""
        rows, cols = values.shape
        per_row = scales.q.shape[1] if isinstance(scales, SuperScales) else scales.shape[1]
        group = cols // per_row if per_row else GROUP
        if cols % GROUP or group not in (16, 32):
            raise ValueError(f"{cols} columns in groups of {group}: 8-bit rows need whole groups of 32 or 16")
        bytes_ = (values.astype(np.int16) + 128 if minima is None else values).astype(np.uint8)
        padded, rows_padded = -(-cols // WEIGHTS_PER_LOAD) * WEIGHTS_PER_LOAD, -(-rows // ROWS) * ROWS
        groups = padded // group
        sc = interleave_scales(scales, rows_padded, groups)
        offsets = sc if minima is None else interleave_scales(minima, rows_padded, groups)
        return cls(to_blocks(bytes_, rows_padded, padded // UNIT), sc, offsets,
                   SIGNED_FACTOR if minima is None else 1.0, rows, cols)

    @staticmethod
    def array_shapes(rows: int, cols: int, group: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of `packed` and of `scales` (and minima) for a rows x cols matrix in groups of `group`."""
        blocks, padded = -(-rows // ROWS), -(-cols // WEIGHTS_PER_LOAD) * WEIGHTS_PER_LOAD
        return (blocks, padded // UNIT * 256), (blocks, padded // group * ROWS)

    def row_major(self, ids: np.ndarray | None = None, raw: bool = False) -> tuple:
        """(integers as int16 (rows, cols), scales and minima (rows, cols/group) as float32, or as
        stored when `raw`) of all rows or of `ids`, undoing the blocks; minima None for signed
        integers."""
        groups = self.cols // self.group
        values = from_blocks(self.packed, self.rows, self.cols, ids).astype(np.int16)
        scales = deinterleave_scales(self.scales, self.rows, groups, ids, raw)
        if self.offsets is self.scales:
            return values - 128, scales, None
        return values, scales, deinterleave_scales(self.offsets, self.rows, groups, ids, raw)

    def select(self, rows: slice, cols: slice) -> "Q8Matrix":
        """The block of rows x cols as a matrix of its own, bit for bit (columns by whole groups)."""
        c0, c1, _ = cols.indices(self.cols)
        if c0 % GROUP or c1 % GROUP:
            raise ValueError(f"columns {c0}:{c1} do not fall on groups of {GROUP}")
        values, scales, minima = self.row_major(raw=True)
        g0, g1 = c0 // self.group, c1 // self.group
        return Q8Matrix.from_values(values[rows, c0:c1], select_scales(scales, rows, g0, g1),
                                    None if minima is None else select_scales(minima, rows, g0, g1))

    def matmul(self, x: Q8Activations, out: np.ndarray) -> np.ndarray:
        """One vector (GEMV) or a batch of tokens (GEMM)."""
        return gemm8(self, x, out) if x.flat.ndim == 2 else gemv8(self, x, out)

    def kernel_args(self) -> tuple:
        """The matrix as the fused decode layer takes it (decode_layer.py)."""
        return self.kind, activation_span(self.scales), self.packed, self.scales, self.offsets, float(self.offset_factor)

    def dequantize(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Float32 values of all rows, or of the rows in `ids` (an embedding lookup), as GGUF's own
        dequantisation computes them: scale * value (+ minimum)."""
        values, scales, minima = self.row_major(ids)
        n, g = values.shape[0], self.group
        w = values.reshape(n, -1, g).astype(np.float32) * scales[:, :, None]
        if minima is not None:
            w = w + minima[:, :, None]
        return w.reshape(n, self.cols)


@njit(inline="always")
def _dots(w, at, x, o):
    """The 16 rows' integer dot products over the unit at w[at:at + 256] with x[o:o + 16]."""
    return _dots4(load_i8(w, at), load_i8(w, at + 64), load_i8(w, at + 128), load_i8(w, at + 192), x, o)


@njit(inline="always")
def _units(w, s):
    """A block's units, and log2 of the units per group (0: groups of 16, 1: of 32)."""
    units = w.shape[0] // 256
    return units, 1 if group_count(s) < units else 0


@njit(inline="always")
def _unit(acc, w, s, m, x, xscales, xhalves, factor, unit, u, shift, into):
    """acc + unit u's term for 16 rows against one token (`into`: simd.into0 .. into3); 2**shift
    units share a group's scale (shifts, not divisions: no checks in the loop)."""
    g = u >> shift
    return into(acc, group_term(_dots(w, u * 256, x, u * UNIT), group_scale(s, g), group_scale(m, g),
                                xscales[u >> 1], xhalves[u], factor, unit))


@njit  # not inlined into the parallel loops (as in q4.py)
def _block(packed, scales, offsets, factor, x, xscales, xhalves, out, block, fetch=True):
    """Rows 16*block .. 16*block+15 for one token, four units per turn, each into its own sum."""
    w, s = packed[block], block_scales(scales, block)
    m = block_scales(offsets, block)
    units, shift = _units(w, s)
    acc, unit = accumulator4(out), fixed_unit(out)
    for u in range(0, units, 4):
        if fetch:
            for k in range(4):
                prefetch_ahead(w, s, m, (u + k) * 256, (u + k) >> shift)
        acc = _unit(acc, w, s, m, x, xscales, xhalves, factor, unit, u, shift, into0)
        acc = _unit(acc, w, s, m, x, xscales, xhalves, factor, unit, u + 1, shift, into1)
        acc = _unit(acc, w, s, m, x, xscales, xhalves, factor, unit, u + 2, shift, into2)
        acc = _unit(acc, w, s, m, x, xscales, xhalves, factor, unit, u + 3, shift, into3)
    store_rows(out, block, total4(acc))


@njit(inline="always")
def _pass4(w, s, m, x, xscales, xhalves, factor, t, k, out):
    """Tokens t .. t + 3: the sums of the units whose index is k mod 4, each unit's loads shared."""
    units, shift = _units(w, s)
    a0, a1, a2, a3 = accumulator(out), accumulator(out), accumulator(out), accumulator(out)
    unit = fixed_unit(out)
    for u in range(k, units, 4):
        g, at, o = u >> shift, u * 256, u * UNIT
        l0, l1, l2, l3 = load_i8(w, at), load_i8(w, at + 64), load_i8(w, at + 128), load_i8(w, at + 192)
        scale, offset = group_scale(s, g), group_scale(m, g)
        a0 = accumulate_units(a0, group_term(_dots4(l0, l1, l2, l3, x[t], o), scale, offset, xscales[t, u >> 1],
                                             xhalves[t, u], factor, unit))
        a1 = accumulate_units(a1, group_term(_dots4(l0, l1, l2, l3, x[t + 1], o), scale, offset, xscales[t + 1, u >> 1],
                                             xhalves[t + 1, u], factor, unit))
        a2 = accumulate_units(a2, group_term(_dots4(l0, l1, l2, l3, x[t + 2], o), scale, offset, xscales[t + 2, u >> 1],
                                             xhalves[t + 2, u], factor, unit))
        a3 = accumulate_units(a3, group_term(_dots4(l0, l1, l2, l3, x[t + 3], o), scale, offset, xscales[t + 3, u >> 1],
                                             xhalves[t + 3, u], factor, unit))
    return a0, a1, a2, a3


@njit(inline="always")
def _dots4(l0, l1, l2, l3, x, o):
    """_dots with the unit's 4 loads made already (shared by a GEMM's tokens)."""
    d = dpbusd(zeros_i32(), l0, broadcast4(x, o))
    d = dpbusd(d, l1, broadcast4(x, o + 4))
    d = dpbusd(d, l2, broadcast4(x, o + 8))
    return dpbusd(d, l3, broadcast4(x, o + 12))


_block_tokens = gemm_block(_pass4)


@njit(parallel=True, cache=True)
def _gemv_parallel(kind, packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    f = np.float32(factor)
    for block in prange(packed.shape[0]):
        _block(packed, scales, offsets, f, xflat, xscales, xhalves, out, np.int64(block))  # (int64: as in q4.py)


@njit(cache=True)
def _gemv_serial(kind, packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    f = np.float32(factor)
    for block in range(packed.shape[0]):
        _block(packed, scales, offsets, f, xflat, xscales, xhalves, out, block)


@njit(parallel=True, cache=True)
def _gemm(kind, packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    """out[t] = W x[t] for every token of a batch: each thread takes a 16-row block, four tokens at a
    time (the rest one by one); a token's rows are the GEMV's bit for bit."""
    f = np.float32(factor)
    tokens = xflat.shape[0]
    for i in prange(packed.shape[0]):
        block = np.int64(i)  # (as in q4.py)
        _block_tokens(packed, scales, offsets, f, xflat, xscales, xhalves, out, block)
        for t in range(tokens - tokens % 4, tokens):
            _block(packed, scales, offsets, f, xflat[t], xscales[t], xhalves[t], out[t], block, t == 0)


def gemv8(m: Q8Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out = W @ x, W 8-bit, x int8 (quantised by quantize_activations)."""
    check_operands(m, x)
    kernel = _gemv_parallel if m.nbytes >= PARALLEL_MIN_BYTES else _gemv_serial
    kernel(m.kind, m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.halves, out)
    return out


def gemm8(m: Q8Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out (tokens, rows) = x W^T for a batch quantised by quantize_activations."""
    check_operands(m, x)
    _gemm(m.kind, m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.halves, out)
    return out


def gemv8_reference(m: Q8Matrix, x: Q8Activations) -> np.ndarray:
    """The same computation in numpy: integer dot per group, then both scales, plus the minima's term."""
    values, scales, minima = m.row_major()
    g, groups = m.group, m.cols // m.group
    xs = x.int8()[:m.cols // GROUP].reshape(-1, g).astype(np.int64)  # (groups, g)
    x_scales = np.repeat(x.scales[:m.cols // GROUP], GROUP // g).astype(np.float64)
    dots = (values.reshape(m.rows, groups, g).astype(np.int64) * xs[None]).sum(axis=2)
    out = dots * scales.astype(np.float64) * x_scales
    if minima is not None:
        out += minima.astype(np.float64) * xs.sum(axis=1)[None] * x_scales
    return out.sum(axis=1)
