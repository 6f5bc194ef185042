"""GGUF's quantised blocks as the kernels' matrices, losslessly: every weight keeps the very value
gguf's own dequantisation gives it (tests/test_gguf_quants.py checks each type).

Every type in scope is, per group of 32 or 16 weights, an integer times a scale plus a minimum:
    Q4_0, Q4_1, Q4_K                      4-bit nibbles -> q4.Q4Matrix (Q4_K: d * sc, -dmin * m)
    IQ4_NL, IQ4_XS                        4-bit nibbles indexing IQ4_VALUES -> q4.Q4Matrix (a lookup)
    Q5_0, Q5_1, Q5_K                      5 bits per 32 (signed, or with minima) -> q6.Q5Matrix
    Q6_K                                  6 bits per 16, signed -> q6.Q6Matrix
    Q3_K                                  3 bits per 16, signed -> q6.Q3Matrix
    Q8_0                                  signed bytes per 32 -> q8.Q8Matrix
    Q2_K                                  2 bits per 16, with minima -> q6.Q2Matrix
The K-quants (and IQ4_XS) keep their two-level scales, a 256-weight block's fp16 d times an integer
per group (kernels/scales.py: SuperScales; the minima likewise, with -dmin); the integers go to whole
bytes or fields of as many bits as in their files (q6.py). The 4-bit types' nibbles go as bytes in
q4.py's pairing (byte j of a group of 32: weights j and 16 + j), which Q4_0, Q4_1 and the IQ4s store
already and Q4_K's runs of 64 take four byte operations to reach: never widened to integers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from ..kernels.q4 import Q4Matrix
from ..kernels.scales import ROWS, SuperScales, concat_scales, super_scales
from .quantize import MATRIX_TYPES, Matrix

QK = 256  # weights per K-quant super-block
LOOKUP_TYPES = ("IQ4_NL", "IQ4_XS")  # their nibbles index q4.IQ4_VALUES
LAID_OUT_TYPES = ("Q5_0", "Q5_1")  # decoded to q6.py's 5-bit bytes (20 a group of 32), not integers

# A decoder: (blocks (n, bytes per block) uint8) -> (integers (n, weights per block), or for a
# 4-bit type its nibbles (n, weights per block / 2) as q4.py pairs them, or for LAID_OUT_TYPES the
# 5-bit layout's bytes (n, 20) as q6.py holds them; scales and minima (n,
# groups per block): float32, or SuperScales of d (n, 1) and the integers; minima None when the
# integers are signed).
Decoded = tuple[np.ndarray, np.ndarray | SuperScales, np.ndarray | SuperScales | None]


def _half(b: np.ndarray) -> np.ndarray:
    """fp16 values from pairs of bytes (n, 2 * k) -> (n, k) float32."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles_in_halves(qs: np.ndarray, width: int) -> np.ndarray:
    """(n, k * width / 2) bytes -> (n, k * width): per run of width/2 bytes, the low nibbles are
    weights 0..width/2-1 of a run of `width`, the high nibbles the rest (GGUF's usual order)."""
    runs = qs.reshape(qs.shape[0], -1, width // 2)
    return np.concatenate([runs & 15, runs >> 4], axis=2).reshape(qs.shape[0], -1)


def _bits(b: np.ndarray, width: int, count: int) -> np.ndarray:
    """Fields of `width` bits, `count` per byte, lowest first, each run of bytes spread over
    `count` runs: (n, k) -> (n, count * k), as the K-quants pack their low and high bits."""
    shifts = (np.arange(count, dtype=np.uint8) * width)[None, None, :, None]
    runs = b.reshape(b.shape[0], -1, 1, 32)
    return ((runs >> shifts) & ((1 << width) - 1)).reshape(b.shape[0], -1)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 8 six-bit scales and minima packed in 12 bytes."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _plane_bits() -> np.ndarray:
    """(4, 256) uint32: byte k of a Q5_0/Q5_1 block's high bits (weights 8k..8k+7), value v -> those
    bits where q6.py's 5-bit plane puts them: weight 16h + 4i + b's in bit 4h + i of byte b."""
    table = np.zeros((4, 256), np.uint32)
    for k in range(4):
        for t in range(8):
            j = 8 * k + t
            table[k, (np.arange(256) >> t) & 1 == 1] |= np.uint32(1 << (8 * (j % 4) + 4 * (j // 16) + (j % 16) // 4))
    return table


PLANE_BITS = _plane_bits()


def _q5_fields(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's nibbles (16 bytes: byte j holds weights j and 16 + j, as q4.py pairs them) and
    32 high bits -> q6.py's 5-bit bytes of the group: the nibbles, then the plane's 4 bytes."""
    plane = PLANE_BITS[0][qh[:, 0]] | PLANE_BITS[1][qh[:, 1]] | PLANE_BITS[2][qh[:, 2]] | PLANE_BITS[3][qh[:, 3]]
    return np.concatenate([qs, plane.view(np.uint8).reshape(-1, 4)], axis=1)


def _pairs_of_runs_64(qs: np.ndarray) -> np.ndarray:
    """Q4_K's nibbles, runs of 32 bytes whose low nibbles are weights 0..31 of a run of 64 and high
    nibbles 32..63, as q4.py pairs them: byte j of a group of 32 holds weights j and 16 + j."""
    r = qs.reshape(qs.shape[0], -1, 2, 16)
    low = (r[:, :, 0] & 15) | ((r[:, :, 1] & 15) << 4)
    high = (r[:, :, 0] >> 4) | (r[:, :, 1] & 0xF0)
    return np.stack([low, high], axis=2).reshape(qs.shape[0], -1)


def _q4_0(b: np.ndarray) -> Decoded:
    return b[:, 2:], _half(b[:, :2]), None


def _q4_1(b: np.ndarray) -> Decoded:
    return b[:, 4:], _half(b[:, :2]), _half(b[:, 2:4])


def _q8_0(b: np.ndarray) -> Decoded:
    return np.ascontiguousarray(b[:, 2:]).view(np.int8), _half(b[:, :2]), None


def _q5_0(b: np.ndarray) -> Decoded:  # the 5-bit layout's bytes: the integer + 16, as the file has it
    return _q5_fields(b[:, 6:], b[:, 2:6]), _half(b[:, :2]), None


def _q5_1(b: np.ndarray) -> Decoded:
    return _q5_fields(b[:, 8:], b[:, 4:8]), _half(b[:, :2]), _half(b[:, 2:4])


def _iq4_nl(b: np.ndarray) -> Decoded:  # nibbles: indices into IQ4_VALUES
    return b[:, 2:], _half(b[:, :2]), None


def _iq4_xs(b: np.ndarray) -> Decoded:
    d, high = _half(b[:, :2]), np.ascontiguousarray(b[:, 2:4]).view(np.uint16)
    low = _nibbles_in_halves(b[:, 4:8], 2)  # sub-block j's low 4 bits: byte j // 2, nibble j % 2
    ls = low.astype(np.int16) | (((high >> (2 * np.arange(8, dtype=np.uint16))[None, :]) & 3) << 4).astype(np.int16)
    return b[:, 8:], super_scales(d, ls - 32), None


def _q4_k(b: np.ndarray) -> Decoded:
    d, dmin = _half(b[:, 0:2]), _half(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    return _pairs_of_runs_64(b[:, 16:]), super_scales(d, sc), super_scales(-dmin, mn)


def _q5_k(b: np.ndarray) -> Decoded:
    d, dmin = _half(b[:, 0:2]), _half(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    high = _bits(b[:, 16:48], 1, 8).astype(np.int16) << 4
    return _nibbles_in_halves(b[:, 48:], 64).astype(np.int16) | high, super_scales(d, sc), super_scales(-dmin, mn)


def _q6_k(b: np.ndarray) -> Decoded:
    low = _nibbles_in_halves(b[:, :128], 128).astype(np.int16)
    high = _bits(b[:, 128:192], 2, 4).astype(np.int16) << 4
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8)
    return (low | high) - 32, super_scales(_half(b[:, 208:210]), scales), None


def _q3_k(b: np.ndarray) -> Decoded:
    low_bits, missing_high = _bits(b[:, 32:96], 2, 4).astype(np.int16), 1 - _bits(b[:, :32], 1, 8).astype(np.int16)
    s = b[:, 96:108]
    low = _nibbles_in_halves(s[:, :8], 16).astype(np.int16)  # scale j's low 4 bits: byte j % 8, nibble j // 8
    high = ((s[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3).reshape(-1, 16)  # byte j % 4
    scales = (low | (high.astype(np.int16) << 4)) - 32
    return low_bits - 4 * missing_high, super_scales(_half(b[:, 108:110]), scales), None


def _q2_k(b: np.ndarray) -> Decoded:
    s, d, dmin = b[:, :16], _half(b[:, 80:82]), _half(b[:, 82:84])
    q = _bits(b[:, 16:80], 2, 4).astype(np.int16)
    return q, super_scales(d, s & 15), super_scales(-dmin, s >> 4)


# type -> (weights per block, bytes per block, bits of the matrix it becomes, decoder)
DECODERS: dict[str, tuple[int, int, int, Callable[[np.ndarray], Decoded]]] = {
    "Q4_0": (32, 18, 4, _q4_0), "Q4_1": (32, 20, 4, _q4_1), "Q8_0": (32, 34, 8, _q8_0),
    "Q5_0": (32, 22, 5, _q5_0), "Q5_1": (32, 24, 5, _q5_1), "IQ4_NL": (32, 18, 4, _iq4_nl),
    "IQ4_XS": (QK, 136, 4, _iq4_xs), "Q4_K": (QK, 144, 4, _q4_k), "Q5_K": (QK, 176, 5, _q5_k),
    "Q6_K": (QK, 210, 6, _q6_k), "Q3_K": (QK, 110, 3, _q3_k), "Q2_K": (QK, 84, 2, _q2_k),
}
# Weights decoded at a time (whole 16-row blocks, at least one): decoding holds about 7 bytes of
# temporaries a weight (int16 integers, their parts, the packing's copies), which the load's peak
# carries. 2048 rows of SmolLM2 (1.2M weights) put 8 MB on its K-quant files' peak; the smaller
# slabs made a whole file's conversion 5-15% slower there (measured), some 20 us a slab.
SLAB_WEIGHTS = 1 << 16


def decode_rows(kind: str, data: np.ndarray, cols: int) -> Decoded:
    """Rows of GGUF blocks (rows, bytes per row) -> (integers (rows, cols), or a 4-bit type's nibbles
    (rows, cols / 2), scales, minima (rows, groups))."""
    per_block, size, _, decoder = DECODERS[kind]
    rows = data.shape[0]
    values, scales, minima = decoder(np.asarray(data, np.uint8).reshape(-1, size))
    blocks = cols // per_block

    def by_row(s):
        if isinstance(s, SuperScales):
            return SuperScales(s.d.reshape(rows, blocks), s.q.reshape(rows, -1), s.shift)
        return s.reshape(rows, -1)
    return values.reshape(rows, -1), by_row(scales), None if minima is None else by_row(minima)


def gguf_matrix(kind: str, data, cols: int) -> Matrix:
    """A GGUF tensor of a type in DECODERS as the kernels' matrix, decoded a slab of rows at a time
    (whole 16-row blocks), each slab's blocks copied into the matrix's one array as they come: the
    slabs are never held all at once beside it (a 128k-row head would be held twice at load).
    `data`: the blocks (rows, bytes per row), an array or anything that reads a run of its rows when
    sliced (gguf.FileRows: then only a slab of the file is ever in the process beside the matrix)."""
    bits, rows = DECODERS[kind][2], data.shape[0]
    step = max(ROWS, SLAB_WEIGHTS // cols // ROWS * ROWS)
    packed, slabs = None, []
    for r in range(0, rows, step):
        values, scales, minima = decode_rows(kind, data[r:r + step], cols)
        if bits == 4:
            slab = Q4Matrix.from_rows(values, scales, minima, lookup=kind in LOOKUP_TYPES)
        elif kind in LAID_OUT_TYPES:
            slab = MATRIX_TYPES[bits].from_fields(values.reshape(values.shape[0], -1, 20), scales, minima, cols)
        else:
            slab = MATRIX_TYPES[bits].from_values(values, scales, minima)
        if rows <= step:
            return slab
        if packed is None:
            packed = np.empty((-(-rows // ROWS), slab.packed.shape[1]), slab.packed.dtype)
        packed[r // ROWS:r // ROWS + slab.packed.shape[0]] = slab.packed
        slabs.append(replace(slab, packed=None))  # its scales kept, to be joined
    first = slabs[0]
    scales = concat_scales([s.scales for s in slabs])
    offsets = scales if first.offsets is first.scales else concat_scales([s.offsets for s in slabs])
    return type(first)(packed, scales, offsets, first.offset_factor, rows, cols)
