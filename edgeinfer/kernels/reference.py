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


GELU_C = np.float32(np.sqrt(2.0 / np.pi))


def gelu_tanh_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (PyTorch's approximate="tanh"), of the gate, times up."""
    return (np.float32(0.5) * gate * (1 + np.tanh(GELU_C * (gate + np.float32(0.044715) * gate * gate * gate)))) * up


GATED_ACTIVATIONS = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}


def rmsnorm_heads(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of each head of x (tokens, heads * hd) with one weight (hd,) for all heads."""
    hd = weight.shape[0]
    return rmsnorm(x.reshape(x.shape[0], -1, hd), weight, eps).reshape(x.shape)


def rope_of(inv_freq: np.ndarray, amplitude: float = 1.0) -> np.ndarray:
    """A RoPE table (config.rope_table): the pairs' inverse frequencies and amplitudes (2, pairs)."""
    return np.stack([inv_freq, np.full_like(inv_freq, amplitude, dtype=np.float64)])


def rope_tables(rope: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of shape (T, rotary dims) times the pairs' amplitudes, halves repeated
    (rotate-half convention), from a RoPE table (2, pairs)."""
    angles = np.outer(positions.astype(np.float64), rope[0])
    amplitude = np.concatenate([rope[1], rope[1]])
    angles = np.concatenate([angles, angles], axis=-1)
    return (np.cos(angles) * amplitude).astype(np.float32), (np.sin(angles) * amplitude).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (heads, T, head_dim); rotates each pair (i, i + rotary/2) of the first rotary =
    cos.shape[-1] dims (all of them, or a partial rotary's); the rest pass unchanged."""
    rotary = cos.shape[-1]
    half = rotary // 2
    part = x[..., :rotary]
    rotated = np.concatenate([-part[..., half:], part[..., :half]], axis=-1)
    return np.concatenate([part * cos + rotated * sin, x[..., rotary:]], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, window: int = 0,
                     scale: float | None = None) -> np.ndarray:
    """Grouped-query causal attention, over the last `window` positions (the query's own included)
    when window > 0.

    q: (heads, T, hd) for positions start..start+T-1; keys, values: (kv_heads, start+T, hd).
    Returns (heads, T, hd).
    """
    heads, T, hd = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    scale = np.float32(1.0 / np.sqrt(hd) if scale is None else scale)
    out = np.empty_like(q)
    qg = q.reshape(kv_heads, group, T, hd)
    og = out.reshape(kv_heads, group, T, hd)
    for t0 in range(0, T, QUERY_BLOCK):
        t1 = min(T, t0 + QUERY_BLOCK)
        visible = start + t1  # the last query of the block sees keys [0, start + t1)
        scores = np.matmul(qg[:, :, t0:t1], keys[:, None, :visible].swapaxes(-1, -2)) * scale
        query_pos = start + np.arange(t0, t1)[:, None]
        key_pos = np.arange(visible)[None, :]
        seen = (key_pos <= query_pos) & ((key_pos > query_pos - window) if window else True)
        scores = np.where(seen, scores, -np.inf)
        og[:, :, t0:t1] = np.matmul(softmax(scores).astype(np.float32), values[:, None, :visible])
    return out
