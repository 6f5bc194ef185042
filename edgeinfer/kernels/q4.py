"""4-bit weights (Q4_0 / Q4_1 groups, rows interleaved by 4) and the decode GEMV with int8 activations.

Group: 32 weights in 16 bytes, low nibbles weights 0..15, high nibbles 16..31 (GGUF's own order, so
importing Q4_0 and Q4_1 only moves bytes). w = scale * nibble + offset, where the offset is
-8 * scale for Q4_0 (no extra storage) and the stored minimum for Q4_1 and Q4_K (-dmin * m). Scales
and minima are fp16, kept as their uint16 bits (the kernels widen them with vcvtph2ps): 5 bits per
weight for Q4_1; or float32 where fp16 cannot hold them exactly (Q4_K's d * sc): 6 bits.

Rows go in blocks of 4 (padded with zero rows); within a block, for each chunk of 128 weights, the 4
rows' 64 bytes lie next to each other, and so do their 4 x 4 scales (and minima). A 4-row step thus
reads one sequential stream per array, as llama.cpp's repacking does. Columns are padded to a whole
number of chunks with zero groups.

Kernel (AVX-512 VNNI): one 64-byte load is 4 groups of one row; vpdpbusd sums 4 bytes per i32 lane,
so lanes 4g..4g+3 hold group g's low nibbles and, after a second vpdpbusd, its high ones. The 4
rows' integer sums are added per group first (exact), so that one 16-lane vector holds the 4 rows x
4 groups of a chunk step, lane 4 * row + g, and the float work is one FMA for the 4 rows:
    term = float(dot) * (scale * x_scale) + offset * (factor * x_sum)
(x_sum = x_scale * sum of the group's int8 activations, factor -8 for Q4_0 whose offset is its
scale, 1 for Q4_1). The terms add up in float32 lanes, or, when the output array is int64, each
rounded to fixed point and added as integers (simd.py): the partial sums a cluster adds exactly.
A GEMM runs the same block for two tokens at a time while the block's weights stay in L1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import EdgeInferError
from .activations import CHUNK, GROUP, Q8Activations
from .simd import (accumulate, accumulator, dpbusd_nibbles, fma, group_sums4, has_kernels, hi_nibbles, lo_nibbles,
                   load_floats, load_i8, mul, prefetch, quad_total, splat, tile4, to_f32, zeros_i32)

ROWS = 4  # rows interleaved per block


def interleave(a: np.ndarray, per_chunk: int, rows_padded: int, chunks: int) -> np.ndarray:
    """(rows, chunks * per_chunk) -> (blocks, chunks * ROWS * per_chunk), zero rows and chunks padded."""
    out = np.zeros((rows_padded, chunks * per_chunk), a.dtype)
    out[:a.shape[0], :a.shape[1]] = a
    blocks = rows_padded // ROWS
    return np.ascontiguousarray(out.reshape(blocks, ROWS, chunks, per_chunk).transpose(0, 2, 1, 3)
                                .reshape(blocks, chunks * ROWS * per_chunk))  # also for no rows (a headless shard)


def deinterleave(a: np.ndarray, per_chunk: int, rows: int, width: int, ids: np.ndarray | None = None) -> np.ndarray:
    """The rows (all, or those in `ids`) back in row-major order, padding dropped."""
    chunks = a.shape[1] // (ROWS * per_chunk)
    if ids is None:
        blocks = a.shape[0]
        return a.reshape(blocks, chunks, ROWS, per_chunk).transpose(0, 2, 1, 3).reshape(blocks * ROWS, -1)[:rows, :width]
    ids = np.asarray(ids)
    picked = a[ids // ROWS].reshape(len(ids), chunks, ROWS, per_chunk)[np.arange(len(ids)), :, ids % ROWS, :]
    return picked.reshape(len(ids), -1)[:, :width]


def stored_scales(a: np.ndarray) -> np.ndarray:
    """Scales (or minima) as the kernels load them: fp16 bits (uint16) when every value is an fp16
    exactly (Q4_0, Q4_1, Q8_0), else float32 (a K-quant's sub-block scale d * sc needs up to 17
    significant bits). Lossless either way; the kernels widen fp16 with vcvtph2ps."""
    a = np.asarray(a, np.float32)
    halves = a.astype(np.float16)
    return halves.view(np.uint16) if np.array_equal(halves.astype(np.float32), a) else np.ascontiguousarray(a)


def scale_values(a: np.ndarray) -> np.ndarray:
    """Stored scales (fp16 bits or float32) as float32."""
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else np.array(a, np.float32)


@dataclass(frozen=True)
class Q4Matrix:
    packed: np.ndarray  # (blocks, chunks * ROWS * 64) uint8
    scales: np.ndarray  # (blocks, chunks * ROWS * 4) fp16 bits (uint16) or float32
    offsets: np.ndarray  # Q4_1, Q4_K: minima, laid out as scales; Q4_0: the scales array itself
    offset_factor: float  # -8 (Q4_0) or 1 (Q4_1)
    rows: int
    cols: int
    bits = 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def padded_cols(self) -> int:
        return -(-self.cols // CHUNK) * CHUNK

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is self.scales else self.offsets.nbytes
        return self.packed.nbytes + self.scales.nbytes + extra

    @classmethod
    def from_rows(cls, qs: np.ndarray, scales: np.ndarray, minima: np.ndarray | None = None) -> "Q4Matrix":
        """From row-major nibbles (rows, cols/2), scales (rows, cols/32) and, for Q4_1, minima."""
        rows, cols = qs.shape[0], qs.shape[1] * 2
        if cols % GROUP:
            raise ValueError(f"{cols} columns: 4-bit rows need a multiple of {GROUP}")
        chunks, rows_padded = -(-cols // CHUNK), -(-rows // ROWS) * ROWS
        sc = interleave(stored_scales(scales), 4, rows_padded, chunks)
        offsets = sc if minima is None else interleave(stored_scales(minima), 4, rows_padded, chunks)
        return cls(interleave(qs, 64, rows_padded, chunks), sc, offsets, -8.0 if minima is None else 1.0, rows, cols)

    @classmethod
    def from_values(cls, q: np.ndarray, scales: np.ndarray, minima: np.ndarray | None = None) -> "Q4Matrix":
        """From nibble values 0..15 (rows, cols), per 32: w = scale * (q - 8), or scale * q + minimum."""
        rows, cols = q.shape
        g = q.astype(np.uint8).reshape(rows, cols // GROUP, GROUP)
        return cls.from_rows((g[..., :16] | (g[..., 16:] << 4)).reshape(rows, cols // 2), scales, minima)

    def row_major(self, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(nibbles (rows, cols/2), scales and minima (rows, cols/32), as float32) of all rows or of
        `ids`, undoing the interleave; minima None for Q4_0, whose offset is -8 * scale."""
        groups = self.cols // GROUP
        scales = scale_values(deinterleave(self.scales, 4, self.rows, groups, ids))
        minima = None if self.offsets is self.scales else scale_values(deinterleave(self.offsets, 4, self.rows, groups, ids))
        return deinterleave(self.packed, 64, self.rows, self.cols // 2, ids), scales, minima

    def select(self, rows: slice, cols: slice) -> "Q4Matrix":
        """The block of rows x cols as a matrix of its own, bit for bit: a tensor-parallel shard.
        Columns go by whole groups of 32, so every weight keeps its scale and offset."""
        c0, c1, _ = cols.indices(self.cols)
        if c0 % GROUP or c1 % GROUP:
            raise ValueError(f"columns {c0}:{c1} do not fall on groups of {GROUP}")
        qs, scales, minima = self.row_major()
        g = slice(c0 // GROUP, c1 // GROUP)
        return Q4Matrix.from_rows(qs[rows, c0 // 2:c1 // 2], scales[rows, g], None if minima is None else minima[rows, g])

    def offsets_of(self, scales: np.ndarray, minima: np.ndarray | None) -> np.ndarray:
        """What is added to scale * nibble, per group: the minimum, or -8 * scale for Q4_0."""
        return np.float32(self.offset_factor) * (scales if minima is None else minima)

    def matmul(self, x: Q8Activations, out: np.ndarray) -> np.ndarray:
        """One vector (GEMV) or a batch of tokens (GEMM)."""
        return gemm(self, x, out) if x.lo.ndim == 2 else gemv(self, x, out)

    def kernel_args(self) -> tuple:
        """The matrix as the fused decode layer takes it (decode_layer.py)."""
        return 4, self.packed, self.scales, self.offsets, float(self.offset_factor)

    def dequantize(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Float32 values of all rows, or of the rows in `ids` (an embedding lookup), as GGUF's own
        dequantisation computes them: d * (q - 8) for Q4_0, scale * q + minimum otherwise."""
        qs, scales, minima = self.row_major(ids)
        b = qs.reshape(qs.shape[0], self.cols // GROUP, 16)
        q = np.concatenate([b & 15, b >> 4], axis=2).astype(np.float32)
        if minima is None:
            w = (q + np.float32(self.offset_factor)) * scales[:, :, None]
        else:
            w = q * scales[:, :, None] + minima[:, :, None] * np.float32(self.offset_factor)
        return w.reshape(qs.shape[0], self.cols)


@njit(inline="always")
def _dots(lo, hi, xl, xh):
    """One row's chunk (its low and high nibbles) against the activations: int32 dot products,
    group g's in lanes 4g..4g+3."""
    return dpbusd_nibbles(dpbusd_nibbles(zeros_i32(), lo, xl), hi, xh)


@njit(inline="always")
def _terms(rows, scale, offset, xlo, xhi, xscales, xsums, c, factor):
    """The 4 rows (their nibbles of chunk c, split low and high) x 4 groups against one token, lane
    4 * row + group: the group's term scale * x_scale * (nibbles . x) + offset * factor * x_sum. The
    integer dots are summed per group first, so the float work is one vector per 4 rows."""
    l0, h0, l1, h1, l2, h2, l3, h3 = rows
    xl, xh = load_i8(xlo, c * 64), load_i8(xhi, c * 64)
    dots = group_sums4(_dots(l0, h0, xl, xh), _dots(l1, h1, xl, xh), _dots(l2, h2, xl, xh), _dots(l3, h3, xl, xh))
    return fma(to_f32(dots), mul(scale, tile4(xscales, c * 4)), mul(offset, mul(tile4(xsums, c * 4), factor)))


@njit(inline="always")
def _nibbles(packed, w):
    """The chunk's 4 rows as (low, high) nibbles each."""
    n0, n1, n2, n3 = load_i8(packed, w), load_i8(packed, w + 64), load_i8(packed, w + 128), load_i8(packed, w + 192)
    return (lo_nibbles(n0), hi_nibbles(n0), lo_nibbles(n1), hi_nibbles(n1), lo_nibbles(n2), hi_nibbles(n2),
            lo_nibbles(n3), hi_nibbles(n3))


# Software prefetch this many 4-row chunk steps ahead: the matrices of a small model are short
# streams, and the hardware prefetcher ramps up too late on each (measured: a decode step's GEMVs
# 25% faster on one thread). Prefetches past an array's end are harmless hints.
PREFETCH_STEPS = 4


@njit(inline="always")
def _prefetch_ahead(packed, scales, offsets, w, s):
    ahead = w + PREFETCH_STEPS * ROWS * 64
    for line in range(ROWS):
        prefetch(packed, ahead + line * 64)
    prefetch(scales, s + PREFETCH_STEPS * ROWS * 4)
    prefetch(offsets, s + PREFETCH_STEPS * ROWS * 4)


@njit(inline="always")
def _block(packed, scales, offsets, factor, xlo, xhi, xscales, xsums, out, block, fetch=True):
    """Rows 4*block .. 4*block+3: one pass over the block's interleaved streams. The accumulator is
    float32, or fixed point when `out` is int64 (simd.py: the partial sums a cluster adds exactly)."""
    chunks = packed.shape[1] // (4 * 64)
    acc = accumulator(out)
    w, s = block * packed.shape[1], block * scales.shape[1]
    for c in range(chunks):
        if fetch:
            _prefetch_ahead(packed, scales, offsets, w, s)
        rows, scale, offset = _nibbles(packed, w), load_floats(scales, s), load_floats(offsets, s)
        acc = accumulate(acc, _terms(rows, scale, offset, xlo, xhi, xscales, xsums, c, factor))
        w += 256
        s += 16
    _store(out, block, acc)


@njit(inline="always")
def _block_pair(packed, scales, offsets, factor, xlo, xhi, xscales, xsums, out, block, t, fetch):
    """_block for tokens t and t + 1 at once: each chunk's nibbles and scales loaded once for both."""
    chunks = packed.shape[1] // (4 * 64)
    acc0, acc1 = accumulator(out[t]), accumulator(out[t + 1])
    w, s = block * packed.shape[1], block * scales.shape[1]
    for c in range(chunks):
        if fetch:
            _prefetch_ahead(packed, scales, offsets, w, s)
        rows, scale, offset = _nibbles(packed, w), load_floats(scales, s), load_floats(offsets, s)
        acc0 = accumulate(acc0, _terms(rows, scale, offset, xlo[t], xhi[t], xscales[t], xsums[t], c, factor))
        acc1 = accumulate(acc1, _terms(rows, scale, offset, xlo[t + 1], xhi[t + 1], xscales[t + 1], xsums[t + 1], c,
                                       factor))
        w += 256
        s += 16
    _store(out[t], block, acc0)
    _store(out[t + 1], block, acc1)


@njit(inline="always")
def _store(out, block, acc):
    r = block * ROWS
    for i in range(min(ROWS, out.shape[0] - r)):  # leaving out the padding rows past the end
        out[r + i] = quad_total(acc, i)


@njit(parallel=True, cache=True)
def _gemv_parallel(packed, scales, offsets, factor, xlo, xhi, xscales, xsums, out):
    f = splat(np.float32(factor))
    for block in prange(packed.shape[0]):
        _block(packed, scales, offsets, f, xlo, xhi, xscales, xsums, out, block)


@njit(cache=True)
def _gemv_serial(packed, scales, offsets, factor, xlo, xhi, xscales, xsums, out):
    f = splat(np.float32(factor))
    for block in range(packed.shape[0]):
        _block(packed, scales, offsets, f, xlo, xhi, xscales, xsums, out, block)


# Below this size a GEMV called on its own from Python runs on one core: the worker threads fall
# asleep between such calls, and waking them costs more than the matrix takes. The fused decode
# layer (decode_layer.py) runs every matrix in parallel: within one call its threads stay awake.
PARALLEL_MIN_BYTES = 4 << 20


@njit(parallel=True, cache=True)
def _gemm(packed, scales, offsets, factor, xlo, xhi, xscales, xsums, out):
    """out[t] = W x[t] for every token of a batch: each thread takes a 4-row block, whose weights
    come from memory once (prefetched for the first token only) and stay in L1 while the tokens pass,
    two at a time."""
    f = splat(np.float32(factor))
    tokens = xlo.shape[0]
    for block in prange(packed.shape[0]):
        for t in range(0, tokens - 1, 2):
            _block_pair(packed, scales, offsets, f, xlo, xhi, xscales, xsums, out, block, t, t == 0)
        if tokens % 2:
            t = tokens - 1
            _block(packed, scales, offsets, f, xlo[t], xhi[t], xscales[t], xsums[t], out[t], block, tokens == 1)


def _check(m: Q4Matrix, x: Q8Activations) -> None:
    if not has_kernels():  # the instructions would kill the process, not raise
        raise EdgeInferError("the 4-bit kernels need an x86 CPU with AVX2, FMA and F16C (or AVX-512 VNNI), or aarch64")
    if x.lo.shape[-1] * 2 != m.padded_cols:
        raise ValueError(f"activations of {x.lo.shape[-1] * 2} columns for a matrix of {m.padded_cols}")


def gemv(m: Q4Matrix, x: Q8Activations, out: np.ndarray, parallel: bool | None = None) -> np.ndarray:
    """out = W @ x, W 4-bit, x int8 (quantised by quantize_activations); on all threads when
    `parallel`, by default when the matrix is large enough to gain."""
    _check(m, x)
    parallel = m.nbytes >= PARALLEL_MIN_BYTES if parallel is None else parallel
    kernel = _gemv_parallel if parallel else _gemv_serial
    kernel(m.packed, m.scales, m.offsets, m.offset_factor, x.lo, x.hi, x.scales, x.sums, out)
    return out


def gemm(m: Q4Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out (tokens, rows) = x W^T for a batch quantised by quantize_activations."""
    _check(m, x)
    _gemm(m.packed, m.scales, m.offsets, m.offset_factor, x.lo, x.hi, x.scales, x.sums, out)
    return out


def gemv_reference(m: Q4Matrix, x: Q8Activations) -> np.ndarray:
    """The same computation in numpy: integer dot of nibbles and int8 per group, then the scales and
    the offset term with the group's activation sum."""
    qs, scales, minima = m.row_major()
    offsets = m.offsets_of(scales, minima)
    groups = m.cols // GROUP
    b = qs.reshape(m.rows, groups, 16)
    q = np.concatenate([b & 15, b >> 4], axis=2).astype(np.int64)
    dots = (q * x.int8()[None, :groups].astype(np.int64)).sum(axis=2)
    return (dots * scales.astype(np.float64) * x.scales[None, :groups] + offsets * x.sums[None, :groups]).sum(axis=1)
