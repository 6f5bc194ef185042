"""Exact float32 reference ops in numpy: the ground truth for every faster kernel."""

from __future__ import annotations

import numpy as np

# Queries per attention block: bounds the score matrix to QUERY_BLOCK x context per head.
QUERY_BLOCK = 256


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(variance + eps)).astype(np.float32) * weight


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    y = x @ weight.T
    return y + bias if bias is not None else y


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return gate / (1.0 + np.exp(-gate)) * up


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of shape (T, head_dim), halves repeated (rotate-half convention)."""
    angles = np.outer(positions.astype(np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (heads, T, head_dim); rotates each pair (i, i + head_dim/2)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
    """Grouped-query causal attention.

    q: (heads, T, hd) for positions start..start+T-1; keys, values: (kv_heads, start+T, hd).
    Returns (heads, T, hd).
    """
    heads, T, hd = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    scale = np.float32(1.0 / np.sqrt(hd))
    out = np.empty_like(q)
    qg = q.reshape(kv_heads, group, T, hd)
    og = out.reshape(kv_heads, group, T, hd)
    for t0 in range(0, T, QUERY_BLOCK):
        t1 = min(T, t0 + QUERY_BLOCK)
        visible = start + t1  # the last query of the block sees keys [0, start + t1)
        scores = np.matmul(qg[:, :, t0:t1], keys[:, None, :visible].swapaxes(-1, -2)) * scale
        query_pos = start + np.arange(t0, t1)[:, None]
        scores = np.where(np.arange(visible)[None, :] <= query_pos, scores, -np.inf)
        og[:, :, t0:t1] = np.matmul(softmax(scores).astype(np.float32), values[:, None, :visible])
    return out
