"""Activations quantised to int8 per group of 32 (or per 256, for K-quant weights), once per token, into buffers made once."""

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
def _quantize(x, flat, scales, sums, halves, starts, span):
    """Per block of `span` values: d = max |x| / 127 (1 for zeros), q = round(x / d) to nearest even.
    `span` is 32, or 256 for the K-quants' weights, whose activations llama.cpp quantises so (Q8_K):
    each group of 32 then holds its block's d, the scale per group the kernels read. Whole groups
    16 lanes at a time (the same divisions and roundings, so the same bits: a prompt's quantising
    took 3% of a 1B prefill one value at a time), the last part of one value by value."""
    whole, groups, per = x.shape[0] // GROUP, scales.shape[0], span // GROUP
    for block in range(0, groups, per):
        end = min(block + per, groups)
        amax = np.float32(0)
        for g in range(block, end):
            amax = max(amax, _group_abs_max(x, g, whole))
        d = amax / np.float32(127) if amax > 0 else np.float32(1)
        for g in range(block, end):
            _quantize_group(x, g, whole, d, flat, scales, sums, halves, starts)


@njit(inline="always")
def _group_abs_max(x, g, whole):
    if g < whole:
        return abs_max(load_f32(x, g * GROUP), load_f32(x, g * GROUP + 16))
    amax = np.float32(0)
    for i in range(g * GROUP, min((g + 1) * GROUP, x.shape[0])):
        amax = max(amax, abs(x[i]))
    return amax


@njit(inline="always")
def _quantize_group(x, g, whole, d, flat, scales, sums, halves, starts):
    if g < whole:
        lo, hi = roundeven(div(load_f32(x, g * GROUP), splat(d))), roundeven(div(load_f32(x, g * GROUP + 16), splat(d)))
        store_rounded_i8(flat, g * GROUP, lo)
        store_rounded_i8(flat, g * GROUP + 16, hi)
        first, second = int(hsum(lo)), int(hsum(hi))  # sums of integers below 2**12: exact in any order
        _group_sums(g, d, first, first + second, scales, sums, halves, starts)
        return
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
def _quantize_batch(x, flat, scales, sums, halves, starts, span):
    for t in prange(x.shape[0]):
        _quantize(x[t], flat[t], scales[t], sums[t], halves[t], starts[t], span)


def quantize_activations(x: np.ndarray, out: Q8Activations | None = None, span: int = GROUP) -> Q8Activations:
    """One vector (cols,) or a batch (tokens, cols), into `out` when given, a scale per `span`
    values (the matrix's `activation_span`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = out or Q8Activations.empty(x.shape[-1], x.shape[0] if x.ndim == 2 else None)
    (_quantize_batch if x.ndim == 2 else _quantize)(x, out.flat, out.scales, out.sums, out.halves, out.starts, span)
    return out
