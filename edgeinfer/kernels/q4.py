"""4-bit weights (Q4_0 / Q4_1 / Q4_K and IQ4_NL / IQ4_XS groups of 32, rows in blocks of 16) and
their GEMV and GEMM with int8 activations.

Group: 32 weights in 16 bytes, byte j holding weight j (low nibble) and weight 16 + j (high
nibble), GGUF's own order, so importing Q4_0 and Q4_1 only moves bytes. w = scale * nibble +
offset, where the offset is -8 * scale for Q4_0 (no extra storage) and the stored minimum for Q4_1
and Q4_K (-dmin * m). Scales and minima are stored as scales.py says: fp16 bits (Q4_0, Q4_1), or
Q4_K's own fp16 d per 256 columns times a 6-bit integer per group.

Layout: rows go in blocks of 16 (padded with zero rows), one vector lane per row. For each group of
32 columns, a block holds 4 loads of 64 bytes; load i has, in lane r (4 bytes), row r's bytes
4i..4i+3 of the group; then the 16 rows' scales of the group (and minima). A block is one sequential
stream per array, and no kernel ever sums across lanes.

Kernel: each load splits into low and high nibbles, and a byte dot product (vpdpbusd) multiplies
every lane's 4 nibbles by the same 4 int8 activations, broadcast: 8 of them give the 16 rows' dot
products with the group's 32 activations. The float work is one vector per group for 16 rows:
    term = float(dot) * (scale * x_scale) + offset * x_sum
(x_sum = x_scale * sum of the group's int8 activations) for Q4_1 and Q4_K; Q4_0, whose offset is -8
times its scale, starts the integer dot at -8 times the activations' sum instead, so its term is
float(dot) * (scale * x_scale), one product, added by an FMA. IQ4_NL and IQ4_XS (a nibble indexes
IQ4_VALUES, a fixed non-linear table) take the same path after one byte lookup per load
(simd.shuffle_bytes) turns the nibbles into the table's values + 128 (1..241, unsigned bytes as the
dot product wants them): their offset is -128 times the scale, folded likewise. Each row's terms add up in its lane,
in 4 running sums by group index mod 4 added at the end as ((0 + 1) + (2 + 3)) (the order of the
4-row layout before this one, so Q4_1 outputs kept their bits): float32, or, when the output array
is int64, each term rounded to fixed point and added as integers (simd.py): the partial sums a
cluster adds exactly. The GEMM runs four tokens over each group, sharing its loads and splits; its
rows are the GEMV's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import EdgeInferError
from .activations import CHUNK, GROUP, Q8Activations
from .kinds import by_kind, kind
from .simd import (accumulate_product, accumulate_units, accumulator, accumulator4, broadcast4, combine4,
                   constant_bytes, dpbusd, dpbusd_nibbles, fixed_unit, fma, has_kernels, hi_nibbles, into0, into1,
                   into2, into3, lane, lo_nibbles, load16, load_i8, mul, prefetch, product_into0, product_into1,
                   product_into2, product_into3, shuffle_bytes, splat, splat_i32, store16, to_f32, total4, zeros_i32)
from .scales import (ROWS, activation_span, block_scales, deinterleave_scales, group_count, group_scale, interleave_scales,
                     prefetch_scales, scales_nbytes, select_scales)


def to_blocks(qs: np.ndarray, rows_padded: int, groups: int) -> np.ndarray:
    """Row-major nibbles (rows, cols/2) -> the blocks' loads (blocks, groups * 256)."""
    out = np.zeros((rows_padded, groups * 16), np.uint8)
    out[:qs.shape[0], :qs.shape[1]] = qs
    return np.ascontiguousarray(out.reshape(rows_padded // ROWS, ROWS, groups, 4, 4).transpose(0, 2, 3, 1, 4)
                                .reshape(rows_padded // ROWS, groups * 256))


def from_blocks(packed: np.ndarray, rows: int, width: int, ids: np.ndarray | None = None) -> np.ndarray:
    """to_blocks undone: the rows (all, or those in `ids`) as row-major nibbles (n, width)."""
    groups = packed.shape[1] // 256
    if ids is None:
        blocks = packed.shape[0]
        return packed.reshape(blocks, groups, 4, ROWS, 4).transpose(0, 3, 1, 2, 4).reshape(blocks * ROWS, -1)[:rows, :width]
    ids = np.asarray(ids)
    picked = packed[ids // ROWS].reshape(len(ids), groups, 4, ROWS, 4)[np.arange(len(ids)), :, :, ids % ROWS, :]
    return picked.reshape(len(ids), -1)[:, :width]


Q4_0_FACTOR = -8.0  # Q4_0's offset is this times its scale (no minima stored)
IQ4_FACTOR = -128.0  # IQ4_NL / IQ4_XS: w = scale * (IQ4_UNSIGNED[nibble] - 128), the factor marks the lookup
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)  # GGUF's
IQ4_UNSIGNED = (IQ4_VALUES + 128).astype(np.uint8)  # what the kernels multiply: unsigned bytes


@dataclass(frozen=True)
class Q4Matrix:
    packed: np.ndarray  # (blocks, groups * 256) uint8, groups padded to whole chunks of 128 columns
    scales: object  # (blocks, groups * ROWS) fp16 bits (uint16) or float32, or SuperScales (scales.py)
    offsets: object  # Q4_1, Q4_K: minima, laid out as scales; Q4_0: the scales themselves
    offset_factor: float  # -8 (Q4_0), 1 (Q4_1, Q4_K) or IQ4_FACTOR (IQ4_NL, IQ4_XS: nibbles index IQ4_VALUES)
    rows: int
    cols: int
    bits = 4

    @property
    def lookup(self) -> bool:
        """Whether the nibbles index IQ4_VALUES (IQ4_NL, IQ4_XS) rather than being the values."""
        return self.offset_factor == IQ4_FACTOR

    @property
    def kind(self) -> np.dtype:
        """Which loop the kernels run (kinds.py)."""
        return LOOKUP if self.lookup else FOLDED if self.offset_factor == Q4_0_FACTOR else MINIMA

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is self.scales else scales_nbytes(self.offsets)
        return self.packed.nbytes + scales_nbytes(self.scales) + extra

    @classmethod
    def from_rows(cls, qs: np.ndarray, scales: np.ndarray, minima: np.ndarray | None = None,
                  lookup: bool = False) -> "Q4Matrix":
        """From row-major nibbles (rows, cols/2), scales (rows, cols/32) and, for Q4_1 and Q4_K,
        minima: float values, or SuperScales (scales.py). `lookup`: the nibbles index IQ4_VALUES."""
        rows, cols = qs.shape[0], qs.shape[1] * 2
        if cols % GROUP:
            raise ValueError(f"{cols} columns: 4-bit rows need a multiple of {GROUP}")
        if lookup and minima is not None:
            raise ValueError("IQ4 rows have no minima")
        groups, rows_padded = -(-cols // CHUNK) * CHUNK // GROUP, -(-rows // ROWS) * ROWS
        sc = interleave_scales(scales, rows_padded, groups)
        offsets = sc if minima is None else interleave_scales(minima, rows_padded, groups)
        factor = IQ4_FACTOR if lookup else Q4_0_FACTOR if minima is None else 1.0
        return cls(to_blocks(qs, rows_padded, groups), sc, offsets, factor, rows, cols)

    @staticmethod
    def array_shapes(rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of `packed` and of `scales` (and minima) for a rows x cols matrix."""
        blocks, groups = -(-rows // ROWS), -(-cols // CHUNK) * CHUNK // GROUP
        return (blocks, groups * 256), (blocks, groups * ROWS)

    @classmethod
    def from_values(cls, q: np.ndarray, scales: np.ndarray, minima: np.ndarray | None = None,
                    lookup: bool = False) -> "Q4Matrix":
        """From nibble values 0..15 (rows, cols), per 32: w = scale * (q - 8), or scale * q + minimum;
        with `lookup`, scale * IQ4_VALUES[q]."""
        rows, cols = q.shape
        g = q.astype(np.uint8).reshape(rows, cols // GROUP, GROUP)
        return cls.from_rows((g[..., :16] | (g[..., 16:] << 4)).reshape(rows, cols // 2), scales, minima, lookup)

    def row_major(self, ids: np.ndarray | None = None, raw: bool = False) -> tuple:
        """(nibbles (rows, cols/2), scales and minima (rows, cols/32), as float32, or as stored when
        `raw`) of all rows or of `ids`, undoing the interleave; minima None for Q4_0, whose offset
        is -8 * scale."""
        groups = self.cols // GROUP
        scales = deinterleave_scales(self.scales, self.rows, groups, ids, raw)
        minima = None if self.offsets is self.scales else deinterleave_scales(self.offsets, self.rows, groups, ids, raw)
        return from_blocks(self.packed, self.rows, self.cols // 2, ids), scales, minima

    def select(self, rows: slice, cols: slice) -> "Q4Matrix":
        """The block of rows x cols as a matrix of its own, bit for bit: a tensor-parallel shard.
        Columns go by whole groups of 32, so every weight keeps its scale and offset (SuperScales
        stay so on whole super-blocks: scales.select_scales)."""
        c0, c1, _ = cols.indices(self.cols)
        if c0 % GROUP or c1 % GROUP:
            raise ValueError(f"columns {c0}:{c1} do not fall on groups of {GROUP}")
        qs, scales, minima = self.row_major(raw=True)
        g0, g1 = c0 // GROUP, c1 // GROUP
        return Q4Matrix.from_rows(qs[rows, c0 // 2:c1 // 2], select_scales(scales, rows, g0, g1),
                                  None if minima is None else select_scales(minima, rows, g0, g1), self.lookup)

    def offsets_of(self, scales: np.ndarray, minima: np.ndarray | None) -> np.ndarray:
        """What is added to scale * nibble (scale * IQ4_UNSIGNED[nibble] for IQ4), per group: the
        minimum, or -8 * scale for Q4_0, -128 * scale for IQ4."""
        return np.float32(self.offset_factor) * (scales if minima is None else minima)

    def integers(self, q: np.ndarray) -> np.ndarray:
        """The integers the kernels multiply for nibbles `q`: the nibbles, or IQ4's unsigned values."""
        return IQ4_UNSIGNED[q] if self.lookup else q

    def matmul(self, x: Q8Activations, out: np.ndarray) -> np.ndarray:
        """One vector (GEMV) or a batch of tokens (GEMM)."""
        return gemm(self, x, out) if x.flat.ndim == 2 else gemv(self, x, out)

    def kernel_args(self) -> tuple:
        """The matrix as the fused decode layer takes it (decode_layer.py)."""
        return self.kind, activation_span(self.scales), self.packed, self.scales, self.offsets, float(self.offset_factor)

    def dequantize(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Float32 values of all rows, or of the rows in `ids` (an embedding lookup), as GGUF's own
        dequantisation computes them: d * (q - 8) for Q4_0, d * IQ4_VALUES[q] for IQ4, scale * q +
        minimum otherwise."""
        qs, scales, minima = self.row_major(ids)
        b = qs.reshape(qs.shape[0], self.cols // GROUP, 16)
        q = self.integers(np.concatenate([b & 15, b >> 4], axis=2)).astype(np.float32)
        if minima is None:
            w = (q + np.float32(self.offset_factor)) * scales[:, :, None]
        else:
            w = q * scales[:, :, None] + minima[:, :, None] * np.float32(self.offset_factor)
        return w.reshape(qs.shape[0], self.cols)


@njit(inline="always")
def _nibbles(packed, w):
    """A group step's 4 loads (16 rows x 4 bytes each), split: low nibbles of load i are columns
    4i..4i+3 of the group, high nibbles columns 16+4i..16+4i+3."""
    n0, n1, n2, n3 = load_i8(packed, w), load_i8(packed, w + 64), load_i8(packed, w + 128), load_i8(packed, w + 192)
    return (lo_nibbles(n0), lo_nibbles(n1), lo_nibbles(n2), lo_nibbles(n3),
            hi_nibbles(n0), hi_nibbles(n1), hi_nibbles(n2), hi_nibbles(n3))


iq4_table = constant_bytes(np.tile(IQ4_UNSIGNED, 4))  # the 16 values in each 16-byte lane


@njit(inline="always")
def _looked_up(nibbles):
    """IQ4: a group step's 8 nibble vectors as IQ4_UNSIGNED's values, one byte lookup each."""
    t = iq4_table()
    l0, l1, l2, l3, h0, h1, h2, h3 = nibbles
    return (shuffle_bytes(t, l0), shuffle_bytes(t, l1), shuffle_bytes(t, l2), shuffle_bytes(t, l3),
            shuffle_bytes(t, h0), shuffle_bytes(t, h1), shuffle_bytes(t, h2), shuffle_bytes(t, h3))


def _dots_by(dot):
    @njit(inline="always")
    def dots(weights, x, o, start):
        """start + the 16 rows' integer dot products with the group of 32 activations at x[o:o + 32]: 8
        byte dot products, each 4 columns of every row against those 4 activations broadcast."""
        l0, l1, l2, l3, h0, h1, h2, h3 = weights
        d = dot(start, l0, broadcast4(x, o))
        d = dot(d, l1, broadcast4(x, o + 4))
        d = dot(d, l2, broadcast4(x, o + 8))
        d = dot(d, l3, broadcast4(x, o + 12))
        d = dot(d, h0, broadcast4(x, o + 16))
        d = dot(d, h1, broadcast4(x, o + 20))
        d = dot(d, h2, broadcast4(x, o + 24))
        return dot(d, h3, broadcast4(x, o + 28))
    return dots


_dots = _dots_by(dpbusd_nibbles)  # nibbles: small bytes, the cheaper form on AVX2 and ARM
_wide_dots = _dots_by(dpbusd)  # IQ4's looked-up bytes, up to 241


@njit(inline="always")
def group_term(dots, scale, offset, x_scale, x_sum, factor, unit):
    """A group's term for 16 rows (q4, q6 and q8), in units of 1 / unit (simd.fixed_unit):
    scale * x_scale * dot + offset * factor * x_sum.
    unit and factor are powers of two, so where they scale a product does not change its bits: they
    scale the group's vectors, which a GEMM's four tokens share (one vector multiply per group,
    where scaling each token's scalars took three scalar multiplies per token)."""
    return fma(to_f32(dots), mul(in_units(scale, unit), splat(x_scale)),
               mul(in_units(offset, factor * unit), splat(x_sum)))


@njit(inline="always")
def in_units(v, unit):
    """v * unit (a power of two: exact)."""
    return mul(v, splat(unit))


@njit(inline="always")
def _group(acc, w, s, m, x, xscales, xsums, factor, unit, g, into):
    """acc + group g's term for 16 rows against one token (`into`: simd.into0 .. into3)."""
    return into(acc, group_term(_dots(_nibbles(w, g * 256), x, g * GROUP, zeros_i32()), group_scale(s, g),
                                group_scale(m, g), xscales[g], xsums[g], factor, unit))


# Q4_0 (w = scale * (q - 8)) folds its offset into the integers: a group's dot product of q - 8 with
# the activations is the nibbles' dot product started at -8 times the activations' integer sum (the
# activations' `starts`), so its term is one product, float(dot) * (scale * x_scale), as llama.cpp
# forms it, added by a fused multiply-add: a GEMM's float work per group and token is then a
# convert, a multiply and an FMA instead of group_term's five operations (1B-shape GEMM, 2 threads:
# +12% float32 out, +8% fixed point; bench/RESULTS.md). A Q4_0 matrix is one whose offset_factor is
# Q4_0_FACTOR (from_rows). IQ4 (offset_factor IQ4_FACTOR) folds its -128 likewise: 16 times the starts.


@njit(inline="always")
def _q4_0_weights(w, g):
    """Group g's step: its nibbles."""
    return _nibbles(w, g * 256)


@njit(inline="always")
def _iq4_weights(w, g):
    """Group g's step: IQ4's values of its nibbles, looked up."""
    return _looked_up(_nibbles(w, g * 256))


@njit(inline="always")
def _q4_0_dots(weights, x, o, start):
    """The 16 rows' dot products of q - 8 with the group at x[o:o + 32], as float32 (start: the
    activations' Q4_0 start, -8 times their sum)."""
    return to_f32(_dots(weights, x, o, splat_i32(start)))


@njit(inline="always")
def _iq4_dots(weights, x, o, start):
    """Of IQ4_VALUES[q]: the looked-up bytes are the values + 128, so the start is 16 times Q4_0's."""
    return to_f32(_wide_dots(weights, x, o, splat_i32(start * 16)))


# Software prefetch this many group steps (4 KB of a block's weights) ahead, into L2: the matrices of
# a small model are short streams, and the hardware prefetcher ramps up too late on each (measured: a
# decode step's GEMVs 25% faster on one thread); at 1B sizes, from memory, 4 steps into L1 kept too
# few lines in flight (a 320 MB GEMV read 21-27 GB/s on 2 threads, 28-34 with this; bench/RESULTS.md).
# Prefetches past an array's end are harmless hints.
PREFETCH_STEPS = 16


@njit(inline="always")
def prefetch_ahead(packed, scales, offsets, w, g):
    """The loads of the step PREFETCH_STEPS after the one at packed[w:], and of group g's scales."""
    ahead = w + PREFETCH_STEPS * 256
    for line in range(4):
        prefetch(packed, ahead + line * 64)
    prefetch_scales(scales, g + PREFETCH_STEPS)
    prefetch_scales(offsets, g + PREFETCH_STEPS)


@njit(inline="always")
def store_rows(out, block, acc):
    r = block * ROWS
    if r + ROWS <= out.shape[0]:
        store16(out, r, acc)
    else:
        for i in range(out.shape[0] - r):  # leaving out the padding rows past the end
            out[r + i] = lane(acc, i)


@njit(inline="always")
def _minima_groups(acc, w, s, m, x, xscales, xsums, xstarts, factor, unit, g):
    """Groups g .. g + 3 of Q4_1 / Q4_K (a term with an offset), each into its own sum."""
    acc = _group(acc, w, s, m, x, xscales, xsums, factor, unit, g, into0)
    acc = _group(acc, w, s, m, x, xscales, xsums, factor, unit, g + 1, into1)
    acc = _group(acc, w, s, m, x, xscales, xsums, factor, unit, g + 2, into2)
    return _group(acc, w, s, m, x, xscales, xsums, factor, unit, g + 3, into3)


@njit(inline="always")
def _pass4(w, s, m, x, xscales, xsums, factor, t, k, out):
    """Tokens t .. t + 3: the sums of the groups whose index is k mod 4, each group's loads and
    nibble splits shared by the four tokens. xsums: the activations' (sums, starts)."""
    a0, a1, a2, a3 = accumulator(out), accumulator(out), accumulator(out), accumulator(out)
    unit = fixed_unit(out)
    xsums, _ = xsums
    for g in range(k, group_count(s), 4):
        n, scale, offset, o = _nibbles(w, g * 256), group_scale(s, g), group_scale(m, g), g * GROUP
        d0 = _dots(n, x[t], o, zeros_i32())
        a0 = accumulate_units(a0, group_term(d0, scale, offset, xscales[t, g], xsums[t, g], factor, unit))
        d1 = _dots(n, x[t + 1], o, zeros_i32())
        a1 = accumulate_units(a1, group_term(d1, scale, offset, xscales[t + 1, g], xsums[t + 1, g], factor, unit))
        d2 = _dots(n, x[t + 2], o, zeros_i32())
        a2 = accumulate_units(a2, group_term(d2, scale, offset, xscales[t + 2, g], xsums[t + 2, g], factor, unit))
        d3 = _dots(n, x[t + 3], o, zeros_i32())
        a3 = accumulate_units(a3, group_term(d3, scale, offset, xscales[t + 3, g], xsums[t + 3, g], factor, unit))
    return a0, a1, a2, a3


def _folded(weights_of, dots_of):
    """Q4_0's (or IQ4's) groups and GEMM pass, from how a group's weights are formed and dotted."""
    @njit(inline="always")
    def group(acc, w, s, x, xscales, xstarts, unit, g, into):
        """acc + group g's term for 16 rows against one token (`into`: simd.product_into0 .. 3)."""
        return into(acc, dots_of(weights_of(w, g), x, g * GROUP, xstarts[g]),
                    mul(in_units(group_scale(s, g), unit), splat(xscales[g])))

    @njit(inline="always")
    def groups(acc, w, s, m, x, xscales, xsums, xstarts, factor, unit, g):
        acc = group(acc, w, s, x, xscales, xstarts, unit, g, product_into0)
        acc = group(acc, w, s, x, xscales, xstarts, unit, g + 1, product_into1)
        acc = group(acc, w, s, x, xscales, xstarts, unit, g + 2, product_into2)
        return group(acc, w, s, x, xscales, xstarts, unit, g + 3, product_into3)

    @njit(inline="always")
    def pass4(w, s, m, x, xscales, xsums, factor, t, k, out):
        """_pass4's work, each group's weights formed once for the four tokens."""
        a0, a1, a2, a3 = accumulator(out), accumulator(out), accumulator(out), accumulator(out)
        unit = fixed_unit(out)
        _, xstarts = xsums
        for g in range(k, group_count(s), 4):
            n, scale, o = weights_of(w, g), in_units(group_scale(s, g), unit), g * GROUP
            a0 = accumulate_product(a0, dots_of(n, x[t], o, xstarts[t, g]), mul(scale, splat(xscales[t, g])))
            a1 = accumulate_product(a1, dots_of(n, x[t + 1], o, xstarts[t + 1, g]), mul(scale, splat(xscales[t + 1, g])))
            a2 = accumulate_product(a2, dots_of(n, x[t + 2], o, xstarts[t + 2, g]), mul(scale, splat(xscales[t + 2, g])))
            a3 = accumulate_product(a3, dots_of(n, x[t + 3], o, xstarts[t + 3, g]), mul(scale, splat(xscales[t + 3, g])))
        return a0, a1, a2, a3

    return groups, pass4


def gemm_block(pass4):
    """A GEMM's work on one block for every whole four tokens, from its `pass4` (q4's, q6's or q8's;
    xsums: the activations' sums as that pass takes them): for each four tokens, the groups (units)
    go by their index mod 4, one sum per token at a time (the block's weights are in cache after the
    first pass): 4 accumulators live in the loop rather than 16, and the same sums as the GEMV's
    block, added in the same order. One call per block: a call per four tokens cost as much as a
    sixth of a 2048-wide matrix's time (its passes are 16 groups long). The four passes run in a loop
    and leave their sums in a small buffer, so Numba types and inlines the pass once: inlined four
    times, it was 70 of the x86 kernel tests' 171 s of compiling, and most of the emulated ARM CPUs'
    (bench/RESULTS.md). The sums' stores and loads are exact: the same bits as before."""
    @njit
    def block_tokens(packed, scales, offsets, factor, x, xscales, xsums, out, block):
        w, s = packed[block], block_scales(scales, block)
        m = block_scales(offsets, block)
        sums = np.empty((4, 4 * ROWS), out.dtype)  # per pass k: the four tokens' 16 rows
        for t in range(0, x.shape[0] - 3, 4):
            for k in range(4):  # one pass typed and inlined, not four
                a0, a1, a2, a3 = pass4(w, s, m, x, xscales, xsums, factor, t, k, out)
                store16(sums[k], 0, a0)
                store16(sums[k], ROWS, a1)
                store16(sums[k], 2 * ROWS, a2)
                store16(sums[k], 3 * ROWS, a3)
            for i in range(4):
                o = i * ROWS
                store_rows(out[t + i], block, combine4(load16(sums[0], o), load16(sums[1], o), load16(sums[2], o),
                                                       load16(sums[3], o)))
    return block_tokens


def _kernels(groups, pass4):
    """A kind's block kernels: the GEMV's (rows 16*block .. 16*block+15 for one token: one pass over
    the block's streams, one lane per row, four groups per turn (their counts are whole chunks of 128
    columns), each into its own sum) and the GEMM's."""
    @njit  # not inlined into the parallel loops: Numba's array analysis there trips on the vector tuples
    def gemv_block(packed, scales, offsets, factor, x, xscales, xsums, xstarts, out, block, fetch=True):
        w, s = packed[block], block_scales(scales, block)
        m = block_scales(offsets, block)
        acc, unit = accumulator4(out), fixed_unit(out)
        for g in range(0, group_count(s), 4):
            if fetch:
                for k in range(4):
                    prefetch_ahead(w, s, m, (g + k) * 256, g + k)
            acc = groups(acc, w, s, m, x, xscales, xsums, xstarts, factor, unit, g)
        store_rows(out, block, total4(acc))

    return gemv_block, gemm_block(pass4)


# One kind per kind of offset (kinds.py), each with its own loop, so none pays for another's work
# and a compiled kernel holds only its matrix's loop: a minimum per group (Q4_1, Q4_K), Q4_0's
# folded offset, IQ4's lookup.
MINIMA, FOLDED, LOOKUP = KINDS = kind("q4"), kind("q4_0"), kind("iq4")
_blocks = {MINIMA: _kernels(_minima_groups, _pass4), FOLDED: _kernels(*_folded(_q4_0_weights, _q4_0_dots)),
           LOOKUP: _kernels(*_folded(_iq4_weights, _iq4_dots))}
_block = by_kind({k: gemv_block for k, (gemv_block, _) in _blocks.items()})
_block_tokens = by_kind({k: tokens_block for k, (_, tokens_block) in _blocks.items()})


@njit(parallel=True, cache=True)
def _gemv_parallel(kind, packed, scales, offsets, factor, x, xscales, xsums, xstarts, out):
    f = np.float32(factor)
    for block in prange(packed.shape[0]):
        # the index as int64, as the serial loops pass it: Numba types a prange index uint64 in the
        # parallel body (and int64 when it first types the function), so _block would compile twice
        _block(kind, packed, scales, offsets, f, x, xscales, xsums, xstarts, out, np.int64(block))


@njit(cache=True)
def _gemv_serial(kind, packed, scales, offsets, factor, x, xscales, xsums, xstarts, out):
    f = np.float32(factor)
    for block in range(packed.shape[0]):
        _block(kind, packed, scales, offsets, f, x, xscales, xsums, xstarts, out, block)


# Below this size a GEMV called on its own from Python runs on one core: the worker threads fall
# asleep between such calls, and waking them costs more than the matrix takes. The fused decode
# layer (decode_layer.py) runs every matrix in parallel: within one call its threads stay awake.
PARALLEL_MIN_BYTES = 4 << 20


@njit(parallel=True, cache=True)
def _gemm(kind, packed, scales, offsets, factor, x, xscales, xsums, xstarts, out):
    """out[t] = W x[t] for every token of a batch: each thread takes a 16-row block, whose weights
    come from memory once and stay in cache while the tokens pass, four at a time (the rest one by
    one). Every row's sum is formed as the GEMV forms it, so a token's output has the same bits in
    a batch as alone."""
    f = np.float32(factor)
    tokens = x.shape[0]
    for i in prange(packed.shape[0]):
        block = np.int64(i)  # (as in _gemv_parallel)
        _block_tokens(kind, packed, scales, offsets, f, x, xscales, (xsums, xstarts), out, block)
        for t in range(tokens - tokens % 4, tokens):
            _block(kind, packed, scales, offsets, f, x[t], xscales[t], xsums[t], xstarts[t], out[t], block, t == 0)


def check_operands(m, x: Q8Activations) -> None:
    """Before any 4/6/8-bit kernel runs: a CPU that has them, activations as wide as the matrix
    (padded to whole 128-wide chunks)."""
    if not has_kernels():  # the instructions would kill the process, not raise
        raise EdgeInferError(f"the {m.bits}-bit kernels need an x86 CPU with AVX2, FMA and F16C (or AVX-512 VNNI), "
                             "or aarch64")
    if x.flat.shape[-1] != -(-m.cols // CHUNK) * CHUNK:
        raise ValueError(f"activations of {x.flat.shape[-1]} columns for a matrix of {m.cols}")


def gemv(m: Q4Matrix, x: Q8Activations, out: np.ndarray, parallel: bool | None = None) -> np.ndarray:
    """out = W @ x, W 4-bit, x int8 (quantised by quantize_activations); on all threads when
    `parallel`, by default when the matrix is large enough to gain."""
    check_operands(m, x)
    parallel = m.nbytes >= PARALLEL_MIN_BYTES if parallel is None else parallel
    kernel = _gemv_parallel if parallel else _gemv_serial
    kernel(m.kind, m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.sums, x.starts, out)
    return out


def gemm(m: Q4Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out (tokens, rows) = x W^T for a batch quantised by quantize_activations."""
    check_operands(m, x)
    _gemm(m.kind, m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.sums, x.starts, out)
    return out


def gemv_reference(m: Q4Matrix, x: Q8Activations) -> np.ndarray:
    """The same computation in numpy: integer dot of nibbles and int8 per group, then the scales and
    the offset term with the group's activation sum."""
    qs, scales, minima = m.row_major()
    offsets = m.offsets_of(scales, minima)
    groups = m.cols // GROUP
    b = qs.reshape(m.rows, groups, 16)
    q = m.integers(np.concatenate([b & 15, b >> 4], axis=2)).astype(np.int64)
    dots = (q * x.int8()[None, :groups].astype(np.int64)).sum(axis=2)
    return (dots * scales.astype(np.float64) * x.scales[None, :groups] + offsets * x.sums[None, :groups]).sum(axis=1)
