"""One token's elementwise ops and exact decode attention, in Numba, for the fused decode layer.

Each has its numpy counterpart in reference.py; tests/test_ops.py holds them to it.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True)
def rmsnorm_into(x, weight, eps, out):
    total = 0.0
    for i in range(x.shape[0]):
        total += np.float64(x[i]) * x[i]
    inv = np.float32(1.0 / np.sqrt(total / x.shape[0] + eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * inv * weight[i]


@njit(cache=True)
def rope_in_place(x, heads, inv_freq, position):
    """Rotate-half RoPE of `heads` heads of x (heads * head_dim,) at `position`."""
    half = inv_freq.shape[0]
    hd = 2 * half
    for i in range(half):
        angle = np.float64(position) * inv_freq[i]
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        for h in range(heads):
            a, b = x[h * hd + i], x[h * hd + half + i]
            x[h * hd + i] = a * c - b * s
            x[h * hd + half + i] = b * c + a * s


@njit(cache=True, fastmath=True)
def silu_mul_into(gate, up, out):
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (np.float32(1) + np.exp(-g)) * up[i]


@njit(cache=True, fastmath=True)
def attend_one(q, keys, values, length, scores, out):
    """Grouped-query attention of one token's queries q (heads * hd,) over the first `length`
    positions of keys/values (kv_heads, capacity, hd); scores is scratch of at least `length`."""
    kv_heads, hd = keys.shape[0], keys.shape[2]
    heads = q.shape[0] // hd
    group = heads // kv_heads
    scale = np.float32(1.0 / np.sqrt(hd))
    for h in range(heads):
        kh, qo = h // group, h * hd
        top = -np.inf
        for t in range(length):
            dot = np.float32(0)
            for d in range(hd):
                dot += q[qo + d] * keys[kh, t, d]
            scores[t] = dot * scale
            top = max(top, scores[t])
        total = np.float32(0)
        for t in range(length):
            scores[t] = np.exp(scores[t] - top)
            total += scores[t]
        for d in range(hd):
            out[qo + d] = 0
        for t in range(length):
            p = scores[t] / total
            for d in range(hd):
                out[qo + d] += p * values[kh, t, d]
