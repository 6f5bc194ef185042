"""6-bit weights (GGUF Q6_K, and the 5- and 3-bit types Q5_0, Q5_1, Q5_K and Q3_K in 6 bits), rows
in blocks of 16 as in q4.py, and their GEMV and GEMM with int8 activations.

A weight is a 6-bit integer b (0..63) in a group of 16 or 32 weights with a scale and an offset:
w = scale * b + factor * offset. Types whose integers are signed (Q6_K: -32..31; Q5_0, Q3_K) store
them + 32, the offset is the scale itself and the factor -32; types with a minimum (Q5_1, Q5_K) store
the unsigned integer, the minimum as the offset and factor 1. Scales and minima as scales.py says.

Layout: per 32 columns (a group step), q4.py's 4 loads of 64 bytes holding the low 4 bits (load i,
lane r: row r's bytes 4i..4i+3 of the group, byte j holding column j in its low nibble and column
16 + j in its high one), then 2 loads holding the high 2 bits: in load h, lane r, byte b, the bits
2i, 2i+1 are the high bits of column 16h + 4i + b, i.e. of the same lane and byte of nibble vector
i of half h. A nibble vector ORed with its shifted field is the 6-bit vector (simd.high_bits*), and
the byte dot product takes it as it takes 4-bit nibbles. Columns are padded to whole 64s.

Kernel: each 16-column unit (a half group) is q8.py's unit, term for term:
    term = scale * x_scale * (b . x) + offset * factor * x_scale * (1 . x)
in 4 running sums by unit index mod 4, added as ((0 + 1) + (2 + 3)). The integers' dots are those
of the same matrix held in bytes (q8.py), at 6 bits per weight (plus scales) instead of 8; a signed
type's offset term is -32 times the activations' sum, there -128 times: outputs agree with the
bytes layout's to float32 rounding, not bit for bit, and are closer to the exact product (less
cancellation; tests/test_gguf_quants.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .activations import GROUP, Q8Activations
from .q4 import check_operands, gemm_block, group_term, store_rows
from .scales import (ROWS, SuperScales, activation_span, block_scales, deinterleave_scales, group_count, group_scale,
                     interleave_scales, prefetch_scales, scales_nbytes, select_scales)
from .simd import (accumulate_units, accumulator, accumulator4, broadcast4, dpbusd_nibbles, fixed_unit, hi_nibbles, high_bits0, high_bits1, high_bits2, high_bits3, into0, into1, into2, into3, lo_nibbles,
                   load_i8, prefetch, total4, zeros_i32)

UNIT = 16  # columns per unit: half a group step
STEP_BYTES = 384  # a group step of 16 rows x 32 columns: 4 loads of low nibbles, 2 of high bits
WEIGHTS_PER_STEP = 64  # columns are padded to whole 64s: two group steps per turn
SIGNED_FACTOR = -32.0  # 6-bit integers holding int6 + 32
PARALLEL_MIN_BYTES = 4 << 20  # as in q4.py: below this, waking threads costs more than it saves
# Group steps (7.5 KB) prefetched ahead, as in q4.py: from memory 4 steps read 68-77% of the
# streaming read, 20 steps 91-113% (1B FFN shapes, 2 threads; bench/RESULTS.md)
PREFETCH_STEPS = 20


def pack(values: np.ndarray, rows_padded: int, steps: int) -> np.ndarray:
    """6-bit integers (rows, cols) -> the blocks' group steps (blocks, steps * 384)."""
    v = np.zeros((rows_padded, steps * GROUP), np.uint8)
    v[:values.shape[0], :values.shape[1]] = values
    g = v.reshape(rows_padded, steps, GROUP)
    low, high = g & 15, g >> 4
    nibbles = low[..., :16] | (low[..., 16:] << 4)  # (rows, steps, 16): byte j = columns j and 16 + j
    h = high.reshape(rows_padded, steps, 2, 4, 4)  # (half, i, byte)
    planes = h[:, :, :, 0] | (h[:, :, :, 1] << 2) | (h[:, :, :, 2] << 4) | (h[:, :, :, 3] << 6)  # (rows, steps, 2, 4)
    blocks = rows_padded // ROWS
    nibbles = nibbles.reshape(blocks, ROWS, steps, 4, 4).transpose(0, 2, 3, 1, 4).reshape(blocks, steps, 256)
    planes = planes.reshape(blocks, ROWS, steps, 2, 4).transpose(0, 2, 3, 1, 4).reshape(blocks, steps, 128)
    return np.ascontiguousarray(np.concatenate([nibbles, planes], axis=2).reshape(blocks, steps * STEP_BYTES))


def unpack(packed: np.ndarray, rows: int, cols: int, ids: np.ndarray | None = None) -> np.ndarray:
    """pack undone: the 6-bit integers of all rows, or of the rows in `ids`, (n, cols) uint8."""
    if ids is not None:
        ids = np.asarray(ids)
        every = unpack(packed[ids // ROWS], len(ids) * ROWS, cols)
        return every[np.arange(len(ids)) * ROWS + ids % ROWS]
    blocks, steps = packed.shape[0], packed.shape[1] // STEP_BYTES
    a = packed.reshape(blocks, steps, STEP_BYTES)
    nibbles = a[..., :256].reshape(blocks, steps, 4, ROWS, 4).transpose(0, 3, 1, 2, 4).reshape(blocks * ROWS, steps, 16)
    planes = a[..., 256:].reshape(blocks, steps, 2, ROWS, 4).transpose(0, 3, 1, 2, 4).reshape(blocks * ROWS, steps, 2, 1, 4)
    high = (planes >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (rows, steps, half, i, byte)
    low = np.concatenate([nibbles & 15, nibbles >> 4], axis=2)
    return (low | (high.reshape(blocks * ROWS, steps, GROUP) << 4)).reshape(blocks * ROWS, -1)[:rows, :cols]


@dataclass(frozen=True)
class Q6Matrix:
    packed: np.ndarray  # (blocks, steps * 384) uint8
    scales: object  # (blocks, groups * ROWS) fp16 bits (uint16) or float32, or SuperScales (scales.py)
    offsets: object  # minima laid out as scales, or the scales themselves (signed integers)
    offset_factor: float  # -32 (signed) or 1 (minima)
    rows: int
    cols: int
    bits = 6
    lookup = False  # (q4.py's IQ4 nibbles index a table; 6-bit fields are their values)

    @property
    def group(self) -> int:
        """Weights per scale: 32 or 16."""
        q = self.scales.q if isinstance(self.scales, SuperScales) else self.scales
        steps, groups = self.packed.shape[1] // STEP_BYTES, q.shape[1] // ROWS
        return GROUP * steps // groups if groups else GROUP

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is self.scales else scales_nbytes(self.offsets)
        return self.packed.nbytes + scales_nbytes(self.scales) + extra

    @classmethod
    def from_values(cls, values: np.ndarray, scales, minima=None) -> "Q6Matrix":
        """From integers (rows, cols) and per-group scales (rows, cols/group, group 32 or 16): signed
        integers (-32..31) without minima, w = scale * value; unsigned (0..63) with them,
        w = scale * value + minimum. Scales and minima: float values, or SuperScales."""
        rows, cols = values.shape
        per_row = scales.q.shape[1] if isinstance(scales, SuperScales) else scales.shape[1]
        group = cols // per_row if per_row else GROUP
        if cols % GROUP or group not in (16, 32):
            raise ValueError(f"{cols} columns in groups of {group}: 6-bit rows need whole groups of 32 or 16")
        v = values.astype(np.int16) + (32 if minima is None else 0)
        if v.size and (v.min() < 0 or v.max() > 63):
            raise ValueError("6-bit rows hold integers -32..31 (or 0..63 with minima)")
        padded, rows_padded = -(-cols // WEIGHTS_PER_STEP) * WEIGHTS_PER_STEP, -(-rows // ROWS) * ROWS
        groups = padded // group
        sc = interleave_scales(scales, rows_padded, groups)
        offsets = sc if minima is None else interleave_scales(minima, rows_padded, groups)
        return cls(pack(v.astype(np.uint8), rows_padded, padded // GROUP), sc, offsets,
                   SIGNED_FACTOR if minima is None else 1.0, rows, cols)

    @staticmethod
    def array_shapes(rows: int, cols: int, group: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of `packed` and of `scales` (and minima) for a rows x cols matrix in groups of `group`."""
        blocks, padded = -(-rows // ROWS), -(-cols // WEIGHTS_PER_STEP) * WEIGHTS_PER_STEP
        return (blocks, padded // GROUP * STEP_BYTES), (blocks, padded // group * ROWS)

    def row_major(self, ids: np.ndarray | None = None, raw: bool = False) -> tuple:
        """(integers as int16 (rows, cols), scales and minima (rows, cols/group) as float32, or as
        stored when `raw`) of all rows or of `ids`; minima None for signed integers."""
        groups = self.cols // self.group
        values = unpack(self.packed, self.rows, self.cols, ids).astype(np.int16)
        scales = deinterleave_scales(self.scales, self.rows, groups, ids, raw)
        if self.offsets is self.scales:
            return values - 32, scales, None
        return values, scales, deinterleave_scales(self.offsets, self.rows, groups, ids, raw)

    def select(self, rows: slice, cols: slice) -> "Q6Matrix":
        """The block of rows x cols as a matrix of its own, bit for bit (columns by whole groups)."""
        c0, c1, _ = cols.indices(self.cols)
        if c0 % GROUP or c1 % GROUP:
            raise ValueError(f"columns {c0}:{c1} do not fall on groups of {GROUP}")
        values, scales, minima = self.row_major(raw=True)
        g0, g1 = c0 // self.group, c1 // self.group
        return Q6Matrix.from_values(values[rows, c0:c1], select_scales(scales, rows, g0, g1),
                                    None if minima is None else select_scales(minima, rows, g0, g1))

    def matmul(self, x: Q8Activations, out: np.ndarray) -> np.ndarray:
        """One vector (GEMV) or a batch of tokens (GEMM)."""
        return gemm6(self, x, out) if x.flat.ndim == 2 else gemv6(self, x, out)

    def kernel_args(self) -> tuple:
        """The matrix as the fused decode layer takes it (decode_layer.py)."""
        return 6, activation_span(self.scales), self.packed, self.scales, self.offsets, float(self.offset_factor)

    def dequantize(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Float32 values of all rows, or of the rows in `ids`, as GGUF's own dequantisation
        computes them: scale * value (+ minimum)."""
        values, scales, minima = self.row_major(ids)
        n, g = values.shape[0], self.group
        w = values.reshape(n, -1, g).astype(np.float32) * scales[:, :, None]
        if minima is not None:
            w = w + minima[:, :, None]
        return w.reshape(n, self.cols)


@njit(inline="always")
def _loads(w, step):
    at = step * STEP_BYTES
    return (load_i8(w, at), load_i8(w, at + 64), load_i8(w, at + 128), load_i8(w, at + 192),
            load_i8(w, at + 256), load_i8(w, at + 320))


@njit(inline="always")
def _six_bit_dots(v0, v1, v2, v3, planes, x, o):
    """4 nibble vectors with their high bits from `planes` (fields 0..3) against x[o:o + 16]."""
    d = dpbusd_nibbles(zeros_i32(), high_bits0(v0, planes), broadcast4(x, o))
    d = dpbusd_nibbles(d, high_bits1(v1, planes), broadcast4(x, o + 4))
    d = dpbusd_nibbles(d, high_bits2(v2, planes), broadcast4(x, o + 8))
    return dpbusd_nibbles(d, high_bits3(v3, planes), broadcast4(x, o + 12))


@njit(inline="always")
def _low_dots(loads, x, o):
    """Columns 0..15 of a group step (its even unit) against x[o:o + 16]."""
    n0, n1, n2, n3, p, _ = loads
    return _six_bit_dots(lo_nibbles(n0), lo_nibbles(n1), lo_nibbles(n2), lo_nibbles(n3), p, x, o)


@njit(inline="always")
def _high_dots(loads, x, o):
    """Columns 16..31 of a group step (its odd unit) against x[o:o + 16]."""
    n0, n1, n2, n3, _, p = loads
    return _six_bit_dots(hi_nibbles(n0), hi_nibbles(n1), hi_nibbles(n2), hi_nibbles(n3), p, x, o)


@njit(inline="always")
def _term(dots, s, m, xscales, xhalves, factor, unit, u, shift):
    """Unit u's term for 16 rows; 2**shift units share a group's scale."""
    g = u >> shift
    return group_term(dots, group_scale(s, g), group_scale(m, g), xscales[u >> 1], xhalves[u], factor, unit)


@njit(inline="always")
def _shift(w, s):
    """log2 of the units per scale group (0: groups of 16, 1: of 32)."""
    return 1 if group_count(s) < 2 * (w.shape[0] // STEP_BYTES) else 0


@njit(inline="always")
def _prefetch(w, s, m, step, shift):
    ahead = (step + PREFETCH_STEPS) * STEP_BYTES
    for line in range(6):
        prefetch(w, ahead + line * 64)
    g = (2 * (step + PREFETCH_STEPS)) >> shift
    prefetch_scales(s, g)
    prefetch_scales(m, g)


@njit  # not inlined into the parallel loops (as in q4.py)
def _block(packed, scales, offsets, factor, x, xscales, xhalves, out, block, fetch=True):
    """Rows 16*block .. 16*block+15 for one token, two group steps (four units) per turn, each unit
    into its own sum."""
    w, s = packed[block], block_scales(scales, block)
    m = block_scales(offsets, block)
    shift = _shift(w, s)
    acc, unit = accumulator4(out), fixed_unit(out)
    for step in range(0, w.shape[0] // STEP_BYTES, 2):
        if fetch:
            _prefetch(w, s, m, step, shift)
            _prefetch(w, s, m, step + 1, shift)
        u, o = 2 * step, step * GROUP
        a = _loads(w, step)
        acc = into0(acc, _term(_low_dots(a, x, o), s, m, xscales, xhalves, factor, unit, u, shift))
        acc = into1(acc, _term(_high_dots(a, x, o + 16), s, m, xscales, xhalves, factor, unit, u + 1, shift))
        b = _loads(w, step + 1)
        acc = into2(acc, _term(_low_dots(b, x, o + 32), s, m, xscales, xhalves, factor, unit, u + 2, shift))
        acc = into3(acc, _term(_high_dots(b, x, o + 48), s, m, xscales, xhalves, factor, unit, u + 3, shift))
    store_rows(out, block, total4(acc))


@njit(inline="always")
def _unit_dots(loads, high, x, o):
    return _high_dots(loads, x, o) if high else _low_dots(loads, x, o)


@njit(inline="always")
def _pass4(w, s, m, x, xscales, xhalves, factor, t, k, out):
    """Tokens t .. t + 3: the sums of the units whose index is k mod 4, each unit's loads shared."""
    shift = _shift(w, s)
    a0, a1, a2, a3 = accumulator(out), accumulator(out), accumulator(out), accumulator(out)
    unit, high = fixed_unit(out), k & 1
    for u in range(k, 2 * (w.shape[0] // STEP_BYTES), 4):
        loads, o = _loads(w, u >> 1), u * UNIT
        a0 = accumulate_units(a0, _term(_unit_dots(loads, high, x[t], o), s, m, xscales[t], xhalves[t], factor, unit,
                                        u, shift))
        a1 = accumulate_units(a1, _term(_unit_dots(loads, high, x[t + 1], o), s, m, xscales[t + 1], xhalves[t + 1],
                                        factor, unit, u, shift))
        a2 = accumulate_units(a2, _term(_unit_dots(loads, high, x[t + 2], o), s, m, xscales[t + 2], xhalves[t + 2],
                                        factor, unit, u, shift))
        a3 = accumulate_units(a3, _term(_unit_dots(loads, high, x[t + 3], o), s, m, xscales[t + 3], xhalves[t + 3],
                                        factor, unit, u, shift))
    return a0, a1, a2, a3


_block_tokens = gemm_block(_pass4)


@njit(parallel=True, cache=True)
def _gemv_parallel(packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    f = np.float32(factor)
    for block in prange(packed.shape[0]):
        _block(packed, scales, offsets, f, xflat, xscales, xhalves, out, np.int64(block))  # (int64: as in q4.py)


@njit(cache=True)
def _gemv_serial(packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    f = np.float32(factor)
    for block in range(packed.shape[0]):
        _block(packed, scales, offsets, f, xflat, xscales, xhalves, out, block)


@njit(parallel=True, cache=True)
def _gemm(packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    """out[t] = W x[t] for every token of a batch: each thread takes a 16-row block, four tokens at a
    time (the rest one by one); a token's rows are the GEMV's bit for bit."""
    f = np.float32(factor)
    tokens = xflat.shape[0]
    for i in prange(packed.shape[0]):
        block = np.int64(i)  # (as in q4.py)
        _block_tokens(packed, scales, offsets, f, xflat, xscales, xhalves, out, block)
        for t in range(tokens - tokens % 4, tokens):
            _block(packed, scales, offsets, f, xflat[t], xscales[t], xhalves[t], out[t], block, t == 0)


def gemv6(m: Q6Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out = W @ x, W 6-bit, x int8 (quantised by quantize_activations)."""
    check_operands(m, x)
    kernel = _gemv_parallel if m.nbytes >= PARALLEL_MIN_BYTES else _gemv_serial
    kernel(m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.halves, out)
    return out


def gemm6(m: Q6Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out (tokens, rows) = x W^T for a batch quantised by quantize_activations."""
    check_operands(m, x)
    _gemm(m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.halves, out)
    return out
