"""One transformer layer for one token, in a single Numba call: the decode step's whole layer.

Python dispatch costs microseconds per call, and a layer is 7 matrix products plus norms, RoPE,
attention and activation quantisation; called one by one they cost more than the products
themselves on a small model. Here the layer reads like model.py's forward pass:

    x = rmsnorm(h);  q, k, v = Wq x, Wk x, Wv x;  [q, k = rmsnorm per head];  rope(q, k)
    append k, v to the cache;  h += [rmsnorm] Wo attend(q, cache over all or the window)
    x = rmsnorm(h);  h += [rmsnorm] Wdown (act(Wgate x) * Wup x)

with the family's options (config.py) in brackets: a norm the layer lacks is an empty array. A
layer is passed as (norms, matrices, biases, (window, gelu, attention scale)); a matrix as (kind,
activation span, packed, scales, offsets, offset_factor): 4-bit (q4.py), 2- to 6-bit (q6.py) or 8-bit
(q8.py), its input quantised per 32 or 256 values (scales.activation_span); its kind (kinds.py)
picks its kernel's loop when the layer compiles.

Both release the GIL: a server's event loop answers while a step computes. Every product runs on
all threads, even the small ones: between the parallel regions of one call
the OpenMP threads spin rather than sleep, so a region costs about a microsecond (measured), not the
hundreds a cold wake-up takes.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import literal_unroll, njit, types
from numba.extending import overload

from .activations import Q8Activations, _quantize
from .kv_rows import is_q8_type, rows_at, rows_shape
from .kv_store import append_kv
from .lut_attention import attend_causal_lut
from .ops import (attend_one, attend_rows, gated_activation_into, rmsnorm_heads_in_place, rmsnorm_into, rope_in_place,
                  round_like)
from . import q4, q6, q8
from .kinds import by_kind
from .simd import FIXED_SCALE

# Buffers of one decode step, made once per model: floats, then quantised activations as
# (flat, scales, sums, halves, starts) tuples, then each head's attention scores, as long as the context.
# `fixed` holds a half-layer's output as fixed-point sums (simd.py).
DecodeScratch = namedtuple("DecodeScratch", "x q k v att fixed gate up act xq attq actq scores")


def activation_buffers(cols: int, rows: int | None = None) -> tuple:
    a = Q8Activations.empty(cols, rows)
    return a.flat, a.scales, a.sums, a.halves, a.starts


def decode_scratch(hidden: int, q_size: int, kv_size: int, intermediate: int, heads: int,
                   capacity: int) -> DecodeScratch:
    f = lambda *n: np.zeros(n, np.float32)  # noqa: E731
    return DecodeScratch(f(hidden), f(q_size), f(kv_size), f(kv_size), f(q_size), np.zeros(hidden, np.int64),
                         f(intermediate), f(intermediate), f(intermediate), activation_buffers(hidden),
                         activation_buffers(q_size), activation_buffers(intermediate), f(heads, capacity))


@njit(cache=True)
def quantize(x, xq, span):
    flat, scales, sums, halves, starts = xq
    _quantize(x, flat, scales, sums, halves, starts, span)


@njit(cache=True)
def project(m, x, xq, held, out):
    """out = m x, with x quantised into xq at the matrix's activation span unless xq holds it so
    already (`held`: the span xq holds, 0 for none; the one returned). Projections of one input
    (q, k, v; gate, up) share the quantising unless their types differ (a K-quant beside Q8_0).
    `m` may be a matrix slot's alternatives (each_matrix): the one with rows runs."""
    for one in literal_unroll(each_matrix(m)):
        if one[2].shape[0]:
            span = one[1]
            if span != held:
                quantize(x, xq, span)
            matvec(one, xq, out)
            held = span
    return held


def each_matrix(m):
    """A matrix slot of a layer as a tuple of matrices: (m,), or m itself when it is the slot's
    alternatives, one matrix per kind with all but one empty. A model whose layers differ in a
    matrix's kind (Q4_K_M files hold half the layers' ffn_down as Q6_K) passes every layer that way
    (weights.one_decode_type), so one decode layer is compiled and loaded for them all, not one per
    mix: SmolLM2 Q4_K_M's first run 191 -> 161 s (its peak RSS within the noise, measured)."""


@overload(each_matrix)
def _each_matrix(m):
    if isinstance(m, types.BaseTuple) and isinstance(m[0], types.BaseTuple):  # (a matrix's first field: its kind)
        return lambda m: m
    return lambda m: (m,)


# A matrix's GEMV and GEMM by its kind (kinds.py): each compiled decode layer holds the kernels of
# its own matrices' kinds and no others. Every kernel takes the kind first, and of the activations
# (flat, scales, sums, halves, starts) q4.py's take the sums and starts, q6.py's and q8.py's the halves.
def _with_sums(kernel):
    @njit
    def call(kind, packed, scales, offsets, factor, xq, out):
        kernel(kind, packed, scales, offsets, factor, xq[0], xq[1], xq[2], xq[4], out)
    return call


def _with_halves(kernel):
    @njit
    def call(kind, packed, scales, offsets, factor, xq, out):
        kernel(kind, packed, scales, offsets, factor, xq[0], xq[1], xq[3], out)
    return call


_gemv = by_kind({**{k: _with_sums(q4._gemv_parallel) for k in q4.KINDS},
                 **{k: _with_halves(m._gemv_parallel) for m in (q6, q8) for k in m.KINDS}})
_gemm = by_kind({**{k: _with_sums(q4._gemm) for k in q4.KINDS}, **{k: _with_halves(m._gemm) for m in (q6, q8) for k in m.KINDS}})


@njit(cache=True)
def matvec(m, xq, out):
    kind, _, packed, scales, offsets, factor = m
    _gemv(kind, kind, packed, scales, offsets, factor, xq, out)  # (the first chooses, the second is passed on)


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


@njit(cache=True, nogil=True)
def decode_layer(h, weights, keys, values, lut, position, rope, eps, s):
    """h (hidden,) += the layer's output for the token at `position`; its key and value go into the
    layer's cache arrays (keys, values, lut: kv_cache.LayerKV) at `position`."""
    norms = weights[0]
    decode_attention(h, weights, keys, values, lut, position, rope, eps, s)
    add_output(h, s.fixed, norms[4], eps, s.x)
    decode_mlp(h, weights, eps, s)
    add_output(h, s.fixed, norms[5], eps, s.x)


@njit(cache=True)
def decode_attention(h, weights, keys, values, lut, position, rope, eps, s):
    """s.fixed = the attention half's output for h, in fixed point (not yet added: on a cluster node
    it is a partial sum, which adds up over the nodes exactly as one node's)."""
    (attn_norm, _, _, _, _, _), (wq, wk, wv, wo, _, _, _), _, _ = weights
    rmsnorm_into(h, attn_norm, eps, s.x)
    held = project(wq, s.x, s.xq, 0, s.q)
    held = project(wk, s.x, s.xq, held, s.k)
    project(wv, s.x, s.xq, held, s.v)
    attend_token(weights, s.q, s.k, s.v, keys, values, lut, position, rope, eps, s.scores, s.att)
    project(wo, s.att, s.attq, 0, s.fixed)


@njit(cache=True)
def attend_token(weights, q, k, v, keys, values, lut, position, rope, eps, scores, att):
    """att = attention of one token's projections q, k, v over its cache, into which its key and
    value go at `position` (store_token)."""
    window, scale = weights[3][0], weights[3][2]
    store_token(weights, q, k, v, keys, values, lut, position, rope, eps)
    if lut[0].shape[0]:
        attend_token_lut(q, k, keys, values, lut, position, scores, att)
    else:
        first, end = attended_rows(position, window, rows_shape(values)[1])
        attend_one(q, keys, values, first, end, scale, scores, att)


def attend_token_lut(q, k, keys, values, lut, position, scores, att):
    """attend_token with LUT attention (lut_attention.attend_causal_lut), whose exact keys are
    float32: the cache types it never runs with (q8_0, run_path.choose_path) compile to nothing."""


@overload(attend_token_lut)
def _attend_token_lut(q, k, keys, values, lut, position, scores, att):
    if is_q8_type(keys):
        return lambda q, k, keys, values, lut, position, scores, att: None

    def attend(q, k, keys, values, lut, position, scores, att):
        codebooks, codes, tables, sums = lut
        kv_heads, _, hd = keys.shape
        attend_causal_lut(q.reshape((1, q.shape[0])), k.reshape((kv_heads, 1, hd)), codebooks, codes, keys, values,
                          position, tables, sums, scores, att.reshape((1, att.shape[0])))
    return attend


@njit(cache=True)
def store_token(weights, q, k, v, keys, values, lut, position, rope, eps):
    """A token's projections made ready, in place: biases, query/key norms, RoPE; its key and value
    into the cache at `position` (row position % rows: a local layer's ring, kv_cache.py); the
    queries rounded as the cache's keys are (ops.round_like)."""
    (_, _, q_norm, k_norm, _, _), _, (bq, bk, bv), _ = weights
    kv_heads, _, hd = rows_shape(keys)
    add_bias(q, bq)
    add_bias(k, bk)
    add_bias(v, bv)
    if q_norm.shape[0]:
        rmsnorm_heads_in_place(q, q.shape[0] // hd, q_norm, eps)
        rmsnorm_heads_in_place(k, kv_heads, k_norm, eps)
    rope_in_place(q, q.shape[0] // hd, rope, position)
    rope_in_place(k, kv_heads, rope, position)
    append_kv(keys, values, lut, k.reshape((kv_heads, 1, hd)), v.reshape((kv_heads, 1, hd)),
              position % rows_shape(values)[1])
    round_like(q, keys)


@njit(inline="always")
def attended_rows(position, window, rows):
    """The cache rows first..end-1 a token at `position` attends over: its positions' (all before
    it, or a local layer's window), or, once a local layer's ring of `window` rows has wrapped,
    every row (each holds one of the window's positions)."""
    if position >= rows:
        return 0, rows
    return (max(0, position + 1 - window) if window > 0 else 0), position + 1


@njit(cache=True)
def decode_mlp(h, weights, eps, s):
    """s.fixed = the MLP half's output for h (not yet added)."""
    (_, mlp_norm, _, _, _, _), (_, _, _, _, wgate, wup, wdown), _, (_, gelu, _) = weights
    rmsnorm_into(h, mlp_norm, eps, s.x)
    held = project(wgate, s.x, s.xq, 0, s.gate)
    project(wup, s.x, s.xq, held, s.up)
    gated_activation_into(s.gate, s.up, gelu, s.act)
    project(wdown, s.act, s.actq, 0, s.fixed)


# The same layer for a batch of tokens, each of its own sequence (the server's decode step): row r
# of h is the next token of the sequence in cache slot slots[r], at positions[r]. Every product
# reads its weights once for all rows (the GEMM); everything else runs row by row through the very
# functions above, and the GEMM's rows equal the GEMV's bit for bit, so a sequence decodes to the
# same bits alone or beside others. Exact attention only, over all rows at once (ops.attend_rows).
# `b` holds the buffers of decode_scratch with a leading row axis (batch_scratch).


def batch_scratch(hidden: int, q_size: int, kv_size: int, intermediate: int, heads: int, capacity: int,
                  rows: int) -> DecodeScratch:
    f = lambda *n: np.zeros((rows,) + n, np.float32)  # noqa: E731
    act = lambda cols: activation_buffers(cols, rows)  # noqa: E731
    return DecodeScratch(f(hidden), f(q_size), f(kv_size), f(kv_size), f(q_size), np.zeros((rows, hidden), np.int64),
                         f(intermediate), f(intermediate), f(intermediate), act(hidden), act(q_size),
                         act(intermediate), np.zeros((rows, heads, capacity), np.float32))


@njit(cache=True)
def quantize_row(x, xq, r, span):
    flat, scales, sums, halves, starts = xq
    _quantize(x[r], flat[r], scales[r], sums[r], halves[r], starts[r], span)


@njit(cache=True)
def project_rows(m, x, xq, held, out):
    """project() for every row of x."""
    for one in literal_unroll(each_matrix(m)):
        if one[2].shape[0]:
            span = one[1]
            if span != held:
                for r in range(x.shape[0]):
                    quantize_row(x, xq, r, span)
            matmul(one, xq, out)
            held = span
    return held


@njit(cache=True)
def matmul(m, xq, out):
    kind, _, packed, scales, offsets, factor = m
    _gemm(kind, kind, packed, scales, offsets, factor, xq, out)


@njit(cache=True, nogil=True)
def decode_layer_batch(h, weights, keys, values, lut, slots, positions, rope, eps, b):
    """h (rows, hidden) += the layer's output for each row's token; keys and values (slots,
    kv_heads, capacity, hd) hold every slot's cache of this layer."""
    (attn_norm, mlp_norm, _, _, post_attn, post_mlp), (wq, wk, wv, wo, wgate, wup, wdown), _, (window, gelu, scale) = \
        weights
    rows = h.shape[0]
    for r in range(rows):
        rmsnorm_into(h[r], attn_norm, eps, b.x[r])
    held = project_rows(wq, b.x, b.xq, 0, b.q)
    held = project_rows(wk, b.x, b.xq, held, b.k)
    project_rows(wv, b.x, b.xq, held, b.v)
    firsts, ends = np.empty(rows, np.int64), np.empty(rows, np.int64)
    for r in range(rows):
        slot = slots[r]
        store_token(weights, b.q[r], b.k[r], b.v[r], rows_at(keys, slot), rows_at(values, slot), lut, positions[r],
                    rope, eps)
        firsts[r], ends[r] = attended_rows(positions[r], window, rows_shape(values)[2])
    attend_rows(b.q, keys, values, slots, firsts, ends, scale, b.scores, b.att)
    project_rows(wo, b.att, b.attq, 0, b.fixed)
    for r in range(rows):
        add_output(h[r], b.fixed[r], post_attn, eps, b.x[r])
        rmsnorm_into(h[r], mlp_norm, eps, b.x[r])
    held = project_rows(wgate, b.x, b.xq, 0, b.gate)
    project_rows(wup, b.x, b.xq, held, b.up)
    for r in range(rows):
        gated_activation_into(b.gate[r], b.up[r], gelu, b.act[r])
    project_rows(wdown, b.act, b.actq, 0, b.fixed)
    for r in range(rows):
        add_output(h[r], b.fixed[r], post_mlp, eps, b.x[r])
