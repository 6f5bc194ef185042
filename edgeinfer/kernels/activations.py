"""Activations quantised to int8 per group of 32, once per token, into buffers made once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .simd import abs_max, div, hsum, load_f32, roundeven, splat, store_rounded_i8

GROUP = 32
CHUNK = 128  # the widest weight chunk (4-bit: 128 weights per 64-byte load); vectors pad to it


@dataclass(frozen=True)
class Q8Activations:
    """A vector quantised to int8 per group of 32 (zero-padded to whole chunks). Preallocated once
    per width and refilled for every token."""

    flat: np.ndarray  # int8 in natural order
    scales: np.ndarray  # (groups,) float32
    sums: np.ndarray  # (groups,) float32: scale * sum of the group's int8 values
    halves: np.ndarray  # (2 * groups,) float32: the same per 16 values (8-bit weights' groups of 16)
    starts: np.ndarray  # (groups,) int32: -8 * the sum of the group's int8 values, where a Q4_0 dot product starts

    @classmethod
    def empty(cls, cols: int, tokens: int | None = None) -> "Q8Activations":
        """For one vector, or (with `tokens`) for a batch: every array gains a leading token axis."""
        groups = -(-cols // CHUNK) * CHUNK // GROUP
        lead = () if tokens is None else (tokens,)
        return cls(np.zeros(lead + (groups * 32,), np.int8), np.zeros(lead + (groups,), np.float32),
                   np.zeros(lead + (groups,), np.float32), np.zeros(lead + (2 * groups,), np.float32),
                   np.zeros(lead + (groups,), np.int32))

    def int8(self) -> np.ndarray:
        """(groups, 32) int8 values of one vector, for the reference."""
        return self.flat.reshape(-1, GROUP)


@njit(cache=True)
def _quantize(x, flat, scales, sums, halves, starts):
    """Per group of 32: d = max |x| / 127 (1 for zeros), q = round(x / d) to nearest even. Whole
    groups 16 lanes at a time (the same divisions and roundings, so the same bits: a prompt's
    quantising took 3% of a 1B prefill one value at a time), the last part of one value by value."""
    whole = x.shape[0] // GROUP
    for g in range(whole):
        lo, hi = load_f32(x, g * GROUP), load_f32(x, g * GROUP + 16)
        amax = abs_max(lo, hi)
        d = amax / np.float32(127) if amax > 0 else np.float32(1)
        lo, hi = roundeven(div(lo, splat(d))), roundeven(div(hi, splat(d)))
        store_rounded_i8(flat, g * GROUP, lo)
        store_rounded_i8(flat, g * GROUP + 16, hi)
        first, second = int(hsum(lo)), int(hsum(hi))  # sums of integers below 2**12: exact in any order
        _group_sums(g, d, first, first + second, scales, sums, halves, starts)
    for g in range(whole, scales.shape[0]):
        amax = np.float32(0)
        for j in range(GROUP):
            i = g * GROUP + j
            if i < x.shape[0]:
                amax = max(amax, abs(x[i]))
        d = amax / np.float32(127) if amax > 0 else np.float32(1)
        first = total = 0
        for j in range(GROUP):
            i = g * GROUP + j
            q = int(np.round(x[i] / d)) if i < x.shape[0] else 0
            total += q
            flat[i] = q
            if j < 16:
                first += q
        _group_sums(g, d, first, total, scales, sums, halves, starts)


@njit(inline="always")
def _group_sums(g, d, first, total, scales, sums, halves, starts):
    scales[g] = d
    sums[g] = d * total
    starts[g] = -8 * total
    halves[2 * g] = d * first
    halves[2 * g + 1] = d * (total - first)


@njit(parallel=True, cache=True)
def _quantize_batch(x, flat, scales, sums, halves, starts):
    for t in prange(x.shape[0]):
        _quantize(x[t], flat[t], scales[t], sums[t], halves[t], starts[t])


def quantize_activations(x: np.ndarray, out: Q8Activations | None = None) -> Q8Activations:
    """One vector (cols,) or a batch (tokens, cols), into `out` when given."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = out or Q8Activations.empty(x.shape[-1], x.shape[0] if x.ndim == 2 else None)
    (_quantize_batch if x.ndim == 2 else _quantize)(x, out.flat, out.scales, out.sums, out.halves, out.starts)
    return out
