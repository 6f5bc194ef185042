"""The Numba ops of the fused decode step against their numpy references (kernels/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.kernels import reference as ref
from edgeinfer.kernels.kv_rows import CACHE_TYPES, Q8Rows, as_float32, new_rows, quantize_rows
from edgeinfer.kernels.ops import (PART_KEYS, attend_causal, attend_one, attend_rows, gated_activation_into, key_parts,
                                  rmsnorm_heads_in_place, rmsnorm_into, rope_in_place, rope_rows)

rng = np.random.default_rng(7)


def test_rmsnorm():
    x, w = rng.standard_normal(576).astype(np.float32), rng.standard_normal(576).astype(np.float32)
    out = np.empty_like(x)
    rmsnorm_into(x, w, 1e-5, out)
    np.testing.assert_allclose(out, ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("position", [0, 17, 4095])
@pytest.mark.parametrize("rotary,amplitude", [(64, 1.0), (48, 1.15)], ids=["full", "partial-longrope"])
def test_rope(position, rotary, amplitude):
    """RoPE of one token, over all of each head's dims or (Phi-4-mini) its first 48 of 64, with the
    pairs' amplitude (LongRoPE's attention factor): the passing dims are untouched."""
    rope = ref.rope_of(1.0 / (10000.0 ** (np.arange(0, rotary, 2) / rotary)), amplitude)
    q = rng.standard_normal(9 * 64).astype(np.float32)
    rotated = q.copy()
    rope_in_place(rotated, 9, rope, position)
    cos, sin = ref.rope_tables(rope, np.array([position]))
    np.testing.assert_allclose(rotated, ref.apply_rope(q.reshape(9, 1, 64), cos, sin).reshape(-1), atol=1e-6)
    np.testing.assert_array_equal(rotated.reshape(9, 64)[:, rotary:], q.reshape(9, 64)[:, rotary:])


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_gated_activations(kind):
    g, u = rng.standard_normal(1539).astype(np.float32) * 4, rng.standard_normal(1539).astype(np.float32)
    out = np.empty_like(g)
    gated_activation_into(g, u, kind == "gelu_tanh", out)
    np.testing.assert_allclose(out, ref.GATED_ACTIVATIONS[kind](g, u), rtol=1e-5, atol=1e-6)


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_gated_activation_references_against_torch(kind):
    import torch

    g, u = rng.standard_normal(1539).astype(np.float32) * 4, rng.standard_normal(1539).astype(np.float32)
    act = torch.nn.functional.silu if kind == "silu" else lambda x: torch.nn.functional.gelu(x, approximate="tanh")
    np.testing.assert_allclose(ref.GATED_ACTIVATIONS[kind](g, u), (act(torch.from_numpy(g)) * torch.from_numpy(u)).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_rmsnorm_of_each_head():
    x, w = rng.standard_normal(4 * 64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    expected = ref.rmsnorm_heads(x[None], w, 1e-6)[0]
    rmsnorm_heads_in_place(x, 4, w, 1e-6)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)


def test_q8_0_rows_are_llama_cpp_s_blocks():
    """A q8_0 cache row: per 32 values d = max|x| / 127 and x * (1 / d) rounded to nearest even, as
    llama.cpp's vector code quantizes (its scale kept in float32 here); an all-zero block stays zero."""
    x = rng.standard_normal((3, 5, 96)).astype(np.float32) * np.float32(3)
    x[1, 2, 32:64] = 0
    x[2, 0, :32] = np.arange(32, dtype=np.float32) - 15.5  # d = 1 with the 127 below: halves are ties
    x[2, 0, 0] = 127
    rows = new_rows(x.shape, "q8_0")
    quantize_rows(x, rows)
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    np.testing.assert_array_equal(rows.quants.reshape(-1, 32), np.round(blocks * inv[:, None]).astype(np.int8))
    np.testing.assert_array_equal(rows.scales.reshape(-1), d)
    assert not rows.quants[1, 2, 32:64].any() and rows.scales[1, 2, 1] == 0
    assert list(rows.quants[2, 0, 13:19]) == [-2, -2, 0, 0, 2, 2]  # -2.5, -1.5, -.5, .5, 1.5, 2.5: to even
    error = np.abs(as_float32(rows) - x).reshape(-1, 32)
    assert np.all(error <= d[:, None] * 0.5 * 1.0001)  # within half a step


def _cache_rows(x: np.ndarray, cache_type: str):
    """x stored in a cache of `cache_type` (as the kernels write it) and what it holds as float32."""
    rows = new_rows(x.shape, cache_type)
    quantize_rows(x, rows)
    return rows, as_float32(rows)


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
@pytest.mark.parametrize("heads,kv_heads,length,window", [(9, 3, 1, 0), (9, 3, 40, 0), (4, 4, 300, 0), (8, 1, 17, 0),
                                                          (4, 2, 300, 64), (4, 2, 30, 64),
                                                          # spans cut into parts (key_parts): 2, 4, 2 over a window
                                                          (9, 3, 2 * PART_KEYS + 37, 0), (4, 1, 5 * PART_KEYS - 3, 0),
                                                          (4, 2, 3 * PART_KEYS, 2 * PART_KEYS + 5)])
def test_attention_of_one_token(heads, kv_heads, length, window, cache_type):
    hd, capacity = 64, max(320, length + 3)
    q = rng.standard_normal(heads * hd).astype(np.float32)
    (keys, k), (values, v) = (_cache_rows(rng.standard_normal((kv_heads, capacity, hd)).astype(np.float32), cache_type)
                              for _ in range(2))
    assert isinstance(keys, Q8Rows) == (cache_type == "q8_0")
    out, scores = np.empty_like(q), np.empty((heads, capacity), np.float32)
    attend_one(q, keys, values, max(0, length - window) if window else 0, length, 0.1, scores, out)
    expected = ref.causal_attention(q.reshape(heads, 1, hd), k[:, :length], v[:, :length], length - 1, window, 0.1)
    np.testing.assert_allclose(out, expected.reshape(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_type", ["f32", "f16"])
@pytest.mark.parametrize("hd", [48, 96, 128])
@pytest.mark.parametrize("heads,kv_heads,length", [(4, 4, 40), (6, 2, 2 * PART_KEYS + 37), (10, 2, 40)])
def test_attention_of_one_token_at_other_head_sizes(heads, kv_heads, length, hd, cache_type):
    """The value pass takes a 64-dim block of four heads or two (ops.VALUE_HEADS) at a time, a head
    alone in its group two blocks at a time (a 128-dim head's halves) or one, and 16 dims at a
    time past a head's whole 64s (Phi-3's 96)."""
    capacity = length + 3
    q = rng.standard_normal(heads * hd).astype(np.float32)
    (keys, k), (values, v) = (_cache_rows(rng.standard_normal((kv_heads, capacity, hd)).astype(np.float32), cache_type)
                              for _ in range(2))
    out, scores = np.empty_like(q), np.empty((heads, capacity), np.float32)
    attend_one(q, keys, values, 0, length, 0.1, scores, out)
    expected = ref.causal_attention(q.reshape(heads, 1, hd), k[:, :length], v[:, :length], length - 1, 0, 0.1)
    np.testing.assert_allclose(out, expected.reshape(-1), rtol=1e-5, atol=1e-5)


def test_a_batch_of_rows_attends_as_one_token_does_bit_for_bit():
    """attend_rows (a server's decode step, a thread per row and KV head, a long span's parts one
    after the other) gives each row attend_one's bits (its parts on threads of their own)."""
    heads, kv_heads, hd, capacity = 8, 2, 64, 3 * PART_KEYS
    lengths = np.array([5, PART_KEYS + 1, 2 * PART_KEYS + 9, 3 * PART_KEYS], np.int64)
    assert [key_parts(int(n), kv_heads) for n in lengths] == [1, 1, 2, 3]
    keys, values = (_cache_rows(rng.standard_normal((len(lengths), kv_heads, capacity, hd)).astype(np.float32), "f16")[0]
                    for _ in range(2))
    q = rng.standard_normal((len(lengths), heads * hd)).astype(np.float32)
    out = np.empty_like(q)
    attend_rows(q, keys, values, np.arange(len(lengths)), np.zeros_like(lengths), lengths, 0.125,
                np.empty((len(lengths), heads, capacity), np.float32), out)
    for r, n in enumerate(lengths):
        alone = np.empty(heads * hd, np.float32)
        attend_one(q[r], keys[r], values[r], 0, int(n), 0.125, np.empty((heads, capacity), np.float32), alone)
        np.testing.assert_array_equal(out[r], alone)


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
@pytest.mark.parametrize("heads,kv_heads,tokens,start,window", [(9, 3, 37, 20, 0), (4, 4, 1, 0, 0), (8, 1, 16, 0, 0),
                                                                (4, 2, 70, 3, 0), (4, 2, 70, 30, 17), (2, 1, 9, 0, 4),
                                                                (4, 2, 301, 250, 0), (2, 1, 290, 7, 261)])
def test_causal_attention_of_a_batch(heads, kv_heads, tokens, start, window, cache_type):
    """Against numpy, every query's keys: one tile of keys and several (ops.KEY_TILE), query counts not
    a multiple of 4, windows that start inside a tile's block."""
    hd, capacity = 32, max(128, start + tokens + 5)
    q = rng.standard_normal((tokens, heads * hd)).astype(np.float32)
    (keys, k), (values, v) = (_cache_rows(rng.standard_normal((kv_heads, capacity, hd)).astype(np.float32), cache_type)
                              for _ in range(2))
    out = np.empty_like(q)
    attend_causal(q, keys, values, start, window, 1 / np.sqrt(hd), out)
    keys, values = k, v
    per_head = q.reshape(tokens, heads, hd).transpose(1, 0, 2)
    expected = ref.causal_attention(per_head, keys[:, :start + tokens], values[:, :start + tokens], start, window)
    np.testing.assert_allclose(out, expected.transpose(1, 0, 2).reshape(tokens, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary,amplitude", [(64, 1.0), (48, 1.15)], ids=["full", "partial-longrope"])
def test_rope_of_a_batch(rotary, amplitude):
    rope = ref.rope_of(1.0 / (10000.0 ** (np.arange(0, rotary, 2) / rotary)), amplitude)
    x = rng.standard_normal((11, 3 * 64)).astype(np.float32)
    cos, sin = ref.rope_tables(rope, np.arange(40, 51))
    rotated = x.copy()
    rope_rows(rotated, cos, sin, 64)
    expected = ref.apply_rope(x.reshape(11, 3, 64).transpose(1, 0, 2), cos, sin).transpose(1, 0, 2).reshape(11, -1)
    np.testing.assert_allclose(rotated, expected, atol=1e-6)


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
def test_kv_cache_bytes_of_each_type(cache_type):
    """The memory plan's KV cache size is what the cache holds: q8_0 is 36 bytes per 32 values."""
    from types import SimpleNamespace

    from edgeinfer.kv_cache import KVCache

    config = SimpleNamespace(num_layers=3, num_kv_heads=2, num_heads=4, head_dim=64, window=lambda layer: 0)
    cache = KVCache(config, 100, cache_type=cache_type, kernels=True)
    assert cache.nbytes == KVCache.size(config, 100, cache_type, None)
    assert cache.nbytes == 2 * 3 * 2 * 100 * 64 * {"f32": 4, "f16": 2, "q8_0": 36 / 32}[cache_type]
