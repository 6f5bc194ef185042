"""One token's elementwise ops and exact decode attention, in Numba, for the fused decode layer.

Each has its numpy counterpart in reference.py; tests/test_ops.py holds them to it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .simd import (add, div, exp_f32, fma, hsum, load_f32, mul, neg, splat, store_f32, sub,
                   zeros_f32)

LANES = 16


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


@njit(cache=True)
def silu_mul_into(gate, up, out):
    n = gate.shape[0] - gate.shape[0] % LANES
    one = splat(np.float32(1))
    for i in range(0, n, LANES):
        g = load_f32(gate, i)
        store_f32(out, i, div(mul(g, load_f32(up, i)), add(one, exp_f32(neg(g)))))
    for i in range(n, gate.shape[0]):
        out[i] = gate[i] / (np.float32(1) + np.exp(-gate[i])) * up[i]


@njit(cache=True)
def attend_one(q, keys, values, length, scores, out):
    """Grouped-query attention of one token's queries q (heads * hd,) over the first `length`
    positions of keys/values (kv_heads, capacity, hd), C-contiguous, hd a multiple of 16;
    scores is scratch of at least `length`."""
    kv_heads, capacity, hd = keys.shape
    heads = q.shape[0] // hd
    group = heads // kv_heads
    scale = np.float32(1.0 / np.sqrt(hd))
    for h in range(heads):
        qo, base = h * hd, (h // group) * capacity * hd
        top = np.float32(-np.inf)
        for t in range(length):
            acc = zeros_f32()
            for d in range(0, hd, LANES):
                acc = fma(load_f32(q, qo + d), load_f32(keys, base + t * hd + d), acc)
            scores[t] = hsum(acc) * scale
            top = max(top, scores[t])
        total = np.float32(0)
        for t in range(0, length - length % LANES, LANES):
            e = exp_f32(sub(load_f32(scores, t), splat(top)))
            store_f32(scores, t, e)
            total += hsum(e)
        for t in range(length - length % LANES, length):
            scores[t] = np.exp(scores[t] - top)
            total += scores[t]
        inv = splat(np.float32(1) / total)
        for d in range(0, hd, LANES):
            acc = zeros_f32()
            for t in range(length):
                acc = fma(splat(scores[t]), load_f32(values, base + t * hd + d), acc)
            store_f32(out, qo + d, mul(acc, inv))
