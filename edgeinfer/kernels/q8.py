"""8-bit weights (GGUF Q8_0, and the 5/6/3/2-bit and IQ4 types laid out losslessly as bytes), rows
interleaved by 4, and their GEMV with int8 activations (AVX-512 VNNI, or AVX2).

A weight is a byte b (0..255) in a group of 32 or 16 weights with a scale and an offset:
w = scale * b + factor * offset. Types whose integers are signed (Q8_0: -127..127; Q5_0, Q6_K,
Q3_K, IQ4_NL, IQ4_XS) store them + 128, the offset is the scale itself and the factor -128, so
w = scale * (b - 128) and no offset is stored; types with a minimum (Q5_1, Q5_K, Q2_K) store the
unsigned integer, the minimum as the offset and factor 1. Scales and minima are fp16 bits when fp16
holds them exactly, else float32 (q4.stored_scales). A 64-byte load is one row's 64 weights (2
groups of 32 or 4 of 16); rows are interleaved by 4: each chunk of 64 columns holds the 4 rows'
64 bytes side by side.

vpdpbusd multiplies unsigned by signed bytes and sums 4 per i32 lane; the 4 rows'
integer dots are summed per group of 16 first, so one 16-lane vector holds 4 rows x 4 groups (lane
4 * row + group) and the float work is one FMA for the 4 rows (a group of 32 is two such groups with
the same scale). The offset term takes the activations' sum over each group of 16, which the
activations carry (activations.py: `halves`):
    term = scale * x_scale * (b . x) + offset * factor * x_scale * (1 . x)
A GEMM runs the same block for two tokens at a time while the block's weights stay in L1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import EdgeInferError
from .activations import CHUNK, GROUP, Q8Activations
from .q4 import deinterleave, interleave, scale_values, stored_scales
from .simd import (accumulate, accumulator, dpbusd, expand8, fma, group_sums4, has_kernels, load_floats, load_i8, mul,
                   pairs_tiled, prefetch, quad_total, splat, tile4, to_f32, zeros_i32)

ROWS = 4
WEIGHTS_PER_LOAD = 64
PREFETCH_STEPS = 4  # chunk steps ahead (as q4.py's group steps: a small model's short streams)
PARALLEL_MIN_BYTES = 4 << 20  # as in q4.py: below this, waking threads costs more than it saves
SIGNED_FACTOR = -128.0  # bytes holding int8 + 128


@dataclass(frozen=True)
class Q8Matrix:
    packed: np.ndarray  # (blocks, chunks * ROWS * 64) uint8
    scales: np.ndarray  # (blocks, chunks * ROWS * groups per load) fp16 bits (uint16) or float32
    offsets: np.ndarray  # minima laid out as scales, or the scales array itself (signed bytes)
    offset_factor: float  # -128 (signed bytes) or 1 (minima)
    rows: int
    cols: int
    bits = 8

    @property
    def group(self) -> int:
        """Weights per scale: 32 or 16."""
        loads = self.packed.shape[1] // 64
        return WEIGHTS_PER_LOAD * loads // self.scales.shape[1] if loads else GROUP

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is self.scales else self.offsets.nbytes
        return self.packed.nbytes + self.scales.nbytes + extra

    @classmethod
    def from_values(cls, values: np.ndarray, scales: np.ndarray, minima: np.ndarray | None = None) -> "Q8Matrix":
        """From integers (rows, cols) and per-group scales (rows, cols/group, group 32 or 16): signed
        integers (-128..127) without minima, w = scale * value; unsigned (0..255) with them,
        w = scale * value + minimum."""
        rows, cols = values.shape
        group = cols // scales.shape[1] if scales.shape[1] else GROUP
        if cols % GROUP or group not in (16, 32):
            raise ValueError(f"{cols} columns in groups of {group}: 8-bit rows need whole groups of 32 or 16")
        bytes_ = (values.astype(np.int16) + 128 if minima is None else values).astype(np.uint8)
        chunks, rows_padded, per = -(-cols // WEIGHTS_PER_LOAD), -(-rows // ROWS) * ROWS, WEIGHTS_PER_LOAD // group
        sc = interleave(stored_scales(scales), per, rows_padded, chunks, ROWS)
        offsets = sc if minima is None else interleave(stored_scales(minima), per, rows_padded, chunks, ROWS)
        return cls(interleave(bytes_, 64, rows_padded, chunks, ROWS), sc, offsets,
                   SIGNED_FACTOR if minima is None else 1.0, rows, cols)

    @staticmethod
    def array_shapes(rows: int, cols: int, group: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of `packed` and of `scales` (and minima) for a rows x cols matrix in groups of `group`."""
        blocks, chunks = -(-rows // ROWS), -(-cols // WEIGHTS_PER_LOAD)
        return (blocks, chunks * ROWS * 64), (blocks, chunks * ROWS * WEIGHTS_PER_LOAD // group)

    def row_major(self, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(integers as int16 (rows, cols), scales and minima (rows, cols/group) as float32) of all
        rows or of `ids`, undoing the interleave; minima None for signed integers."""
        per, groups = WEIGHTS_PER_LOAD // self.group, self.cols // self.group
        values = deinterleave(self.packed, 64, self.rows, self.cols, ROWS, ids).astype(np.int16)
        scales = scale_values(deinterleave(self.scales, per, self.rows, groups, ROWS, ids))
        if self.offsets is self.scales:
            return values - 128, scales, None
        return values, scales, scale_values(deinterleave(self.offsets, per, self.rows, groups, ROWS, ids))

    def select(self, rows: slice, cols: slice) -> "Q8Matrix":
        """The block of rows x cols as a matrix of its own, bit for bit (columns by whole groups)."""
        c0, c1, _ = cols.indices(self.cols)
        if c0 % GROUP or c1 % GROUP:
            raise ValueError(f"columns {c0}:{c1} do not fall on groups of {GROUP}")
        values, scales, minima = self.row_major()
        g = slice(c0 // self.group, c1 // self.group)
        return Q8Matrix.from_values(values[rows, c0:c1], scales[rows, g], None if minima is None else minima[rows, g])

    def matmul(self, x: Q8Activations, out: np.ndarray) -> np.ndarray:
        """One vector (GEMV) or a batch of tokens (GEMM)."""
        return gemm8(self, x, out) if x.flat.ndim == 2 else gemv8(self, x, out)

    def kernel_args(self) -> tuple:
        """The matrix as the fused decode layer takes it (decode_layer.py)."""
        return 8, self.packed, self.scales, self.offsets, float(self.offset_factor)

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
def _group_values(arr, s, per_load):
    """A chunk's scales (or minima) over lanes 4 * row + j, j its 4 groups of 16 weights: per 16,
    or per 32 (each over two lanes)."""
    if per_load == 2:
        return expand8(arr, s)
    return load_floats(arr, s)


@njit(inline="always")
def _terms(w0, w1, w2, w3, scale, offset, xflat, xscales, xhalves, c, factor):
    """The 4 rows (w0..w3: their 64 bytes of chunk c) x 4 groups of 16 against one token, lane
    4 * row + group: the integer dots summed per group first, so the float work is
    one vector per 4 rows."""
    x = load_i8(xflat, c * 64)
    dx = pairs_tiled(xscales, c * 2)  # each group of 16's activation scale (its group of 32's)
    dots = group_sums4(dpbusd(zeros_i32(), w0, x), dpbusd(zeros_i32(), w1, x), dpbusd(zeros_i32(), w2, x),
                       dpbusd(zeros_i32(), w3, x))
    return fma(to_f32(dots), mul(scale, dx), mul(offset, mul(tile4(xhalves, c * 4), factor)))


@njit(inline="always")
def _prefetch_ahead(packed, scales, offsets, w, s, per_load):
    ahead = w + PREFETCH_STEPS * ROWS * 64
    for line in range(ROWS):
        prefetch(packed, ahead + line * 64)
    prefetch(scales, s + PREFETCH_STEPS * ROWS * per_load)
    prefetch(offsets, s + PREFETCH_STEPS * ROWS * per_load)


@njit(inline="always")
def _block(packed, scales, offsets, factor, xflat, xscales, xhalves, out, block, fetch=True):
    """Rows 4*block .. 4*block+3 for one token, float32 or fixed-point accumulator (simd.py)."""
    loads = packed.shape[1] // 64
    chunks, per_load = loads // ROWS, scales.shape[1] // max(loads, 1)
    acc = accumulator(out)
    w, s = block * packed.shape[1], block * scales.shape[1]
    for c in range(chunks):
        if fetch:
            _prefetch_ahead(packed, scales, offsets, w, s, per_load)
        scale, offset = _group_values(scales, s, per_load), _group_values(offsets, s, per_load)
        acc = accumulate(acc, _terms(load_i8(packed, w), load_i8(packed, w + 64), load_i8(packed, w + 128),
                                     load_i8(packed, w + 192), scale, offset, xflat, xscales, xhalves, c, factor))
        w += 256
        s += 4 * per_load
    _store(out, block, acc)


@njit(inline="always")
def _block_pair(packed, scales, offsets, factor, xflat, xscales, xhalves, out, block, t, fetch):
    """_block for tokens t and t + 1 at once: each chunk's weights and scales loaded once for both."""
    loads = packed.shape[1] // 64
    chunks, per_load = loads // ROWS, scales.shape[1] // max(loads, 1)
    acc0, acc1 = accumulator(out[t]), accumulator(out[t + 1])
    w, s = block * packed.shape[1], block * scales.shape[1]
    for c in range(chunks):
        if fetch:
            _prefetch_ahead(packed, scales, offsets, w, s, per_load)
        scale, offset = _group_values(scales, s, per_load), _group_values(offsets, s, per_load)
        w0, w1, w2, w3 = load_i8(packed, w), load_i8(packed, w + 64), load_i8(packed, w + 128), load_i8(packed, w + 192)
        acc0 = accumulate(acc0, _terms(w0, w1, w2, w3, scale, offset, xflat[t], xscales[t], xhalves[t], c, factor))
        acc1 = accumulate(acc1, _terms(w0, w1, w2, w3, scale, offset, xflat[t + 1], xscales[t + 1], xhalves[t + 1],
                                       c, factor))
        w += 256
        s += 4 * per_load
    _store(out[t], block, acc0)
    _store(out[t + 1], block, acc1)


@njit(inline="always")
def _store(out, block, acc):
    r = block * ROWS
    for i in range(min(ROWS, out.shape[0] - r)):  # leaving out the padding rows past the end
        out[r + i] = quad_total(acc, i)


@njit(parallel=True, cache=True)
def _gemv_parallel(packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    f = splat(np.float32(factor))
    for block in prange(packed.shape[0]):
        _block(packed, scales, offsets, f, xflat, xscales, xhalves, out, block)


@njit(cache=True)
def _gemv_serial(packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    f = splat(np.float32(factor))
    for block in range(packed.shape[0]):
        _block(packed, scales, offsets, f, xflat, xscales, xhalves, out, block)


@njit(parallel=True, cache=True)
def _gemm(packed, scales, offsets, factor, xflat, xscales, xhalves, out):
    """out[t] = W x[t] for every token of a batch, each 4-row block read once, two
    tokens per pass over it."""
    f = splat(np.float32(factor))
    tokens = xflat.shape[0]
    for block in prange(packed.shape[0]):
        for t in range(0, tokens - 1, 2):
            _block_pair(packed, scales, offsets, f, xflat, xscales, xhalves, out, block, t, t == 0)
        if tokens % 2:
            _block(packed, scales, offsets, f, xflat[tokens - 1], xscales[tokens - 1], xhalves[tokens - 1],
                   out[tokens - 1], block, tokens == 1)


def _check(m: Q8Matrix, x: Q8Activations) -> None:
    if not has_kernels():
        raise EdgeInferError("the 8-bit kernels need an x86 CPU with AVX2, FMA and F16C (or AVX-512 VNNI), or aarch64")
    if x.flat.shape[-1] != -(-m.cols // CHUNK) * CHUNK:  # activations are padded to whole 128-wide chunks
        raise ValueError(f"activations of {x.flat.shape[-1]} columns for a matrix of {m.cols}")


def gemv8(m: Q8Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out = W @ x, W 8-bit, x int8 (quantised by quantize_activations)."""
    _check(m, x)
    kernel = _gemv_parallel if m.nbytes >= PARALLEL_MIN_BYTES else _gemv_serial
    kernel(m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.halves, out)
    return out


def gemm8(m: Q8Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out (tokens, rows) = x W^T for a batch quantised by quantize_activations."""
    _check(m, x)
    _gemm(m.packed, m.scales, m.offsets, m.offset_factor, x.flat, x.scales, x.halves, out)
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
