"""LUT attention (NoMAD-Attention): attention scores by table lookups on product-quantised keys.

A key head of `hd` dimensions is cut into S = hd / d_sub sub-vectors; each sub-space has 16
centroids (a codebook per layer and KV head), so a key is S 4-bit codes. For a query, the table
LUT[s][c] = q_s . centroid[s][c] makes the key's score the sum over s of LUT[s][code_s]: no
multiplications per key. The tables are quantised to 8 bits (a minimum per sub-space, one step for
all), so that vpshufb looks up 64 keys of a sub-space at once from a 16-byte table held in a
register, and the sums accumulate in 16-bit lanes.

RoPE turns a key's slow dimension pairs further the later its position, so one codebook cannot fit
position 100 and position 7000 alike (measured in bench/RESULTS.md). Each (layer, KV head) has a
codebook per band of positions: [0, 512), then octaves [512, 1024),
[1024, 2048), ..., the last band open-ended. A query builds one table per band it reaches.

Codes are stored for the kernel: keys in blocks of 64, and within a block, for each pair of
sub-spaces (2j, 2j+1), the 64 keys' bytes `code[2j] | code[2j+1] << 4` side by side.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .ops import key_parts, merge_parts, part_sums, values_part
from .simd import (add, add_i16, div, fma, hi_nibbles, hmax, hsum, lo_nibbles, load_f32, load_i8, min_f32, mul, neg,
                   prefetch, shuffle_bytes, splat, store_f32, store_i16, store_truncated_u8, sub, widen_hi, widen_lo,
                   zeros_f32, zeros_i16)

KEYS_PER_BLOCK = 64
CENTROIDS = 16
SINK_KEYS = 4  # the first keys score exactly (attend_one_lut), where attention piles up
RECENT_KEYS = 64  # and so do the last ones before the query, where most heads look most
EXACT_SLOTS = SINK_KEYS + RECENT_KEYS  # float keys a LUT cache keeps per layer and KV head
BLOCKS_AHEAD = 2  # blocks of codes lut_sums prefetches ahead (4 KB at hd 64, d_sub 1)
FIRST_BAND = 512  # positions below share the first codebook; each further band is an octave


@njit(cache=True)
def band_start(band):
    return 0 if band == 0 else FIRST_BAND << (band - 1)


@njit(cache=True)
def band_of(position, bands):
    band = 0
    while band + 1 < bands and position >= band_start(band + 1):
        band += 1
    return band


@njit(cache=True)
def exact_slot(position):
    """Where a LUT cache keeps the float key of `position`: the sinks, then a ring of the recent ones."""
    return position if position < SINK_KEYS else SINK_KEYS + position % RECENT_KEYS


@njit(cache=True)
def keep_exact_key(keys, new_keys, j, position):
    """new_keys[:, j] (kv_heads, count, hd), the key of `position`, into its slot of keys
    (kv_heads, EXACT_SLOTS, hd); a query at `position` or up to RECENT_KEYS - 1 later still sees it."""
    for kh in range(keys.shape[0]):
        keys[kh, exact_slot(position), :] = new_keys[kh, j, :]


def bands_for(span: int) -> int:
    """How many bands cover positions [0, span)."""
    bands = 1
    while band_start(bands) < span:
        bands += 1
    return bands


def fit_codebooks(keys: np.ndarray, d_sub: int, iterations: int = 40, seed: int = 0) -> np.ndarray:
    """k-means (k-means++ seeding, then Lloyd; seeded, deterministic) of each sub-space of keys
    (n, hd): (S, 16, d_sub). Seeding from random keys left the tails without centroids (perplexity
    in bench/RESULTS.md)."""
    n, hd = keys.shape
    subs = np.ascontiguousarray(keys.reshape(n, hd // d_sub, d_sub).transpose(1, 0, 2), dtype=np.float32)
    centroids = _kmeans_pp(subs, np.random.default_rng(seed))
    _lloyd(subs, centroids, iterations)
    return centroids


@njit(parallel=True, cache=True)
def _lloyd(subs, centroids, iterations):
    """Lloyd iterations in place on centroids (S, 16, d_sub) over subs (S, n, d_sub), sub-spaces on
    all threads, each until no assignment changes (at most `iterations`); an empty cell keeps its
    centroid. 4.5x numpy's bincount version (8000 keys, d_sub 1: 0.7 vs 3.2 s a fit, one run)."""
    s_count, n, d_sub = subs.shape
    for s in prange(s_count):
        sums = np.zeros((CENTROIDS, d_sub))
        counts = np.zeros(CENTROIDS, np.int64)
        assigned = np.full(n, -1, np.int64)
        for _ in range(iterations):
            sums[:] = 0
            counts[:] = 0
            changed = False
            for j in range(n):
                best = nearest_centroid(subs[s, j], centroids[s])
                changed |= best != assigned[j]
                assigned[j] = best
                counts[best] += 1
                for i in range(d_sub):
                    sums[best, i] += subs[s, j, i]
            if not changed:
                break
            for c in range(CENTROIDS):
                if counts[c]:
                    for i in range(d_sub):
                        centroids[s, c, i] = sums[c, i] / counts[c]


@njit(cache=True)
def nearest_centroid(x, centroids):
    """The index of the centroid (16, d_sub) nearest to x (d_sub,); the first of equals."""
    best, best_distance = 0, np.float32(np.inf)
    for c in range(CENTROIDS):
        distance = np.float32(0)
        for i in range(x.shape[0]):
            diff = x[i] - centroids[c, i]
            distance += diff * diff
        if distance < best_distance:
            best, best_distance = c, distance
    return best


def _kmeans_pp(subs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """16 starting centroids per sub-space, each next one drawn with probability proportional to
    the squared distance to the nearest one so far (all sub-spaces at once)."""
    s_count, n, _ = subs.shape
    rows = np.arange(s_count)
    centroids = np.empty((s_count, CENTROIDS, subs.shape[2]), np.float32)
    centroids[:, 0] = subs[rows, rng.integers(n, size=s_count)]
    nearest = ((subs - centroids[:, :1]) ** 2).sum(axis=2)  # (S, n)
    for j in range(1, CENTROIDS):
        weights = np.cumsum(nearest.astype(np.float64), axis=1)
        drawn = rng.random(s_count) * weights[:, -1]
        pick = np.minimum((weights < drawn[:, None]).sum(axis=1), n - 1)
        centroids[:, j] = subs[rows, pick]
        nearest = np.minimum(nearest, ((subs - centroids[:, j:j + 1]) ** 2).sum(axis=2))
    return centroids


def _assign(subs: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid of each sub-vector: |x - c|^2 = |x|^2 - 2 x.c + |c|^2, |x|^2 left out."""
    distances = (centroids ** 2).sum(axis=2)[:, None, :] - 2 * np.matmul(subs, centroids.transpose(0, 2, 1))
    return distances.argmin(axis=2)  # (S, n)


def encode_keys(keys: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """Keys (n, hd) -> codes (n, S) uint8: the nearest centroid of each sub-space."""
    n, hd = keys.shape
    subs = keys.reshape(n, codebooks.shape[0], codebooks.shape[2]).transpose(1, 0, 2)
    return _assign(subs, codebooks).T.astype(np.uint8)


def pack_codes(codes: np.ndarray, capacity: int | None = None) -> np.ndarray:
    """Codes (n, S) -> the kernel's layout (blocks, S/2, 64), zero-padded to whole blocks (or capacity)."""
    n, s = codes.shape
    blocks = -(-(capacity or n) // KEYS_PER_BLOCK)
    padded = np.zeros((blocks * KEYS_PER_BLOCK, s), np.uint8)
    padded[:n] = codes
    pairs = padded[:, 0::2] | (padded[:, 1::2] << 4)  # (keys, S/2)
    return np.ascontiguousarray(pairs.reshape(blocks, KEYS_PER_BLOCK, s // 2).transpose(0, 2, 1))


@njit(cache=True)
def build_tables(q, qo, codebooks, tables):
    """LUT of the query q[qo:qo + hd] against codebooks (S, 16, d_sub), quantised to uint8 and
    repeated in the 4 lanes of tables (S, 64). Returns (step, offset): score = step * sum + offset.
    A sub-space's 16 centroids are one vector (one entry at a time, this took as long as a head's
    lookups over 16k keys)."""
    s_count, _, d_sub = codebooks.shape
    books, flat = codebooks.reshape(codebooks.size), tables.reshape(tables.size)
    lut = np.empty(s_count * CENTROIDS, np.float32)
    offset, widest = np.float32(0), np.float32(0)
    for s in range(s_count):
        at = s * CENTROIDS
        if d_sub == 1:
            row = mul(splat(q[qo + s]), load_f32(books, at))
        else:
            for c in range(CENTROIDS):
                v = np.float32(0)
                for i in range(d_sub):
                    v += q[qo + s * d_sub + i] * books[(at + c) * d_sub + i]
                lut[at + c] = v
            row = load_f32(lut, at)
        low = -hmax(neg(row))
        row = sub(row, splat(low))
        store_f32(lut, at, row)
        widest = max(widest, hmax(row))
        offset += low
    step = widest / np.float32(255) if widest > 0 else np.float32(1)
    for s in range(s_count):
        byte = min_f32(add(div(load_f32(lut, s * CENTROIDS), splat(step)), splat(np.float32(0.5))),
                       splat(np.float32(255)))
        for lane in range(4):
            store_truncated_u8(flat, s * KEYS_PER_BLOCK + lane * CENTROIDS, byte)
    return step, offset


@njit(cache=True)
def lut_sums(tables, codes, first_block, end_block, out):
    """out[k] = sum over s of tables[s][code of key k in s], for the keys of blocks first..end-1."""
    pairs = codes.shape[1]
    for b in range(first_block, end_block):
        acc_lo, acc_hi = zeros_i16(), zeros_i16()
        for j in range(pairs):
            prefetch(codes, ((b + BLOCKS_AHEAD) * pairs + j) * KEYS_PER_BLOCK)
            packed = load_i8(codes, (b * pairs + j) * KEYS_PER_BLOCK)
            first = shuffle_bytes(load_i8(tables, 2 * j * KEYS_PER_BLOCK), lo_nibbles(packed))
            second = shuffle_bytes(load_i8(tables, (2 * j + 1) * KEYS_PER_BLOCK), hi_nibbles(packed))
            acc_lo = add_i16(acc_lo, add_i16(widen_lo(first), widen_lo(second)))
            acc_hi = add_i16(acc_hi, add_i16(widen_hi(first), widen_hi(second)))
        store_i16(out, b * KEYS_PER_BLOCK, acc_lo)
        store_i16(out, b * KEYS_PER_BLOCK + 32, acc_hi)


@njit(parallel=True, cache=True)
def attend_one_lut(q, codebooks, codes, keys, values, length, tables, sums, scores, out):
    """As ops.attend_one, with scores from LUTs: codebooks (kv_heads, bands, S, 16, d_sub), codes
    (kv_heads, blocks, S/2, 64), values (kv_heads, capacity, hd) float32 or fp16 bits; scratch per
    head: tables (heads, S, 64) uint8, sums (heads, >= length rounded to 64) uint16, scores (heads,
    >= length). The first SINK_KEYS keys and the last RECENT_KEYS score exactly, from keys (kv_heads,
    EXACT_SLOTS, hd) kept by keep_exact_key (what each costs in perplexity: bench/RESULTS.md).
    The scores take a thread per query head (SmolLM2's 3 KV heads on 2 threads left one idle a third
    of the time, measured); the values, as attend_one's, (KV head, part of the keys) pairs, each value
    row taken by all the query heads of its KV head while it is in L1."""
    kv_heads, _, hd = values.shape
    bands = codebooks.shape[1]
    heads = q.shape[0] // hd
    group = heads // kv_heads
    scale = np.float32(1.0 / np.sqrt(hd))
    for h in prange(heads):
        kh, qo = h // group, h * hd
        scores_h, sums_h = scores[h], sums[h]
        for band in range(bands):
            first = band_start(band)
            if first >= length:
                break
            end = length if band == bands - 1 else min(length, band_start(band + 1))
            step, offset = build_tables(q, qo, codebooks[kh, band], tables[h])
            lut_sums(tables[h], codes[kh], first // KEYS_PER_BLOCK, -(-end // KEYS_PER_BLOCK), sums_h)
            for t in range(first, end):
                scores_h[t] = (np.float32(sums_h[t]) * step + offset) * scale
        for t in range(min(SINK_KEYS, length)):
            scores_h[t] = exact_score(q, qo, keys, kh, t) * scale
        for t in range(max(SINK_KEYS, length - RECENT_KEYS), length):
            scores_h[t] = exact_score(q, qo, keys, kh, t) * scale
    parts = key_parts(length, kv_heads)
    partial, tops, totals = part_sums(parts, heads, hd)
    for task in prange(kv_heads * parts):
        kh, p = task // parts, task % parts
        values_part(scores, values, length, kh, p, parts, group, partial[p], tops[p], totals[p])
    for kh in range(kv_heads):
        merge_parts(partial, tops, totals, kh * group, group, hd, out)


@njit(cache=True)
def exact_score(q, qo, keys, kh, position):
    slot, hd = exact_slot(position), keys.shape[2]
    acc = zeros_f32()
    for d in range(0, hd, 16):
        acc = fma(load_f32(q, qo + d), load_f32(keys, (kh * keys.shape[1] + slot) * hd + d), acc)
    return hsum(acc)


def lut_sums_reference(tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The same integer sums in numpy, from codes (n, S) and the tables' first lane."""
    return tables[np.arange(codes.shape[1])[None, :], codes.astype(np.int64)].astype(np.int64).sum(axis=1)


@njit(cache=True)
def attend_causal_lut(q, new_keys, codebooks, codes, keys, values, start, tables, sums, scores, out):
    """Tokens at positions start.. (q, out: (tokens, heads * hd); their keys new_keys (kv_heads,
    tokens, hd), already encoded), each over the keys up to itself: a token's float key is kept just
    before it attends, so that the ring of recent keys holds what each query needs."""
    for t in range(q.shape[0]):
        keep_exact_key(keys, new_keys, t, start + t)
        attend_one_lut(q[t], codebooks, codes, keys, values, start + t + 1, tables, sums, scores, out[t])


@njit(cache=True)
def encode_keys_into(keys, codebooks, codes, first):
    """Codes of keys (kv_heads, count, hd), the keys of positions first..first+count-1, into codes
    (kv_heads, blocks, S/2, 64): the nearest centroid of each sub-space in the position's band's
    codebook (codebooks: kv_heads, bands, S, 16, d_sub), as encode_keys picks it."""
    kv_heads, bands, s_count, _, d_sub = codebooks.shape
    for kh in range(kv_heads):
        for j in range(keys.shape[1]):
            p = first + j
            band = band_of(p, bands)
            block, k = p // KEYS_PER_BLOCK, p % KEYS_PER_BLOCK
            for s in range(s_count):
                best = nearest_centroid(keys[kh, j, s * d_sub:(s + 1) * d_sub], codebooks[kh, band, s])
                byte = codes[kh, block, s // 2, k]
                codes[kh, block, s // 2, k] = (byte & 0xF0) | best if s % 2 == 0 else (byte & 0x0F) | (best << 4)


def lut_buffers(codebooks: np.ndarray | None, heads: int, capacity: int) -> tuple:
    """A KV cache's LUT side: (codebooks (kv_heads, bands, S, 16, d_sub), codes, tables, sums), all
    empty for exact attention."""
    if codebooks is None:
        return (np.zeros((0, 1, 1, CENTROIDS, 1), np.float32), np.zeros((0, 1, 1, KEYS_PER_BLOCK), np.uint8),
                np.zeros((0, 1, KEYS_PER_BLOCK), np.uint8), np.zeros((0, KEYS_PER_BLOCK), np.uint16))
    kv_heads, _, s_count = codebooks.shape[:3]
    blocks = -(-capacity // KEYS_PER_BLOCK)
    return (codebooks, np.zeros((kv_heads, blocks, s_count // 2, KEYS_PER_BLOCK), np.uint8),
            np.zeros((heads, s_count, KEYS_PER_BLOCK), np.uint8), np.zeros((heads, blocks * KEYS_PER_BLOCK), np.uint16))
