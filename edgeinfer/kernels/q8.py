"""8-bit weights (GGUF Q8_0 groups, rows interleaved by 4) and their GEMV, AVX-512 VNNI.

Group: 32 int8 weights and an fp16 scale (uint16 bits, as in q4.py). They are stored offset by +128 as unsigned bytes, since
vpdpbusd multiplies unsigned by signed bytes; w = scale * (byte - 128), so the -128 * scale term is
the same per-group offset term the 4-bit kernel has, with factor -128. A 64-byte load is 2 groups of
one row (8 lanes each); rows are interleaved by 4 as in q4.py. Used for the output head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import EdgeInferError
from .activations import CHUNK, GROUP, Q8Activations
from .q4 import PREFETCH_STEPS, deinterleave, from_half_bits, interleave
from .simd import (begin, dpbusd, expand2, finish2, fma, has_kernels, load_i8, mul, prefetch, row_accumulator, splat,
                   to_f32, total, zeros_i32)

ROWS = 4
WEIGHTS_PER_LOAD = 64
PARALLEL_MIN_BYTES = 4 << 20  # as in q4.py: below this, waking threads costs more than it saves


@dataclass(frozen=True)
class Q8Matrix:
    packed: np.ndarray  # (blocks, chunks * ROWS * 64) uint8, weight + 128
    scales: np.ndarray  # (blocks, chunks * ROWS * 2) fp16 bits (uint16)
    rows: int
    cols: int
    bits = 8

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    @classmethod
    def from_gguf(cls, blocks: np.ndarray, cols: int) -> "Q8Matrix":
        """From GGUF Q8_0 blocks (fp16 scale, 32 int8) of shape (rows, cols/32 * 34). Lossless."""
        if cols % GROUP:
            raise ValueError(f"{cols} columns: 8-bit rows need a multiple of {GROUP}")
        b = np.asarray(blocks, dtype=np.uint8).reshape(-1, cols // GROUP, 34)
        rows = b.shape[0]
        scales = b[:, :, :2].copy().view(np.uint16)[..., 0]
        weights = (b[:, :, 2:].reshape(rows, cols) ^ 0x80).astype(np.uint8)  # int8 + 128 as unsigned
        return cls.from_parts(weights, scales)

    @classmethod
    def from_parts(cls, weights: np.ndarray, scales: np.ndarray) -> "Q8Matrix":
        """From row-major weights + 128 (rows, cols) uint8 and fp16 scale bits (rows, cols/32)."""
        (rows, cols) = weights.shape
        chunks, rows_padded = -(-cols // WEIGHTS_PER_LOAD), -(-rows // ROWS) * ROWS
        return cls(interleave(weights, 64, rows_padded, chunks), interleave(scales, 2, rows_padded, chunks),
                   rows, cols)

    def select(self, rows: slice, cols: slice) -> "Q8Matrix":
        """The block of rows x cols as a matrix of its own, bit for bit (columns by whole groups)."""
        c0, c1, _ = cols.indices(self.cols)
        if c0 % GROUP or c1 % GROUP:
            raise ValueError(f"columns {c0}:{c1} do not fall on groups of {GROUP}")
        weights = deinterleave(self.packed, 64, self.rows, self.cols)[rows, c0:c1]
        scales = deinterleave(self.scales, 2, self.rows, self.cols // GROUP)[rows, c0 // GROUP:c1 // GROUP]
        return Q8Matrix.from_parts(weights, scales)

    def matmul(self, x: Q8Activations, out: np.ndarray) -> np.ndarray:
        """One vector (GEMV) or a batch of tokens (GEMM)."""
        return gemm8(self, x, out) if x.flat.ndim == 2 else gemv8(self, x, out)

    def kernel_args(self) -> tuple:
        """The matrix as the fused decode layer takes it (decode_layer.py): no offsets of its own."""
        return 8, self.packed, self.scales, self.scales, 0.0

    def row_major(self, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(int8 weights as int16, scales (rows, cols/32)) of all rows or of `ids`, undoing the interleave."""
        w = deinterleave(self.packed, 64, self.rows, self.cols, ids).astype(np.int16) - 128
        return w, from_half_bits(deinterleave(self.scales, 2, self.rows, self.cols // GROUP, ids))

    def dequantize(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Float32 values of all rows, or of the rows in `ids` (an embedding lookup)."""
        w, scales = self.row_major(ids)
        return (w.reshape(w.shape[0], -1, GROUP) * scales[:, :, None]).reshape(w.shape[0], self.cols).astype(np.float32)


@njit(inline="always")
def _chunk(packed, scales, w, s, x, dx, osum, acc):
    sums = dpbusd(zeros_i32(), load_i8(packed, w), x)
    scale = expand2(scales, s)
    return finish2(acc, fma(scale, osum, fma(to_f32(sums), mul(scale, dx), begin(acc))))


@njit(inline="always")
def _block(packed, scales, eighth, xflat, xscales, xsums, out, block):
    chunks = packed.shape[1] // (ROWS * 64)
    a0 = a1 = a2 = a3 = row_accumulator(out)
    w, s = block * packed.shape[1], block * scales.shape[1]
    for c in range(chunks):
        ahead = w + PREFETCH_STEPS * ROWS * 64  # as in q4.py
        for line in range(ROWS):
            prefetch(packed, ahead + line * 64)
        prefetch(scales, s + PREFETCH_STEPS * ROWS * 2)
        x = load_i8(xflat, c * 64)
        dx = expand2(xscales, c * 2)
        osum = mul(expand2(xsums, c * 2), eighth)
        a0 = _chunk(packed, scales, w, s, x, dx, osum, a0)
        a1 = _chunk(packed, scales, w + 64, s + 2, x, dx, osum, a1)
        a2 = _chunk(packed, scales, w + 128, s + 4, x, dx, osum, a2)
        a3 = _chunk(packed, scales, w + 192, s + 6, x, dx, osum, a3)
        w += 256
        s += 8
    store_block(out, block, a0, a1, a2, a3)


@njit(inline="always")
def store_block(out, block, a0, a1, a2, a3):
    """The block's 4 row sums into `out`, leaving out the padding rows past its end."""
    r = block * ROWS
    out[r] = total(a0)
    if r + 1 < out.shape[0]:
        out[r + 1] = total(a1)
    if r + 2 < out.shape[0]:
        out[r + 2] = total(a2)
    if r + 3 < out.shape[0]:
        out[r + 3] = total(a3)


@njit(parallel=True, cache=True)
def _gemv_parallel(packed, scales, xflat, xscales, xsums, out):
    eighth = splat(np.float32(-128 / 8))  # the -128 * scale offset, spread over a group's 8 lanes
    for block in prange(packed.shape[0]):
        _block(packed, scales, eighth, xflat, xscales, xsums, out, block)


@njit(cache=True)
def _gemv_serial(packed, scales, xflat, xscales, xsums, out):
    eighth = splat(np.float32(-128 / 8))
    for block in range(packed.shape[0]):
        _block(packed, scales, eighth, xflat, xscales, xsums, out, block)


@njit(parallel=True, cache=True)
def _gemm(packed, scales, xflat, xscales, xsums, out):
    """out[t] = W x[t] for every token of a batch, each 4-row block read once (as in q4.py)."""
    eighth = splat(np.float32(-128 / 8))
    for block in prange(packed.shape[0]):
        for t in range(xflat.shape[0]):
            _block(packed, scales, eighth, xflat[t], xscales[t], xsums[t], out[t], block)


def _check(m: Q8Matrix, x: Q8Activations) -> None:
    if not has_kernels():
        raise EdgeInferError("the 8-bit kernels need AVX-512 VNNI, or AVX2 with FMA and F16C")
    if x.flat.shape[-1] != -(-m.cols // CHUNK) * CHUNK:  # activations are padded to whole 128-wide chunks
        raise ValueError(f"activations of {x.flat.shape[-1]} columns for a matrix of {m.cols}")


def gemv8(m: Q8Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out = W @ x, W 8-bit, x int8 (quantised by quantize_activations)."""
    _check(m, x)
    kernel = _gemv_parallel if m.nbytes >= PARALLEL_MIN_BYTES else _gemv_serial
    kernel(m.packed, m.scales, x.flat, x.scales, x.sums, out)
    return out


def gemm8(m: Q8Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out (tokens, rows) = x W^T for a batch quantised by quantize_activations."""
    _check(m, x)
    _gemm(m.packed, m.scales, x.flat, x.scales, x.sums, out)
    return out


def gemv8_reference(m: Q8Matrix, x: Q8Activations) -> np.ndarray:
    """The same computation in numpy: integer dot per group, then both scales."""
    w, scales = m.row_major()
    groups = m.cols // GROUP
    dots = (w.reshape(m.rows, groups, GROUP).astype(np.int64) * x.int8()[None, :groups].astype(np.int64)).sum(axis=2)
    return (dots * scales.astype(np.float64) * x.scales[None, :groups]).sum(axis=1)
