"""4-bit weights (Q4_0 groups, rows interleaved by 4) and the decode GEMV with int8 activations.

Group layout: 32 weights in 16 bytes, low nibbles weights 0..15, high nibbles 16..31 (GGUF Q4_0's
own order, so its import only moves bytes); w = scale * (nibble - 8), scales in float32.

Row layout: rows go in blocks of 4 (padded with zero-scale rows); within a block, for each chunk of
128 weights, the 4 rows' 64 bytes lie next to each other, and so do their 4 x 4 scales. A 4-row
step thus reads one sequential stream of weights and one of scales (as llama.cpp's repacking does).

Kernel (AVX-512 VNNI): one 64-byte load is 4 groups of one row; vpdpbusd sums 4 bytes per i32 lane,
so lanes 4g..4g+3 hold group g's low nibbles and, after a second vpdpbusd, its high ones. Lanes start
at the -8*sum(x) correction; the group sums are converted once and scaled in one FMA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..errors import EdgeInferError
from .simd import dpbusd, expand4, fma, hi_nibbles, hsum, load_f32, load_i8, load_i32, lo_nibbles, mul, to_f32, zeros_f32
from .simd import has_avx512_vnni

GROUP = 32
CHUNK = 128  # weights per 64-byte load


ROWS = 4  # rows interleaved per block


@dataclass(frozen=True)
class Q4Matrix:
    packed: np.ndarray  # (blocks, chunks * ROWS * 64) uint8
    scales: np.ndarray  # (blocks, chunks * ROWS * 4) float32
    rows: int
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    @classmethod
    def from_rows(cls, qs: np.ndarray, scales: np.ndarray) -> "Q4Matrix":
        """From row-major nibbles (rows, cols/2) and scales (rows, cols/32)."""
        rows, cols = qs.shape[0], qs.shape[1] * 2
        if cols % CHUNK:
            raise ValueError(f"{cols} columns: the kernel needs a multiple of {CHUNK}")
        pad = -rows % ROWS
        qs = np.concatenate([qs, np.zeros((pad, qs.shape[1]), np.uint8)])
        scales = np.concatenate([scales.astype(np.float32), np.zeros((pad, scales.shape[1]), np.float32)])
        blocks, chunks = qs.shape[0] // ROWS, cols // CHUNK
        packed = qs.reshape(blocks, ROWS, chunks, 64).transpose(0, 2, 1, 3).reshape(blocks, -1)
        scales = scales.reshape(blocks, ROWS, chunks, 4).transpose(0, 2, 1, 3).reshape(blocks, -1)
        return cls(np.ascontiguousarray(packed), np.ascontiguousarray(scales), rows, cols)

    @classmethod
    def from_gguf_q4_0(cls, blocks: np.ndarray, cols: int) -> "Q4Matrix":
        """From GGUF Q4_0 bytes, (rows, cols/32 * 18): fp16 scale then 16 nibble bytes per group. Lossless."""
        if cols % CHUNK:
            raise ValueError(f"{cols} columns: the kernel needs a multiple of {CHUNK}")
        b = np.asarray(blocks, dtype=np.uint8).reshape(-1, cols // GROUP, 18)
        scales = b[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)
        return cls.from_rows(np.ascontiguousarray(b[:, :, 2:]).reshape(b.shape[0], -1), scales)

    def row_major(self) -> tuple[np.ndarray, np.ndarray]:
        """(nibbles (rows, cols/2), scales (rows, cols/32)), undoing the interleave."""
        blocks, chunks = self.packed.shape[0], self.cols // CHUNK
        qs = self.packed.reshape(blocks, chunks, ROWS, 64).transpose(0, 2, 1, 3).reshape(blocks * ROWS, -1)
        sc = self.scales.reshape(blocks, chunks, ROWS, 4).transpose(0, 2, 1, 3).reshape(blocks * ROWS, -1)
        return qs[:self.rows], sc[:self.rows]

    def dequantize(self) -> np.ndarray:
        qs, scales = self.row_major()
        b = qs.reshape(self.rows, self.cols // GROUP, 16)
        q = np.concatenate([b & 15, b >> 4], axis=2).astype(np.float32) - 8
        return (q * scales[:, :, None]).reshape(self.rows, self.cols)


@dataclass(frozen=True)
class Q8Activations:
    """A vector quantised to int8 per group of 32, split to pair with the low and high nibbles."""

    lo: np.ndarray  # int8, group-major: x[g*32 + 0..15]
    hi: np.ndarray  # int8: x[g*32 + 16..31]
    correction: np.ndarray  # int32, 4 lanes a group: -8 * sum(q) in the first, 0 in the others
    scales4: np.ndarray  # float32, each group's scale repeated over its 4 lanes
    q: np.ndarray  # (groups, 32) int8, for the reference
    scales: np.ndarray  # (groups,) float32


def quantize_activations(x: np.ndarray) -> Q8Activations:
    g = np.asarray(x, dtype=np.float32).reshape(-1, GROUP)
    d = np.abs(g).max(axis=1) / 127
    d[d == 0] = 1
    q = np.round(g / d[:, None]).astype(np.int8)
    correction = np.zeros(len(d) * 4, np.int32)
    correction[::4] = -8 * q.astype(np.int32).sum(axis=1)
    return Q8Activations(np.ascontiguousarray(q[:, :16]).reshape(-1), np.ascontiguousarray(q[:, 16:]).reshape(-1),
                         correction, np.repeat(d, 4).astype(np.float32), q, d.astype(np.float32))


@njit(inline="always")
def _chunk(qs, scales, w_off, s_off, xl, xh, cv, dx, acc):
    w = load_i8(qs, w_off)
    sums = dpbusd(dpbusd(cv, lo_nibbles(w), xl), hi_nibbles(w), xh)
    return fma(to_f32(sums), mul(expand4(scales, s_off), dx), acc)


@njit(parallel=True, cache=True)
def _gemv(packed, scales, xlo, xhi, corr, dxe, out):
    rows = out.shape[0]
    chunks = packed.shape[1] // (4 * 64)
    for block in prange(packed.shape[0]):
        a0, a1, a2, a3 = zeros_f32(), zeros_f32(), zeros_f32(), zeros_f32()
        w, s = block * packed.shape[1], block * scales.shape[1]  # this block's two streams
        for c in range(chunks):
            xl, xh = load_i8(xlo, c * 64), load_i8(xhi, c * 64)
            cv, dx = load_i32(corr, c * 16), load_f32(dxe, c * 16)
            a0 = _chunk(packed, scales, w, s, xl, xh, cv, dx, a0)
            a1 = _chunk(packed, scales, w + 64, s + 4, xl, xh, cv, dx, a1)
            a2 = _chunk(packed, scales, w + 128, s + 8, xl, xh, cv, dx, a2)
            a3 = _chunk(packed, scales, w + 192, s + 12, xl, xh, cv, dx, a3)
            w += 256
            s += 16
        r = block * 4
        out[r] = hsum(a0)
        if r + 1 < rows:
            out[r + 1] = hsum(a1)
        if r + 2 < rows:
            out[r + 2] = hsum(a2)
        if r + 3 < rows:
            out[r + 3] = hsum(a3)


def gemv(m: Q4Matrix, x: Q8Activations, out: np.ndarray) -> np.ndarray:
    """out = W @ x, W 4-bit, x int8 (quantised by quantize_activations)."""
    if not has_avx512_vnni():  # the instructions would kill the process, not raise
        raise EdgeInferError("this CPU lacks AVX-512 VNNI, and the portable 4-bit kernel is not written yet")
    _gemv(m.packed, m.scales, x.lo, x.hi, x.correction, x.scales4, out)
    return out


def gemv_reference(m: Q4Matrix, x: Q8Activations) -> np.ndarray:
    """The same integer computation in numpy: per-group integer dot, then both scales."""
    rows, cols = m.shape
    qs, scales = m.row_major()
    b = qs.reshape(rows, cols // GROUP, 16)
    w = np.concatenate([b & 15, b >> 4], axis=2).astype(np.int64) - 8
    dots = (w * x.q[None].astype(np.int64)).sum(axis=2)
    return (dots * (scales.astype(np.float64) * x.scales[None])).sum(axis=1)
