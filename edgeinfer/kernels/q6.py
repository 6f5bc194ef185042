"""Weights of 6, 5, 3 and 2 bits (GGUF Q6_K; Q5_0, Q5_1, Q5_K; Q3_K; Q2_K) held in as many bits
(the widths), rows in blocks of 16 as in q4.py, and their GEMV and GEMM with int8 activations, on
groups of 16 or 32 columns.

A weight is an integer b (0..63) in a group of 16 or 32 weights with a scale and an offset:
w = scale * b + factor * offset. Types whose integers are signed (Q6_K: -32..31; Q5_0: -16..15;
Q3_K: -4..3) have them + 32 as b, the offset is the scale itself and the factor -32: a width of 6
stores b, 5 stores the integer + 16, 4 the integer + 8 and 3 the integer + 4, and the kernel adds
the rest (16, 24, 28) back before the dot product (its `bias`), so every width computes the very
sums 6 bits would, bit for bit. Types with a minimum (Q5_1, Q5_K, Q2_K) store the unsigned integer,
the minimum as the offset and factor 1. Scales and minima as scales.py says.

Layout, per 32 columns (a group step), 64 bytes per bit. Widths 4 to 6: q4.py's 4 loads of 64 bytes
holding the low 4 bits (load i, lane r: row r's bytes 4i..4i+3 of the group, byte j holding column
j in its low nibble and column 16 + j in its high one), then the high bits:
- 6 bits: 2 loads; in load h, lane r, byte b, the bits 2i, 2i+1 are the high bits of column
  16h + 4i + b, i.e. of the same lane and byte of nibble vector i of half h;
- 5 bits: 1 load; in lane r, byte b, bit 4h + i is the high bit of column 16h + 4i + b;
- 4 bits: none (how files of format 6 held Q3_K and Q2_K: storage/quantize.py repacks those at load).
Widths 2 and 3: 2 loads of 2-bit fields (load c, lane r, byte b: field 2h + k holds column
16h + 8c + 4k + b, so fields 0, 1 of the loads are a unit's 4 vectors and fields 2, 3 the next
unit's), then for 3 bits the 5-bit width's plane, its bit going to bit 2.
A vector of low bits ORed with its shifted high bits (simd.high_bits*, high_bit*, third_bit*) is
the whole integers' vector, and the byte dot product takes it as it takes 4-bit nibbles. Columns
are padded to whole 64s. Files converted before the narrower widths hold the 5- and 3-bit types in
6 bits and Q2_K in bytes (q8.py): they still load and run.

Kernel: each 16-column unit (a half group) is q8.py's unit, term for term:
    term = scale * x_scale * (b . x) + offset * factor * x_scale * (1 . x)
in 4 running sums by unit index mod 4, added as ((0 + 1) + (2 + 3)). The integers' dots are those
of the same matrix held in bytes (q8.py), at 2 to 6 bits per weight (plus scales) instead of 8; a
signed type's offset term is -32 times the activations' sum, there -128 times: outputs agree with
the bytes layout's to float32 rounding, not bit for bit, and are closer to the exact product (less
cancellation; tests/test_gguf_quants.py). The 2- and 3-bit loops take more operations a vector
than the nibbles' (a field's shift and mask, the third bit's): from memory they read a quarter or
half fewer bytes at about the same time; from cache they run slower (bench/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .activations import GROUP, Q8Activations
from .kinds import by_kind, kind
from .q4 import check_operands, gemm_block, group_term, store_rows
from .scales import (ROWS, SuperScales, activation_span, block_scales, deinterleave_scales, group_count, group_scale,
                     interleave_scales, prefetch_scales, scales_nbytes, select_scales)
from .simd import (accumulate_units, accumulator, accumulator4, add_i8, broadcast4, crumb0, crumb1, crumb2, crumb3,
                   dpbusd_nibbles, fixed_unit, hi_nibbles, high_bit0, high_bit1, high_bit2, high_bit3, high_bit4, high_bit5,
                   high_bit6, high_bit7, high_bits0, high_bits1, high_bits2, high_bits3, into0, into1, into2, into3,
                   lo_nibbles, load_i8, prefetch, splat_i8, third_bit0, third_bit1, third_bit2, third_bit3, third_bit4,
                   third_bit5, third_bit6, third_bit7, total4, zeros_i32)

UNIT = 16  # columns per unit: half a group step
WEIGHTS_PER_STEP = 64  # columns are padded to whole 64s: two group steps per turn
SIGNED_FACTOR = -32.0  # a signed type's integers + 32 in the kernel's bytes, whatever the width
PARALLEL_MIN_BYTES = 4 << 20  # as in q4.py: below this, waking threads costs more than it saves
# Group steps (7.5 KB) prefetched ahead, as in q4.py: from memory 4 steps read 68-77% of the
# streaming read, 20 steps 91-113% (1B FFN shapes, 2 threads; bench/RESULTS.md)
PREFETCH_STEPS = 20


def step_bytes(width: int) -> int:
    """A group step of 16 rows x 32 columns held in `width` bits: 64 bytes per bit."""
    return 64 * width


def _base(width: int) -> int:
    """The low bits a width's vectors are built on: nibbles (4 to 6 bits) or 2-bit fields (2, 3)."""
    return 4 if width >= 4 else 2


def pack(values: np.ndarray, rows_padded: int, steps: int, width: int) -> np.ndarray:
    """Integers below 2**width (rows, cols) -> the blocks' group steps (blocks, steps * step_bytes)."""
    v = np.zeros((rows_padded, steps * GROUP), np.uint8)
    v[:values.shape[0], :values.shape[1]] = values
    g = v.reshape(rows_padded, steps, GROUP)
    base = _base(width)
    low, high = g & ((1 << base) - 1), g >> base
    if base == 4:  # (rows, steps, load i, byte b): columns 4i + b and 16 + 4i + b
        lows = (low[..., :16] | (low[..., 16:] << 4)).reshape(rows_padded, steps, 4, 4)
    else:  # (rows, steps, load c, byte b): field 2h + k is column 16h + 8c + 4k + b
        f = low.reshape(rows_padded, steps, 2, 2, 2, 4)  # (h, c, k, b)
        lows = f[:, :, 0, :, 0] | (f[:, :, 0, :, 1] << 2) | (f[:, :, 1, :, 0] << 4) | (f[:, :, 1, :, 1] << 6)
    h = high.reshape(rows_padded, steps, 2, 4, 4)  # (half, i, byte)
    if width - base == 2:  # bits 2i, 2i + 1 of plane h's byte
        planes = (h[:, :, :, 0] | (h[:, :, :, 1] << 2) | (h[:, :, :, 2] << 4) | (h[:, :, :, 3] << 6)).reshape(
            rows_padded, steps, 8)
    elif width == base:  # the low bits only
        planes = np.zeros((rows_padded, steps, 0), np.uint8)
    else:  # bit 4h + i of the byte (ORed term by term: a sum over the small axes took a third of a Q5_0 file's conversion)
        planes = np.zeros((rows_padded, steps, 4), np.uint8)
        for bit in range(8):
            planes |= h[:, :, bit // 4, bit % 4] << bit
    return interleave(np.concatenate([lows.reshape(rows_padded, steps, 4 * lows.shape[2]), planes], axis=2))


def interleave(fields: np.ndarray) -> np.ndarray:
    """Each row's bytes of each group step, the low bits' then the high bits' ((rows, steps,
    step_bytes / 16), rows in whole blocks of 16) -> the blocks' group steps, whose every 64-byte
    load holds 4 of those bytes of each of the block's 16 rows."""
    rows, steps, n = fields.shape
    blocks = rows // ROWS
    return np.ascontiguousarray(fields.reshape(blocks, ROWS, steps, n // 4, 4).transpose(0, 2, 3, 1, 4).reshape(
        blocks, steps * n * ROWS))


def unpack(packed: np.ndarray, rows: int, cols: int, width: int, ids: np.ndarray | None = None) -> np.ndarray:
    """pack undone: the integers of all rows, or of the rows in `ids`, (n, cols) uint8."""
    if ids is not None:
        ids = np.asarray(ids)
        every = unpack(packed[ids // ROWS], len(ids) * ROWS, cols, width)
        return every[np.arange(len(ids)) * ROWS + ids % ROWS]
    blocks, steps = packed.shape[0], packed.shape[1] // step_bytes(width)
    n, base = blocks * ROWS, _base(width)
    a = packed.reshape(blocks, steps, step_bytes(width))
    loads = base  # 64-byte loads of low bits: 4 of nibbles, 2 of 2-bit fields
    lows = a[..., :loads * 64].reshape(blocks, steps, loads, ROWS, 4).transpose(0, 3, 1, 2, 4).reshape(n, steps, loads, 4)
    if base == 4:
        nibbles = lows.reshape(n, steps, 16)
        low = np.concatenate([nibbles & 15, nibbles >> 4], axis=2)
    else:  # fields 2h + k of (load c, byte b) -> column 16h + 8c + 4k + b
        fields = np.stack([(lows >> (2 * f)) & 3 for f in range(4)], axis=2)  # (n, steps, f, c, b)
        low = fields.reshape(n, steps, 2, 2, 2, 4).transpose(0, 1, 2, 4, 3, 5).reshape(n, steps, GROUP)
    lanes = width - base
    planes = a[..., loads * 64:].reshape(blocks, steps, lanes, ROWS, 4).transpose(0, 3, 1, 2, 4)
    if lanes == 2:  # (rows, steps, half, i, byte)
        high = (planes.reshape(n, steps, 2, 1, 4) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    elif lanes == 0:
        high = np.zeros((n, steps, GROUP), np.uint8)
    else:
        high = (planes.reshape(n, steps, 1, 1, 4) >> np.arange(8, dtype=np.uint8).reshape(2, 4, 1)) & 1
    return (low | (high.reshape(n, steps, GROUP) << base)).reshape(n, steps * GROUP)[:rows, :cols]


def _padded(cols: int) -> int:
    """Columns padded to whole 64s (two group steps a turn)."""
    return -(-cols // WEIGHTS_PER_STEP) * WEIGHTS_PER_STEP


def _group(scales, cols: int, bits: int) -> int:
    """Weights per scale (16 or 32) of a row of `cols` with these scales; refused otherwise."""
    per_row = scales.q.shape[1] if isinstance(scales, SuperScales) else scales.shape[1]
    group = cols // per_row if per_row else GROUP
    if cols % GROUP or group not in (16, 32):
        raise ValueError(f"{cols} columns in groups of {group}: {bits}-bit rows need whole groups of 32 or 16")
    return group


@dataclass(frozen=True)
class Q6Matrix:
    packed: np.ndarray  # (blocks, steps * step_bytes(width)) uint8
    scales: object  # (blocks, groups * ROWS) fp16 bits (uint16) or float32, or SuperScales (scales.py)
    offsets: object  # minima laid out as scales, or the scales themselves (signed integers)
    offset_factor: float  # -32 (signed) or 1 (minima)
    rows: int
    cols: int
    bits = 6  # the integers' (Q5Matrix: 5, Q3Matrix: 3, Q2Matrix: 2), held in `width`
    lookup = False  # (q4.py's IQ4 nibbles index a table; these fields are their values)

    @property
    def width(self) -> int:
        """The bits an integer is held in, 64 bytes a group step each: `bits`, or 4 for the 2- and
        3-bit types as files of format 6 hold them (no kernel runs those: narrowed() first)."""
        steps = _padded(self.cols) // GROUP
        return self.packed.shape[1] // (64 * steps) if steps else self.bits

    @property
    def group(self) -> int:
        """Weights per scale: 32 or 16."""
        q = self.scales.q if isinstance(self.scales, SuperScales) else self.scales
        steps, groups = self.packed.shape[1] // step_bytes(self.width), q.shape[1] // ROWS
        return GROUP * steps // groups if groups else GROUP

    @property
    def kind(self) -> np.dtype:
        """Which loop the kernels run (kinds.py): the width's."""
        return {6: WIDTH6, 5: WIDTH5, 3: WIDTH3, 2: WIDTH2}[self.width]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is self.scales else scales_nbytes(self.offsets)
        return self.packed.nbytes + scales_nbytes(self.scales) + extra

    @classmethod
    def from_values(cls, values: np.ndarray, scales, minima=None, width: int | None = None) -> "Q6Matrix":
        """From integers (rows, cols) and per-group scales (rows, cols/group, group 32 or 16): signed
        integers of `bits` bits (6: -32..31) without minima, w = scale * value; unsigned (6: 0..63)
        with them, w = scale * value + minimum. Scales and minima: float values, or SuperScales.
        `width`: the bits they are held in, `bits` unless given (4: format 6's 2- and 3-bit layout)."""
        rows, cols = values.shape
        _group(scales, cols, cls.bits)
        top, v = 1 << cls.bits, values.astype(np.int16)
        low = 0 if minima is not None else -top // 2
        if v.size and (v.min() < low or v.max() >= low + top):
            raise ValueError(f"{cls.bits}-bit rows hold integers {-top // 2}..{top // 2 - 1} (or 0..{top - 1} with minima)")
        width = width or cls.bits
        v = v + (0 if minima is not None else 1 << (width - 1))
        packed = pack(v.astype(np.uint8), -(-rows // ROWS) * ROWS, _padded(cols) // GROUP, width)
        return cls._with_scales(packed, scales, minima, rows, cols)

    @classmethod
    def from_fields(cls, fields: np.ndarray, scales, minima, cols: int) -> "Q6Matrix":
        """As from_values, from integers already as the layout holds them, each row's bytes of each
        group step ((rows, cols / 32, step_bytes / 16): for 5 bits the 16 nibble bytes as q4.py
        pairs them, then the plane's 4), stored as from_values stores them (a signed type's + 16):
        what a Q5_0 or Q5_1 block holds (storage/gguf_quants.py), so never widened to integers."""
        rows, steps, _ = fields.shape
        _group(scales, cols, cls.bits)
        if steps * GROUP != cols:
            raise ValueError(f"{cols} columns in {steps} group steps of {GROUP}")
        whole = np.zeros((-(-rows // ROWS) * ROWS, _padded(cols) // GROUP, fields.shape[2]), np.uint8)
        whole[:rows, :steps] = fields
        return cls._with_scales(interleave(whole), scales, minima, rows, cols)

    @classmethod
    def _with_scales(cls, packed: np.ndarray, scales, minima, rows: int, cols: int) -> "Q6Matrix":
        """The matrix of `packed` (whole blocks, whole steps) and its scales and minima, laid out
        beside it (scales.py)."""
        rows_padded, groups = -(-rows // ROWS) * ROWS, _padded(cols) // _group(scales, cols, cls.bits)
        sc = interleave_scales(scales, rows_padded, groups)
        offsets = sc if minima is None else interleave_scales(minima, rows_padded, groups)
        return cls(packed, sc, offsets, SIGNED_FACTOR if minima is None else 1.0, rows, cols)

    @classmethod
    def array_shapes(cls, rows: int, cols: int, group: int,
                     width: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of `packed` and of `scales` (and minima) for a rows x cols matrix in groups of
        `group`, held in `width` bits (`bits` unless given)."""
        blocks, padded = -(-rows // ROWS), _padded(cols)
        return (blocks, padded // GROUP * step_bytes(width or cls.bits)), (blocks, padded // group * ROWS)

    def row_major(self, ids: np.ndarray | None = None, raw: bool = False) -> tuple:
        """(integers as int16 (rows, cols), scales and minima (rows, cols/group) as float32, or as
        stored when `raw`) of all rows or of `ids`; minima None for signed integers."""
        groups = self.cols // self.group
        values = unpack(self.packed, self.rows, self.cols, self.width, ids).astype(np.int16)
        scales = deinterleave_scales(self.scales, self.rows, groups, ids, raw)
        if self.offsets is self.scales:
            return values - (1 << (self.width - 1)), scales, None
        return values, scales, deinterleave_scales(self.offsets, self.rows, groups, ids, raw)

    def narrowed(self) -> "Q6Matrix":
        """The matrix held in its own width (`bits`), the very integers and scales."""
        return self if self.width == self.bits else type(self).from_values(*self.row_major(raw=True))

    def select(self, rows: slice, cols: slice) -> "Q6Matrix":
        """The block of rows x cols as a matrix of its own, bit for bit (columns by whole groups)."""
        c0, c1, _ = cols.indices(self.cols)
        if c0 % GROUP or c1 % GROUP:
            raise ValueError(f"columns {c0}:{c1} do not fall on groups of {GROUP}")
        values, scales, minima = self.row_major(raw=True)
        g0, g1 = c0 // self.group, c1 // self.group
        return type(self).from_values(values[rows, c0:c1], select_scales(scales, rows, g0, g1),
                                      None if minima is None else select_scales(minima, rows, g0, g1))

    def matmul(self, x: Q8Activations, out: np.ndarray) -> np.ndarray:
        """One vector (GEMV) or a batch of tokens (GEMM)."""
        return gemm6(self, x, out) if x.flat.ndim == 2 else gemv6(self, x, out)

    def kernel_args(self) -> tuple:
        """The matrix as the fused decode layer takes it (decode_layer.py)."""
        return self.kind, activation_span(self.scales), self.packed, self.scales, self.offsets, float(self.offset_factor)

    def dequantize(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Float32 values of all rows, or of the rows in `ids`, as GGUF's own dequantisation
        computes them: scale * value (+ minimum)."""
        values, scales, minima = self.row_major(ids)
        n, g = values.shape[0], self.group
        w = values.reshape(n, self.cols // g, g).astype(np.float32) * scales[:, :, None]
        if minima is not None:
            w = w + minima[:, :, None]
        return w.reshape(n, self.cols)


@dataclass(frozen=True)
class Q5Matrix(Q6Matrix):
    """Q5_0, Q5_1 and Q5_K as they are: the low nibbles as Q6Matrix's, one high bit per weight."""
    bits = 5


@dataclass(frozen=True)
class Q3Matrix(Q6Matrix):
    """Q3_K's signed 3-bit integers (+ 4): 2-bit fields and one high-bit plane."""
    bits = 3


@dataclass(frozen=True)
class Q2Matrix(Q6Matrix):
    """Q2_K's unsigned 2-bit integers (with minima): 2-bit fields only."""
    bits = 2


@njit(inline="always")
def _loads6(w, step, bias):
    at = step * 384
    return (load_i8(w, at), load_i8(w, at + 64), load_i8(w, at + 128), load_i8(w, at + 192),
            load_i8(w, at + 256), load_i8(w, at + 320))


@njit(inline="always")
def _loads5(w, step, bias):
    """A step's 5 loads, and the bias its 5-bit values take (splat_i8: 16 for a signed type)."""
    at = step * 320
    return load_i8(w, at), load_i8(w, at + 64), load_i8(w, at + 128), load_i8(w, at + 192), load_i8(w, at + 256), bias


@njit(inline="always")
def _loads3(w, step, bias):
    at = step * 192
    return load_i8(w, at), load_i8(w, at + 64), load_i8(w, at + 128), bias


@njit(inline="always")
def _loads2(w, step, bias):
    at = step * 128
    return load_i8(w, at), load_i8(w, at + 64), bias


@njit(inline="always")
def _dots(v0, v1, v2, v3, x, o):
    """A unit's 4 byte vectors (columns o..o + 15, 4 per vector) against x[o:o + 16]."""
    d = dpbusd_nibbles(zeros_i32(), v0, broadcast4(x, o))
    d = dpbusd_nibbles(d, v1, broadcast4(x, o + 4))
    d = dpbusd_nibbles(d, v2, broadcast4(x, o + 8))
    return dpbusd_nibbles(d, v3, broadcast4(x, o + 12))


@njit(inline="always")
def _low_dots5(loads, x, o):
    """Columns 0..15, their high bits 0..3 of the plane."""
    n0, n1, n2, n3, p, b = loads
    return _dots(high_bit0(lo_nibbles(n0), p, b), high_bit1(lo_nibbles(n1), p, b), high_bit2(lo_nibbles(n2), p, b),
                 high_bit3(lo_nibbles(n3), p, b), x, o)


@njit(inline="always")
def _high_dots5(loads, x, o):
    """Columns 16..31, their high bits 4..7 of the plane."""
    n0, n1, n2, n3, p, b = loads
    return _dots(high_bit4(hi_nibbles(n0), p, b), high_bit5(hi_nibbles(n1), p, b), high_bit6(hi_nibbles(n2), p, b),
                 high_bit7(hi_nibbles(n3), p, b), x, o)


@njit(inline="always")
def _low_dots6(loads, x, o):
    """Columns 0..15, their high bits fields 0..3 of the first plane."""
    n0, n1, n2, n3, p, _ = loads
    return _dots(high_bits0(lo_nibbles(n0), p), high_bits1(lo_nibbles(n1), p), high_bits2(lo_nibbles(n2), p),
                 high_bits3(lo_nibbles(n3), p), x, o)


@njit(inline="always")
def _high_dots6(loads, x, o):
    """Columns 16..31, their high bits fields 0..3 of the second plane."""
    n0, n1, n2, n3, _, p = loads
    return _dots(high_bits0(hi_nibbles(n0), p), high_bits1(hi_nibbles(n1), p), high_bits2(hi_nibbles(n2), p),
                 high_bits3(hi_nibbles(n3), p), x, o)


@njit(inline="always")
def _low_dots3(loads, x, o):
    """Columns 0..15: fields 0 and 1 of the two loads, their third bits 0..3 of the plane."""
    c0, c1, p, b = loads
    return _dots(third_bit0(crumb0(c0), p, b), third_bit1(crumb1(c0), p, b), third_bit2(crumb0(c1), p, b),
                 third_bit3(crumb1(c1), p, b), x, o)


@njit(inline="always")
def _high_dots3(loads, x, o):
    """Columns 16..31: fields 2 and 3, third bits 4..7."""
    c0, c1, p, b = loads
    return _dots(third_bit4(crumb2(c0), p, b), third_bit5(crumb3(c0), p, b), third_bit6(crumb2(c1), p, b),
                 third_bit7(crumb3(c1), p, b), x, o)


@njit(inline="always")
def _low_dots2(loads, x, o):
    """Columns 0..15: fields 0 and 1 of the two loads, plus the bias."""
    c0, c1, b = loads
    return _dots(add_i8(crumb0(c0), b), add_i8(crumb1(c0), b), add_i8(crumb0(c1), b), add_i8(crumb1(c1), b), x, o)


@njit(inline="always")
def _high_dots2(loads, x, o):
    """Columns 16..31: fields 2 and 3."""
    c0, c1, b = loads
    return _dots(add_i8(crumb2(c0), b), add_i8(crumb3(c0), b), add_i8(crumb2(c1), b), add_i8(crumb3(c1), b), x, o)


@njit(inline="always")
def _term(dots, s, m, xscales, xhalves, factor, unit, u, shift):
    """Unit u's term for 16 rows; 2**shift units share a group's scale."""
    g = u >> shift
    return group_term(dots, group_scale(s, g), group_scale(m, g), xscales[u >> 1], xhalves[u], factor, unit)


def _kernels(width, loads, low_dots, high_dots):
    """One width's block kernels: the GEMV's (one token) and the GEMM's (every whole four tokens),
    each width with a loop of its own (as q4.py's kinds of offset). A signed type's integers are
    stored + 2**(width - 1) and moved by `signed` to + 32."""
    size, signed = step_bytes(width), 32 - (1 << (width - 1))

    @njit(inline="always")
    def shift_of(w, s):
        """log2 of the units per scale group (0: groups of 16, 1: of 32)."""
        return 1 if group_count(s) < 2 * (w.shape[0] // size) else 0

    @njit(inline="always")
    def fetch_ahead(w, s, m, step, shift):
        ahead = (step + PREFETCH_STEPS) * size
        for line in range(width):  # a step is `width` 64-byte lines
            prefetch(w, ahead + line * 64)
        g = (2 * (step + PREFETCH_STEPS)) >> shift
        prefetch_scales(s, g)
        prefetch_scales(m, g)

    @njit  # not inlined into the parallel loops (as in q4.py)
    def gemv_block(packed, scales, offsets, factor, x, xscales, xhalves, out, block, fetch=True):
        """Rows 16*block .. 16*block+15 for one token, two group steps (four units) per turn, each
        unit into its own sum."""
        w, s = packed[block], block_scales(scales, block)
        m = block_scales(offsets, block)
        shift, bias = shift_of(w, s), splat_i8(signed if factor < 0 else 0)
        acc, unit = accumulator4(out), fixed_unit(out)
        for step in range(0, w.shape[0] // size, 2):
            if fetch:
                fetch_ahead(w, s, m, step, shift)
                fetch_ahead(w, s, m, step + 1, shift)
            u, o = 2 * step, step * GROUP
            a = loads(w, step, bias)
            acc = into0(acc, _term(low_dots(a, x, o), s, m, xscales, xhalves, factor, unit, u, shift))
            acc = into1(acc, _term(high_dots(a, x, o + 16), s, m, xscales, xhalves, factor, unit, u + 1, shift))
            b = loads(w, step + 1, bias)
            acc = into2(acc, _term(low_dots(b, x, o + 32), s, m, xscales, xhalves, factor, unit, u + 2, shift))
            acc = into3(acc, _term(high_dots(b, x, o + 48), s, m, xscales, xhalves, factor, unit, u + 3, shift))
        store_rows(out, block, total4(acc))

    @njit(inline="always")
    def unit_dots(a, high, x, o):
        return high_dots(a, x, o) if high else low_dots(a, x, o)

    @njit(inline="always")
    def pass4(w, s, m, x, xscales, xhalves, factor, t, k, out):
        """Tokens t .. t + 3: the sums of the units whose index is k mod 4, each unit's loads shared."""
        shift, bias = shift_of(w, s), splat_i8(signed if factor < 0 else 0)
        a0, a1, a2, a3 = accumulator(out), accumulator(out), accumulator(out), accumulator(out)
        unit, high = fixed_unit(out), k & 1
        for u in range(k, 2 * (w.shape[0] // size), 4):
            a, o = loads(w, u >> 1, bias), u * UNIT
            a0 = accumulate_units(a0, _term(unit_dots(a, high, x[t], o), s, m, xscales[t], xhalves[t], factor, unit,
                                            u, shift))
            a1 = accumulate_units(a1, _term(unit_dots(a, high, x[t + 1], o), s, m, xscales[t + 1], xhalves[t + 1],
                                            factor, unit, u, shift))
            a2 = accumulate_units(a2, _term(unit_dots(a, high, x[t + 2], o), s, m, xscales[t + 2], xhalves[t + 2],
                                            factor, unit, u, shift))
            a3 = accumulate_units(a3, _term(unit_dots(a, high, x[t + 3], o), s, m, xscales[t + 3], xhalves[t + 3],
                                            factor, unit, u, shift))
        return a0, a1, a2, a3

    return gemv_block, gemm_block(pass4)


# One kind per width (kinds.py): a compiled GEMV or GEMM holds the loop of its matrix's width only.
KINDS = WIDTH6, WIDTH5, WIDTH3, WIDTH2 = kind("q6-6bit"), kind("q6-5bit"), kind("q6-3bit"), kind("q6-2bit")
_blocks = {WIDTH6: _kernels(6, _loads6, _low_dots6, _high_dots6), WIDTH5: _kernels(5, _loads5, _low_dots5, _high_dots5),
           WIDTH3: _kernels(3, _loads3, _low_dots3, _high_dots3), WIDTH2: _kernels(2, _loads2, _low_dots2, _high_dots2)}
_block = by_kind({k: gemv_block for k, (gemv_block, _) in _blocks.items()})
_block_tokens = by_kind({k: tokens_block for k, (_, tokens_block) in _blocks.items()})


@njit(parallel=True, cache=True)
def _gemv_parallel(kind, packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    f = np.float32(factor)
    for block in prange(packed.shape[0]):
        _block(kind, packed, scales, offsets, f, xflat, xscales, xhalves, out, np.int64(block))  # (int64: as in q4.py)


@njit(cache=True)
def _gemv_serial(kind, packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    f = np.float32(factor)
    for block in range(packed.shape[0]):
        _block(kind, packed, scales, offsets, f, xflat, xscales, xhalves, out, block)


@njit(parallel=True, cache=True)
def _gemm(kind, packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    """out[t] = W x[t] for every token of a batch: each thread takes a 16-row block, four tokens at a
    time (the rest one by one); a token's rows are the GEMV's bit for bit."""
    f = np.float32(factor)
    tokens = xflat.shape[0]
    for i in prange(packed.shape[0]):
        block = np.int64(i)  # (as in q4.py)
        _block_tokens(kind, packed, scales, offsets, f, xflat, xscales, xhalves, out, block)
        for t in range(tokens - tokens % 4, tokens):
            _block(kind, packed, scales, offsets, f, xflat[t], xscales[t], xhalves[t], out[t], block, t == 0)


def gemv6(m: Q6Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out = W @ x, W of 2 to 6 bits, x int8 (quantised by quantize_activations)."""
    check_operands(m, x)
    kernel = _gemv_parallel if m.nbytes >= PARALLEL_MIN_BYTES else _gemv_serial
    kernel(m.kind, m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.halves, out)
    return out


def gemm6(m: Q6Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out (tokens, rows) = x W^T for a batch quantised by quantize_activations."""
    check_operands(m, x)
    _gemm(m.kind, m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.halves, out)
    return out
