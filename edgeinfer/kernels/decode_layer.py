"""One transformer layer for one token, in a single Numba call: the decode step's whole layer.

Python dispatch costs microseconds per call, and a layer is 7 matrix products plus norms, RoPE,
attention and activation quantisation; called one by one they cost more than the products
themselves on a small model. Here the layer reads like model.py's forward pass:

    x = rmsnorm(h);  q, k, v = Wq x, Wk x, Wv x;  [q, k = rmsnorm per head];  rope(q, k)
    append k, v to the cache;  h += [rmsnorm] Wo attend(q, cache over all or the window)
    x = rmsnorm(h);  h += [rmsnorm] Wdown (act(Wgate x) * Wup x)

with the family's options (config.py) in brackets: a norm the layer lacks is an empty array. A
layer is passed as (norms, matrices, biases, (window, gelu, attention scale)); a matrix as (bits,
packed, scales, offsets, offset_factor): 4-bit (q4.py) or 8-bit (q8.py), so one compiled function
serves any mix of the two.

Every product runs on all threads, even the small ones: between the parallel regions of one call
the OpenMP threads spin rather than sleep, so a region costs about a microsecond (measured), not the
hundreds a cold wake-up takes.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from .activations import Q8Activations, _quantize
from .kv_store import append_kv
from .lut_attention import attend_causal_lut
from .ops import attend_one, gated_activation_into, rmsnorm_heads_in_place, rmsnorm_into, rope_in_place
from .q4 import _gemv_parallel as q4_gemv
from .q8 import _gemv_parallel as q8_gemv
from .simd import FIXED_SCALE

# Buffers of one decode step, made once per model: floats, then quantised activations as
# (lo, hi, flat, scales, sums, halves) tuples, then each head's attention scores, as long as the context.
# `fixed` holds a half-layer's output as fixed-point sums (simd.py).
DecodeScratch = namedtuple("DecodeScratch", "x q k v att fixed gate up act xq attq actq scores")


def activation_buffers(cols: int) -> tuple:
    a = Q8Activations.empty(cols)
    return a.lo, a.hi, a.flat, a.scales, a.sums, a.halves


def decode_scratch(hidden: int, q_size: int, kv_size: int, intermediate: int, heads: int,
                   capacity: int) -> DecodeScratch:
    f = lambda *n: np.zeros(n, np.float32)  # noqa: E731
    return DecodeScratch(f(hidden), f(q_size), f(kv_size), f(kv_size), f(q_size), np.zeros(hidden, np.int64),
                         f(intermediate), f(intermediate), f(intermediate), activation_buffers(hidden),
                         activation_buffers(q_size), activation_buffers(intermediate), f(heads, capacity))


@njit(cache=True)
def quantize(x, xq):
    lo, hi, flat, scales, sums, halves = xq
    _quantize(x, lo, hi, flat, scales, sums, halves)


@njit(cache=True)
def matvec(m, xq, out):
    bits, packed, scales, offsets, factor = m
    lo, hi, flat, xscales, xsums, xhalves = xq
    if bits == 4:
        q4_gemv(packed, scales, offsets, factor, lo, hi, xscales, xsums, out)
    else:
        q8_gemv(packed, scales, offsets, factor, flat, xscales, xhalves, out)


@njit(cache=True)
def add_bias(y, bias):
    if bias.shape[0]:  # an empty array stands for no bias
        y += bias


@njit(cache=True)
def add_output(h, fixed, post_norm, eps, y):
    """h += a half-layer's output (fixed-point sums, each rounded to float32 once, as
    simd.from_fixed rounds them), through its norm when the family has one (post_norm not empty)."""
    for i in range(h.shape[0]):
        y[i] = np.float32(fixed[i] * FIXED_SCALE)
    if post_norm.shape[0]:
        rmsnorm_into(y, post_norm, eps, y)
    h += y


@njit(cache=True)
def decode_layer(h, weights, keys, values, lut, position, inv_freq, eps, s):
    """h (hidden,) += the layer's output for the token at `position`; its key and value go into the
    layer's cache arrays (keys, values, lut: kv_cache.LayerKV) at `position`."""
    norms = weights[0]
    decode_attention(h, weights, keys, values, lut, position, inv_freq, eps, s)
    add_output(h, s.fixed, norms[4], eps, s.x)
    decode_mlp(h, weights, eps, s)
    add_output(h, s.fixed, norms[5], eps, s.x)


@njit(cache=True)
def decode_attention(h, weights, keys, values, lut, position, inv_freq, eps, s):
    """s.fixed = the attention half's output for h, in fixed point (not yet added: on a cluster node
    it is a partial sum, which adds up over the nodes exactly as one node's)."""
    (attn_norm, _, q_norm, k_norm, _, _), (wq, wk, wv, wo, _, _, _), (bq, bk, bv), (window, _, scale) = weights
    kv_heads, hd = keys.shape[0], keys.shape[2]

    rmsnorm_into(h, attn_norm, eps, s.x)
    quantize(s.x, s.xq)
    matvec(wq, s.xq, s.q)
    matvec(wk, s.xq, s.k)
    matvec(wv, s.xq, s.v)
    add_bias(s.q, bq)
    add_bias(s.k, bk)
    add_bias(s.v, bv)
    if q_norm.shape[0]:
        rmsnorm_heads_in_place(s.q, s.q.shape[0] // hd, q_norm, eps)
        rmsnorm_heads_in_place(s.k, kv_heads, k_norm, eps)
    rope_in_place(s.q, s.q.shape[0] // hd, inv_freq, position)
    rope_in_place(s.k, kv_heads, inv_freq, position)
    new_key = s.k.reshape((kv_heads, 1, hd))
    append_kv(keys, values, lut, new_key, s.v.reshape((kv_heads, 1, hd)), position)
    codebooks, codes, tables, sums = lut
    if codebooks.shape[0]:
        attend_causal_lut(s.q.reshape((1, s.q.shape[0])), new_key, codebooks, codes, keys, values, position, tables,
                          sums, s.scores, s.att.reshape((1, s.att.shape[0])))
    else:
        first = max(0, position + 1 - window) if window > 0 else 0
        attend_one(s.q, keys, values, first, position + 1, scale, s.scores, s.att)
    quantize(s.att, s.attq)
    matvec(wo, s.attq, s.fixed)


@njit(cache=True)
def decode_mlp(h, weights, eps, s):
    """s.fixed = the MLP half's output for h (not yet added)."""
    (_, mlp_norm, _, _, _, _), (_, _, _, _, wgate, wup, wdown), _, (_, gelu, _) = weights
    rmsnorm_into(h, mlp_norm, eps, s.x)
    quantize(s.x, s.xq)
    matvec(wgate, s.xq, s.gate)
    matvec(wup, s.xq, s.up)
    gated_activation_into(s.gate, s.up, gelu, s.act)
    quantize(s.act, s.actq)
    matvec(wdown, s.actq, s.fixed)
