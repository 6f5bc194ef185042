"""One token's elementwise ops and exact decode attention, in Numba, for the fused decode layer.

Each has its numpy counterpart in reference.py; tests/test_ops.py holds them to it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .kv_rows import is_q8_type, load_row, prefetch_rows, rows_at, rows_shape, widened
from .simd import (add, div, exp_f32, fma, hmax, hsum, hsum16, kernel_path, load_f32, load_floats, max_f32, mul, neg,
                   splat, splat_at, store_f32, store_floats, sub, zeros_f32)

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
def rope_in_place(x, heads, rope, position):
    """Rotate-half RoPE of `heads` heads of x (heads * head_dim,) at `position`, over each head's
    first 2 * rope.shape[1] dims (all of them, or a partial rotary's; the rest pass); rope is
    (inverse frequencies, amplitudes) per pair (config.rope_table)."""
    half = rope.shape[1]
    hd = x.shape[0] // heads
    for i in range(half):
        angle = np.float64(position) * rope[0, i]
        c, s = np.float32(np.cos(angle) * rope[1, i]), np.float32(np.sin(angle) * rope[1, i])
        for h in range(heads):
            a, b = x[h * hd + i], x[h * hd + half + i]
            x[h * hd + i] = a * c - b * s
            x[h * hd + half + i] = b * c + a * s


@njit(cache=True)
def rmsnorm_heads_in_place(x, heads, weight, eps):
    """RMSNorm of each of x's heads (heads * hd,), one weight (hd,) for all: Qwen3's and Gemma 3's
    query and key norms."""
    hd = weight.shape[0]
    for h in range(heads):
        head = x[h * hd:(h + 1) * hd]
        rmsnorm_into(head, weight, eps, head)


@njit(cache=True)
def gated_activation_into(gate, up, gelu, out):
    """out = act(gate) * up, act SiLU or (gelu) GELU's tanh approximation. Both are x * sigmoid(z):
    z = x for SiLU, z = 2 sqrt(2/pi) (x + 0.044715 x^3) for GELU (0.5 (1 + tanh(u)) = sigmoid(2u))."""
    n = gate.shape[0] - gate.shape[0] % LANES
    one, c, cube = splat(np.float32(1)), splat(np.float32(2 * np.sqrt(2 / np.pi))), splat(np.float32(0.044715))
    for i in range(0, n, LANES):
        g = load_f32(gate, i)
        z = mul(c, fma(mul(cube, g), mul(g, g), g)) if gelu else g
        store_f32(out, i, div(mul(g, load_f32(up, i)), add(one, exp_f32(neg(z)))))
    for i in range(n, gate.shape[0]):
        g = gate[i]
        z = np.float32(2 * np.sqrt(2 / np.pi)) * (g + np.float32(0.044715) * g * g * g) if gelu else g
        out[i] = g / (np.float32(1) + np.exp(-z)) * up[i]


def round_like(q, keys):
    """q (float32, a multiple of 16 long) rounded in place to fp16 precision when the cache's keys
    are fp16 bits, as llama.cpp rounds the queries it multiplies an fp16 cache with; else nothing
    (a q8_0 cache's keys are multiplied with float32 queries: llama.cpp quantizes them to 8 bits)."""


@overload(round_like)
def _round_like(q, keys):
    if is_q8_type(keys) or keys.dtype != types.uint16:
        return lambda q, keys: None

    def round_q(q, keys):
        half = np.empty(LANES, np.uint16)
        for i in range(0, q.shape[0], LANES):
            store_floats(half, 0, load_f32(q, i))
            store_f32(q, i, load_floats(half, 0))
    return round_q


@njit(parallel=True, cache=True)
def gated_activation_rows(gate, up, gelu, out):
    """gated_activation_into for a batch (tokens, intermediate), the rows on all threads."""
    for r in prange(gate.shape[0]):
        gated_activation_into(gate[r], up[r], gelu, out[r])


@njit(cache=True)
def round_rows_like(q, keys):
    """round_like for a contiguous (count, q_size) batch of queries, in place."""
    round_like(q.reshape(q.size), keys)


@njit(inline="always")
def _dot(q, qo, keys, row, hd):
    """q[qo:qo + hd] . keys[row:row + hd], in 16 lanes (not yet summed)."""
    acc = zeros_f32()
    for d in range(0, hd, LANES):
        acc = fma(load_f32(q, qo + d), load_row(keys, row + d), acc)
    return acc


# AVX-512 holds 32 vectors of 16 lanes; AVX2 and NEON hold 8 (16 x 256 bits, 32 x 128). Loops that
# keep 16 such vectors live are faster with 32 and spill with 8 (measured on AVX2's code): the
# attention kernels choose their blocking by it.
WIDE_REGISTERS = kernel_path() == "avx512-vnni"


@njit(inline="always")
def _scores16(q, qo, keys, row, hd):
    """The dot products of q[qo:qo + hd] with the 16 key rows from `row`, as one vector; each row's
    products are added in _dot's order, whichever the loop."""
    if WIDE_REGISTERS:
        return _scores16_dims(q, qo, keys, row, hd)
    return _scores16_rows(q, qo, keys, row, hd)


@njit(inline="always")
def _scores16_rows(q, qo, keys, row, hd):
    """_scores16 a row at a time: each row's FMA chain alone, 16 accumulators at the end (AVX2, NEON)."""
    return hsum16(_dot(q, qo, keys, row, hd), _dot(q, qo, keys, row + hd, hd), _dot(q, qo, keys, row + 2 * hd, hd),
                  _dot(q, qo, keys, row + 3 * hd, hd), _dot(q, qo, keys, row + 4 * hd, hd),
                  _dot(q, qo, keys, row + 5 * hd, hd), _dot(q, qo, keys, row + 6 * hd, hd),
                  _dot(q, qo, keys, row + 7 * hd, hd), _dot(q, qo, keys, row + 8 * hd, hd),
                  _dot(q, qo, keys, row + 9 * hd, hd), _dot(q, qo, keys, row + 10 * hd, hd),
                  _dot(q, qo, keys, row + 11 * hd, hd), _dot(q, qo, keys, row + 12 * hd, hd),
                  _dot(q, qo, keys, row + 13 * hd, hd), _dot(q, qo, keys, row + 14 * hd, hd),
                  _dot(q, qo, keys, row + 15 * hd, hd))


@njit(inline="always")
def _scores16_dims(q, qo, keys, row, hd):
    """_scores16 a dim block at a time, the 16 rows' FMA chains side by side (AVX-512): hd is not
    known when compiling, so a loop per row runs each chain alone, waiting on its FMA's latency."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = zeros_f32()
    for d in range(0, hd, LANES):
        x, r = load_f32(q, qo + d), row + d
        a0, a1, a2, a3 = fma(x, load_row(keys, r), a0), fma(x, load_row(keys, r + hd), a1), \
            fma(x, load_row(keys, r + 2 * hd), a2), fma(x, load_row(keys, r + 3 * hd), a3)
        a4, a5, a6, a7 = fma(x, load_row(keys, r + 4 * hd), a4), fma(x, load_row(keys, r + 5 * hd), a5), \
            fma(x, load_row(keys, r + 6 * hd), a6), fma(x, load_row(keys, r + 7 * hd), a7)
        a8, a9, a10, a11 = fma(x, load_row(keys, r + 8 * hd), a8), fma(x, load_row(keys, r + 9 * hd), a9), \
            fma(x, load_row(keys, r + 10 * hd), a10), fma(x, load_row(keys, r + 11 * hd), a11)
        a12, a13, a14, a15 = fma(x, load_row(keys, r + 12 * hd), a12), fma(x, load_row(keys, r + 13 * hd), a13), \
            fma(x, load_row(keys, r + 14 * hd), a14), fma(x, load_row(keys, r + 15 * hd), a15)
    return hsum16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)


@njit(parallel=True, cache=True)
def attend_one(q, keys, values, first, length, scale, scores, out):
    """Grouped-query attention of one token's queries q (heads * hd,) over positions first..length-1
    of keys/values (kv_heads, capacity, hd) (all of them, or a local layer's window), C-contiguous,
    hd a multiple of 16, rows of any cache type (kv_rows.py); scores is scratch (heads, >= length).
    At long contexts this is the step's largest read after the weights, so each KV head's keys and
    values are read from memory once for all the query heads that share them (_attend_part).
    The threads take (KV head, part of its keys) pairs (key_parts): a model with fewer KV heads than
    threads (Gemma 3 270M has one) still uses them all at long contexts."""
    kv_heads, _, hd = rows_shape(keys)
    heads = q.shape[0] // hd
    parts = key_parts(length - first, kv_heads)
    partial, tops, totals = part_sums(parts, heads, hd)
    blocks = key_blocks(kv_heads * parts, hd)
    for task in prange(kv_heads * parts):
        kh, p = task // parts, task % parts
        _attend_part(q, keys, values, first, length, scale, scores, kh, p, parts, partial[p], tops[p], totals[p],
                     blocks[task])
    for kh in range(kv_heads):
        merge_parts(partial, tops, totals, kh * (heads // kv_heads), heads // kv_heads, hd, out)


@njit(parallel=True, cache=True)
def attend_rows(q, keys, values, slots, firsts, lengths, scale, scores, out):
    """attend_one for a batch of tokens, each of its own sequence (a server's decode step): row r
    of q (rows, heads * hd) over positions firsts[r]..lengths[r]-1 of its slot's keys/values
    (slots, kv_heads, capacity, hd), scores (rows, heads, >= length). The threads take (row, KV
    head) pairs, so a few KV heads still fill them; each row's result is attend_one's, bit for bit
    (the same parts, one after the other)."""
    kv_heads = rows_shape(keys)[1]
    for task in prange(q.shape[0] * kv_heads):
        r, kh = task // kv_heads, task % kv_heads
        _attend_kv_head(q[r], rows_at(keys, slots[r]), rows_at(values, slots[r]), firsts[r], lengths[r], scale,
                        scores[r], out[r], kh)


KEYS_AHEAD = 32  # key rows the scores' pass prefetches ahead (4 KB of fp16 rows at hd 64)
PART_KEYS = 1024  # keys a part takes at least, when a long span is cut into parts (key_parts)
TASKS = 12  # (KV head, part) pairs a step is cut into at most: a whole share for 1, 2, 3, 4 or 6 threads


@njit(inline="always")
def key_parts(span, kv_heads):
    """How many parts each KV head's `span` keys are cut into: one below 2 * PART_KEYS (every sum
    in the order of one pass) or with TASKS KV heads or more, else up to TASKS / kv_heads, each of
    PART_KEYS keys or more. The model and the span decide, not the thread count: any number of
    threads gives the same sums."""
    return max(1, min(span // PART_KEYS, TASKS // kv_heads))


@njit(inline="always")
def _attend_kv_head(q, keys, values, first, length, scale, scores, out, kh):
    """Attention of the query heads of KV head kh (its group) over positions first..length-1, part
    after part (key_parts; one part for short spans), merged."""
    kv_heads, _, hd = rows_shape(keys)
    heads = q.shape[0] // hd
    parts = key_parts(length - first, kv_heads)
    partial, tops, totals = part_sums(parts, heads, hd)
    block = key_blocks(1, hd)[0]
    for p in range(parts):
        _attend_part(q, keys, values, first, length, scale, scores, kh, p, parts, partial[p], tops[p], totals[p], block)
    merge_parts(partial, tops, totals, kh * (heads // kv_heads), heads // kv_heads, hd, out)


@njit(inline="always")
def part_sums(parts, heads, hd):
    """Each part's partial sums (parts, heads * hd), and its heads' tops and totals (parts, heads)."""
    return (np.empty((parts, heads * hd), np.float32), np.empty((parts, heads), np.float32),
            np.empty((parts, heads), np.float32))


@njit(inline="always")
def key_blocks(tasks, hd):
    """Each task's block of 16 key rows as float32 (_kv_head_scores), made with the call's other
    scratch rather than per task; empty where the scores read the rows as they are (not AVX-512)."""
    return np.empty((tasks, LANES * hd if WIDE_REGISTERS else 0), np.float32)


@njit(inline="always")
def _row_base(keys, kh, first):
    """Where row `first` of KV head kh starts in keys (and values: the same capacity)."""
    _, capacity, hd = rows_shape(keys)
    return kh * capacity * hd + first * hd


@njit(inline="always")
def _kv_head_scores(q, keys, first, a, b, scale, scores, kh, block):
    """scores[h, t] for t in a..b-1 (position first + t), the query heads h of KV head kh: each key
    row is taken by all of them while it is in L1; 16 keys' scores come out of one vector (hsum16);
    each head's arithmetic is the order a head alone would do. With AVX-512, rows that reading
    converts (fp16, 8 bits) are converted once for the group, 16 at a time, into `block`
    (key_blocks): the conversions had been half of a 4-head group's work (x1.5 measured; with
    AVX2's 8 registers, slower)."""
    kv_heads, _, hd = rows_shape(keys)
    group = q.shape[0] // hd // kv_heads
    scale, base = np.float32(scale), _row_base(keys, kh, first)
    whole = b - (b - a) % LANES
    for t in range(a, whole, LANES):
        ahead, at = base + (t + KEYS_AHEAD) * hd, base + t * hd
        prefetch_rows(keys, ahead, min(ahead + LANES * hd, base + b * hd))
        if WIDE_REGISTERS and group > 1 and widened(keys):
            for i in range(0, LANES * hd, LANES):
                store_f32(block, i, load_row(keys, at + i))
            for g in range(group):
                qo = (kh * group + g) * hd
                store_f32(scores[kh * group + g], t, mul(_scores16(q, qo, block, 0, hd), splat(scale)))
        else:
            for g in range(group):
                qo = (kh * group + g) * hd
                store_f32(scores[kh * group + g], t, mul(_scores16(q, qo, keys, at, hd), splat(scale)))
    for t in range(whole, b):
        for g in range(group):
            scores[kh * group + g, t] = hsum(_dot(q, (kh * group + g) * hd, keys, base + t * hd, hd)) * scale


@njit(inline="always")
def _attend_part(q, keys, values, first, length, scale, scores, kh, p, parts, partial, tops, totals, block):
    """Part p of `parts` of KV head kh's keys: its heads' scores, and their exponentials' sums
    (totals) against their maximum (tops) times the values, not yet divided (partial)."""
    hd = rows_shape(keys)[2]
    group = q.shape[0] // hd // rows_shape(keys)[0]
    span = length - first
    a, b = span * p // parts, span * (p + 1) // parts
    _kv_head_scores(q, keys, first, a, b, scale, scores, kh, block)
    _weighted_values(scores, values, _row_base(keys, kh, first), a, b, kh * group, group, hd, partial, tops, totals)


@njit(inline="always")
def merge_parts(partial, tops, totals, h0, group, hd, out):
    """out for heads h0..h0+group-1 from the parts' partial sums: each part's weighed by
    exp(its top - the overall top), the whole divided by the sum of the parts' totals so weighed."""
    parts = partial.shape[0]
    weights = np.empty(parts, np.float32)
    for h in range(h0, h0 + group):
        top = tops[0, h]
        for p in range(1, parts):
            top = max(top, tops[p, h])
        total = np.float32(0)
        for p in range(parts):
            weights[p] = np.float32(np.exp(tops[p, h] - top))  # 1 exactly for one part
            total += totals[p, h] * weights[p]
        weight = splat(weights[0] / total)
        for d in range(0, hd, LANES):
            store_f32(out, h * hd + d, mul(weight, load_f32(partial[0], h * hd + d)))
        for p in range(1, parts):
            weight = splat(weights[p] / total)
            for d in range(0, hd, LANES):
                store_f32(out, h * hd + d, fma(weight, load_f32(partial[p], h * hd + d), load_f32(out, h * hd + d)))


VALUE_CHUNK = 64  # value rows a KV head's query heads take in turn while they are in L1 (8 KB at 64 fp16 dims)


@njit(inline="always")
def values_part(scores, values, length, kh, p, parts, group, partial, tops, totals):
    """The second half of _attend_part for scores set otherwise (LUT attention): part p of `parts`
    of positions 0..length-1 of KV head kh, whose query heads' scores are set there."""
    a, b = length * p // parts, length * (p + 1) // parts
    _weighted_values(scores, values, _row_base(values, kh, 0), a, b, kh * group, group, rows_shape(values)[2],
                     partial, tops, totals)


@njit(inline="always")
def _weighted_values(scores, values, base, first, end, h0, group, hd, out, tops, totals):
    """A softmax's numerator over positions first..end-1: out[h] = sum of exp(score - top) * value
    row, with tops[h] and totals[h] (the sum of the exponentials) set, for h in h0..h0+group-1
    (merge_parts divides)."""
    for g in range(group):
        h = h0 + g
        tops[h] = row_max(scores[h], first, end)
        totals[h] = exp_in_place(scores[h], first, end, tops[h])
        for d in range(0, hd, LANES):
            store_f32(out, h * hd + d, zeros_f32())
    blocks = hd // 64  # each head's whole 64-dim blocks, 4 registers of a row's dims
    for c in range(first, end, VALUE_CHUNK):
        stop = min(end, c + VALUE_CHUNK)
        for d in range(0, blocks * 64, 64):  # the group's heads take a block's dims of each row together
            for g in range(0, group - VALUE_HEADS + 1, VALUE_HEADS):
                if VALUE_HEADS == 4:
                    _add_values_4heads(scores, h0 + g, values, base, c, stop, hd, out, d)
                else:
                    _add_values_2heads(scores, h0 + g, values, base, c, stop, hd, out, d)
            g = group // VALUE_HEADS * VALUE_HEADS
            if group - g >= 2:
                _add_values_2heads(scores, h0 + g, values, base, c, stop, hd, out, d)
        if group % 2:  # the last head has its blocks to itself: two at once where it has two
            h = h0 + group - 1
            for d in range(0, blocks * 64 - 64, 128):
                _add_values_2blocks(scores[h], values, base, c, stop, hd, out, d, h * hd + d)
            if blocks % 2:
                d = (blocks - 1) * 64
                _add_values64(scores[h], values, base, c, stop, hd, out, d, h * hd + d)
        for g in range(group):
            for d in range(blocks * 64, hd, LANES):
                _add_values16(scores[h0 + g], values, base, c, stop, hd, out, d, (h0 + g) * hd + d)


# Each dim of a head's output takes its products in order of t, one running sum (an FMA chain) per
# dim, so the sums are the same whatever the blocking. A chain waits on its FMA's latency, so units
# of 64 dims go two or four together: 8 or 16 chains in flight. Heads sharing a KV head take the
# same dims of each row together, which is then loaded (converted from fp16 or 8 bits) once for all
# of them; a head alone in its KV head takes two of its blocks at once. Four heads' 16 accumulators
# fit AVX-512's 32 registers; on AVX2 and NEON, which hold 8 vectors of 16 lanes, they spill and
# run slower than two heads' 8 (measured), so VALUE_HEADS is 2 there. The row of the next chunk is
# prefetched as each row is taken.
VALUE_HEADS = 4 if WIDE_REGISTERS else 2


@njit(inline="always")
def _add_values_4heads(scores, h, values, base, first, end, hd, out, d):
    """out[(h + i) * hd + d:][:64] += sum over t of scores[h + i, t] * value row t's dims d..d+63, for
    i in 0..3, t in first..end-1 (rows from `base`)."""
    pa, pb, pc, pe = scores[h], scores[h + 1], scores[h + 2], scores[h + 3]
    o = h * hd + d
    a0, a1, a2, a3 = _load4(out, o)
    b0, b1, b2, b3 = _load4(out, o + hd)
    c0, c1, c2, c3 = _load4(out, o + 2 * hd)
    e0, e1, e2, e3 = _load4(out, o + 3 * hd)
    for t in range(first, end):
        wa, wb, wc, we, r = splat(pa[t]), splat(pb[t]), splat(pc[t]), splat(pe[t]), base + t * hd + d
        prefetch_rows(values, r + VALUE_CHUNK * hd, r + VALUE_CHUNK * hd + 64)
        v0, v1, v2, v3 = _load_row4(values, r)
        a0, b0, c0, e0 = fma(wa, v0, a0), fma(wb, v0, b0), fma(wc, v0, c0), fma(we, v0, e0)
        a1, b1, c1, e1 = fma(wa, v1, a1), fma(wb, v1, b1), fma(wc, v1, c1), fma(we, v1, e1)
        a2, b2, c2, e2 = fma(wa, v2, a2), fma(wb, v2, b2), fma(wc, v2, c2), fma(we, v2, e2)
        a3, b3, c3, e3 = fma(wa, v3, a3), fma(wb, v3, b3), fma(wc, v3, c3), fma(we, v3, e3)
    _store4(out, o, a0, a1, a2, a3)
    _store4(out, o + hd, b0, b1, b2, b3)
    _store4(out, o + 2 * hd, c0, c1, c2, c3)
    _store4(out, o + 3 * hd, e0, e1, e2, e3)


@njit(inline="always")
def _add_values_2heads(scores, h, values, base, first, end, hd, out, d):
    """_add_values_4heads for heads h and h + 1."""
    pa, pb = scores[h], scores[h + 1]
    o = h * hd + d
    a0, a1, a2, a3 = _load4(out, o)
    b0, b1, b2, b3 = _load4(out, o + hd)
    for t in range(first, end):
        wa, wb, r = splat(pa[t]), splat(pb[t]), base + t * hd + d
        prefetch_rows(values, r + VALUE_CHUNK * hd, r + VALUE_CHUNK * hd + 64)
        v0, v1, v2, v3 = _load_row4(values, r)
        a0, b0 = fma(wa, v0, a0), fma(wb, v0, b0)
        a1, b1 = fma(wa, v1, a1), fma(wb, v1, b1)
        a2, b2 = fma(wa, v2, a2), fma(wb, v2, b2)
        a3, b3 = fma(wa, v3, a3), fma(wb, v3, b3)
    _store4(out, o, a0, a1, a2, a3)
    _store4(out, o + hd, b0, b1, b2, b3)


@njit(inline="always")
def _add_values_2blocks(p, values, base, first, end, hd, out, d, o):
    """out[o:o + 128] += sum over t of p[t] * value row t's dims d..d+127, t in first..end-1."""
    a0, a1, a2, a3 = _load4(out, o)
    b0, b1, b2, b3 = _load4(out, o + 64)
    for t in range(first, end):
        w, r = splat(p[t]), base + t * hd + d
        prefetch_rows(values, r + VALUE_CHUNK * hd, r + VALUE_CHUNK * hd + 128)
        a0, a1, a2, a3 = _add_row4(w, values, r, a0, a1, a2, a3)
        b0, b1, b2, b3 = _add_row4(w, values, r + 64, b0, b1, b2, b3)
    _store4(out, o, a0, a1, a2, a3)
    _store4(out, o + 64, b0, b1, b2, b3)


@njit(inline="always")
def _add_values64(p, values, base, first, end, hd, out, d, o):
    """_add_values_2blocks for one block, dims d..d+63."""
    a0, a1, a2, a3 = _load4(out, o)
    for t in range(first, end):
        w, r = splat(p[t]), base + t * hd + d
        prefetch_rows(values, r + VALUE_CHUNK * hd, r + VALUE_CHUNK * hd + 64)
        a0, a1, a2, a3 = _add_row4(w, values, r, a0, a1, a2, a3)
    _store4(out, o, a0, a1, a2, a3)


@njit(inline="always")
def _add_values16(p, values, base, first, end, hd, out, d, o):
    """16 dims d.. of a head whose hd is not a multiple of 64 (the dims past its whole blocks)."""
    acc = load_f32(out, o)
    for t in range(first, end):
        acc = fma(splat(p[t]), load_row(values, base + t * hd + d), acc)
    store_f32(out, o, acc)


@njit(inline="always")
def _load4(out, o):
    return load_f32(out, o), load_f32(out, o + 16), load_f32(out, o + 32), load_f32(out, o + 48)


@njit(inline="always")
def _load_row4(rows, r):
    return load_row(rows, r), load_row(rows, r + 16), load_row(rows, r + 32), load_row(rows, r + 48)


@njit(inline="always")
def _add_row4(w, rows, r, a0, a1, a2, a3):
    """(a0, .., a3) + w * the 64 values from flat offset r, 16 at a time."""
    return (fma(w, load_row(rows, r), a0), fma(w, load_row(rows, r + 16), a1), fma(w, load_row(rows, r + 32), a2),
            fma(w, load_row(rows, r + 48), a3))


@njit(inline="always")
def _store4(out, o, a0, a1, a2, a3):
    store_f32(out, o, a0)
    store_f32(out, o + 16, a1)
    store_f32(out, o + 32, a2)
    store_f32(out, o + 48, a3)


@njit(inline="always")
def row_max(row, first, end):
    """The largest of row[first:end] (end > first, no NaNs), 16 lanes at a time: numpy's max here
    runs one float at a time, a third of a head's value pass over 16k keys (measured)."""
    whole = end - (end - first) % LANES
    top = np.float32(-np.inf)
    if whole > first:
        acc = load_f32(row, first)
        for t in range(first + LANES, whole, LANES):
            acc = max_f32(acc, load_f32(row, t))
        top = hmax(acc)
    for t in range(whole, end):
        top = max(top, row[t])
    return top


@njit(cache=True)
def exp_in_place(scores, first, end, top):
    """scores[first:end] = exp(scores - top), 16 lanes at a time from `first`; returns their sum
    (softmax's denominator)."""
    total = np.float32(0)
    whole = end - (end - first) % LANES
    for t in range(first, whole, LANES):
        e = exp_f32(sub(load_f32(scores, t), splat(top)))
        store_f32(scores, t, e)
        total += hsum(e)
    for t in range(whole, end):
        scores[t] = np.exp(scores[t] - top)
        total += scores[t]
    return total


@njit(cache=True)
def rope_rows(x, cos, sin, hd):
    """Rotate-half RoPE in place on x (tokens, heads * hd) with tables (tokens, rotary dims) from
    reference.rope_tables (halves repeated), over each head's first rotary dims (the rest pass)."""
    half = cos.shape[1] // 2
    for t in range(x.shape[0]):
        for o in range(0, x.shape[1], hd):
            for i in range(half):
                a, b = x[t, o + i], x[t, o + half + i]
                x[t, o + i] = a * cos[t, i] - b * sin[t, i]
                x[t, o + half + i] = b * cos[t, half + i] + a * sin[t, half + i]


# A prompt's attention goes over the keys in tiles of KEY_TILE positions. Each tile is converted to
# float32 once for every query of the chunk: the keys transposed (each block of 16 keys dim by dim),
# so 16 keys' scores are one vector's FMAs, a dim at a time, with no horizontal sums; the values as
# rows. Queries go four at a time (neighbours: nearly the same keys), and each load of keys or
# values is taken by all four, where one query alone reads a float per FMA from L2. Each query takes
# the tile's blocks of 16 keys it sees by online softmax: its running top, total and unnormalised
# output carry from tile to tile, and it is divided at the end. A 1B-shape prompt of 512 tokens:
# 1.6-1.8x the one-query-at-a-time kernel before this (bench/RESULTS.md). (A tile of a 1B-shape
# layer, 8 KV heads of 64 dims, is 1 MB: in L2 while the queries pass.)
KEY_TILE = 256


@njit(cache=True)
def _tile_block(keys, values, t0, n, b, kt, vt):
    """Positions t0 + 16 b .. + 15 of every KV head into the tile: keys transposed into kt (kv_heads,
    KEY_TILE / 16, hd, 16: each block of 16 keys one stretch, dim by dim), values into vt (kv_heads,
    KEY_TILE, hd), as float32; positions n and past, zeros."""
    kv_heads, capacity, hd = rows_shape(keys)
    row = np.empty(LANES, np.float32)
    for kh in range(kv_heads):
        for j in range(b * LANES, (b + 1) * LANES):
            src = (kh * capacity + t0 + j) * hd
            for d in range(0, hd, LANES):
                if j < n:
                    store_f32(vt, (kh * KEY_TILE + j) * hd + d, load_row(values, src + d))
                    store_f32(row, 0, load_row(keys, src + d))
                else:
                    store_f32(vt, (kh * KEY_TILE + j) * hd + d, zeros_f32())
                    store_f32(row, 0, zeros_f32())
                for i in range(LANES):
                    kt[kh, b, d + i, j - b * LANES] = row[i]


@njit(inline="always")
def _tile_scores4(q, q0, q1, q2, q3, kt, ko, hd):
    """16 keys' dot products with each of four queries (flat offsets into q, hd long), from their
    transposed block at kt's flat ko (dim d of key j at ko + 16 d + j): each load of a dim's 16 keys
    taken by the four queries, a running sum over the dims each. (splat_at: a broadcast from memory;
    through a register, the queries' broadcasts shared the FMAs' port, 1.1-1.3x slower, measured.)"""
    a0, a1, a2, a3 = zeros_f32(), zeros_f32(), zeros_f32(), zeros_f32()
    for d in range(hd):
        k = load_f32(kt, ko + d * LANES)
        a0 = fma(splat_at(q, q0 + d), k, a0)
        a1 = fma(splat_at(q, q1 + d), k, a1)
        a2 = fma(splat_at(q, q2 + d), k, a2)
        a3 = fma(splat_at(q, q3 + d), k, a3)
    return a0, a1, a2, a3


@njit(inline="always")
def _weigh(block, i, k0, a, b, top, total):
    """Query i's scores in block[i] (keys k0 .. k0 + 15, of which it sees a .. b - 1) into weights
    against its new running top: (top, total, the correction of what it holds). A block it sees
    none of leaves it as it was (weights 0, correction 1)."""
    if k0 < a or k0 + LANES > b:
        for j in range(LANES):
            if k0 + j < a or k0 + j >= b:
                block[i, j] = -np.inf
    scores = load_f32(block[i], 0)
    block_top = hmax(scores)
    if block_top == -np.inf:
        store_f32(block[i], 0, zeros_f32())
        return top, total, np.float32(1)
    if block_top <= top:  # (mostly, after the first blocks: no rescaling)
        p = exp_f32(sub(scores, splat(top)))
        store_f32(block[i], 0, p)
        return top, total + hsum(p), np.float32(1)
    p = exp_f32(sub(scores, splat(block_top)))
    store_f32(block[i], 0, p)
    correction = np.float32(np.exp(top - block_top))
    return block_top, total * correction + hsum(p), correction


@njit(inline="always")
def _add_values4(block, vt, row, hd, out, o0, o1, o2, o3, c0, c1, c2, c3):
    """out[oi:oi + hd] = ci * out[oi:oi + hd] + sum over j of block[i, j] * value row j (vt's flat row
    + j * hd), for the four queries i: each load of a value row's 16 dims taken by the four."""
    for d in range(0, hd, LANES):
        a0, a1 = mul(load_f32(out, o0 + d), splat(c0)), mul(load_f32(out, o1 + d), splat(c1))
        a2, a3 = mul(load_f32(out, o2 + d), splat(c2)), mul(load_f32(out, o3 + d), splat(c3))
        for j in range(LANES):
            v = load_f32(vt, row + j * hd + d)
            a0 = fma(splat_at(block, j), v, a0)
            a1 = fma(splat_at(block, LANES + j), v, a1)
            a2 = fma(splat_at(block, 2 * LANES + j), v, a2)
            a3 = fma(splat_at(block, 3 * LANES + j), v, a3)
        store_f32(out, o0 + d, a0)
        store_f32(out, o1 + d, a1)
        store_f32(out, o2 + d, a2)
        store_f32(out, o3 + d, a3)


@njit(cache=True)
def _attend_tile(q, kt, vt, t0, n, start, t, count, window, scale, tops, totals, out):
    """Tokens t .. t + count - 1 (count <= 4; positions start + t ..) over the tile's positions t0 ..
    t0 + n - 1 that each sees, every head, four queries at a time: blocks of 16 keys on the tile's
    grid, each query's lanes outside its keys masked out. (Fewer than four: the last one repeats,
    the same sums written twice.)"""
    kv_heads, hd = kt.shape[0], kt.shape[2]
    width = q.shape[1]
    heads = width // hd
    group = heads // kv_heads
    ts = (t, min(t + 1, t + count - 1), min(t + 2, t + count - 1), min(t + 3, t + count - 1))
    lo = np.empty(4, np.int64)  # each query's keys in the tile: lo[i] .. hi[i] - 1
    hi = np.empty(4, np.int64)
    for i in range(4):
        length = start + ts[i] + 1
        lo[i] = max(t0, max(0, length - window) if window > 0 else 0)
        hi[i] = min(length, t0 + n)
    if lo[0] >= hi[3]:  # the first query's keys start first, the last's end last
        return
    flat_q, flat_out = q.reshape(q.size), out.reshape(out.size)
    block = np.empty((4, LANES), np.float32)
    scale = splat(scale)
    for h in range(heads):
        kh = h // group
        o0, o1, o2, o3 = ts[0] * width + h * hd, ts[1] * width + h * hd, ts[2] * width + h * hd, ts[3] * width + h * hd
        top0, top1, top2, top3 = tops[ts[0], h], tops[ts[1], h], tops[ts[2], h], tops[ts[3], h]
        tot0, tot1, tot2, tot3 = totals[ts[0], h], totals[ts[1], h], totals[ts[2], h], totals[ts[3], h]
        for k0 in range(lo[0] - (lo[0] - t0) % LANES, hi[3], LANES):
            row = (kh * KEY_TILE + k0 - t0) * hd
            s0, s1, s2, s3 = _tile_scores4(flat_q, o0, o1, o2, o3, kt, row, hd)
            store_f32(block[0], 0, mul(s0, scale))
            store_f32(block[1], 0, mul(s1, scale))
            store_f32(block[2], 0, mul(s2, scale))
            store_f32(block[3], 0, mul(s3, scale))
            top0, tot0, c0 = _weigh(block, 0, k0, lo[0], hi[0], top0, tot0)
            top1, tot1, c1 = _weigh(block, 1, k0, lo[1], hi[1], top1, tot1)
            top2, tot2, c2 = _weigh(block, 2, k0, lo[2], hi[2], top2, tot2)
            top3, tot3, c3 = _weigh(block, 3, k0, lo[3], hi[3], top3, tot3)
            _add_values4(block, vt, row, hd, flat_out, o0, o1, o2, o3, c0, c1, c2, c3)
        tops[ts[0], h], tops[ts[1], h], tops[ts[2], h], tops[ts[3], h] = top0, top1, top2, top3
        totals[ts[0], h], totals[ts[1], h], totals[ts[2], h], totals[ts[3], h] = tot0, tot1, tot2, tot3


@njit(parallel=True, cache=True)
def attend_causal(q, keys, values, start, window, scale, out):
    """Causal grouped-query attention of tokens at positions start.. (q, out: (tokens, heads * hd),
    C-contiguous) over keys/values (kv_heads, capacity, hd) that already hold them, each over the
    last `window` positions when window > 0; hd a multiple of 16. Over the keys in tiles (KEY_TILE):
    threads convert a tile's blocks, then take quads of queries in pairs from both ends, so each
    gets as many keys to read."""
    kv_heads, _, hd = rows_shape(keys)
    tokens, heads = q.shape[0], q.shape[1] // hd
    scale = np.float32(scale)
    lo = max(0, start + 1 - window) if window > 0 else 0
    lo -= lo % LANES
    tops = np.full((tokens, heads), -np.inf, np.float32)
    totals = np.zeros((tokens, heads), np.float32)
    kt = np.empty((kv_heads, KEY_TILE // LANES, hd, LANES), np.float32)
    vt = np.empty((kv_heads, KEY_TILE, hd), np.float32)
    out[:] = 0
    for t0 in range(lo, start + tokens, KEY_TILE):
        n = min(KEY_TILE, start + tokens - t0)
        for b in prange(KEY_TILE // LANES):
            _tile_block(keys, values, t0, n, np.int64(b), kt, vt)  # (int64: as in q4.py)
        quads = (tokens + 3) // 4
        for pair in prange((quads + 1) // 2):
            i = np.int64(pair)
            _attend_tile(q, kt, vt, t0, n, start, 4 * i, min(4, tokens - 4 * i), window, scale, tops, totals, out)
            if quads - 1 - i != i:
                j = quads - 1 - i
                _attend_tile(q, kt, vt, t0, n, start, 4 * j, min(4, tokens - 4 * j), window, scale, tops, totals, out)
    for t in prange(tokens):
        for h in range(heads):
            out[t, h * hd:(h + 1) * hd] *= np.float32(1) / totals[t, h]
