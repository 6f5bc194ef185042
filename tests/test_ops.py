"""The Numba ops of the fused decode step against their numpy references (kernels/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.kernels import reference as ref
from edgeinfer.kernels.ops import attend_one, rmsnorm_into, rope_in_place, silu_mul_into

rng = np.random.default_rng(7)


def test_rmsnorm():
    x, w = rng.standard_normal(576).astype(np.float32), rng.standard_normal(576).astype(np.float32)
    out = np.empty_like(x)
    rmsnorm_into(x, w, 1e-5, out)
    np.testing.assert_allclose(out, ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("position", [0, 17, 4095])
def test_rope(position):
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, 64, 2) / 64))
    q = rng.standard_normal(9 * 64).astype(np.float32)
    rotated = q.copy()
    rope_in_place(rotated, 9, inv_freq, position)
    cos, sin = ref.rope_tables(inv_freq, np.array([position]))
    np.testing.assert_allclose(rotated, ref.apply_rope(q.reshape(9, 1, 64), cos, sin).reshape(-1), atol=1e-6)


def test_silu_mul():
    g, u = rng.standard_normal(1536).astype(np.float32) * 4, rng.standard_normal(1536).astype(np.float32)
    out = np.empty_like(g)
    silu_mul_into(g, u, out)
    np.testing.assert_allclose(out, ref.silu_mul(g, u), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,length", [(9, 3, 1), (9, 3, 40), (4, 4, 300), (8, 1, 17)])
def test_attention_of_one_token(heads, kv_heads, length):
    hd, capacity = 64, 320
    q = rng.standard_normal(heads * hd).astype(np.float32)
    keys, values = (rng.standard_normal((kv_heads, capacity, hd)).astype(np.float32) for _ in range(2))
    out, scores = np.empty_like(q), np.empty(capacity, np.float32)
    attend_one(q, keys, values, length, scores, out)
    expected = ref.causal_attention(q.reshape(heads, 1, hd), keys[:, :length], values[:, :length], length - 1)
    np.testing.assert_allclose(out, expected.reshape(-1), rtol=1e-5, atol=1e-5)
