"""`edgeinfer calibrate`: fit LUT attention's key codebooks on a text and store them in the model file.

The model runs over the text in windows of `ctx` tokens from an empty cache; the keys each layer
puts in the cache (after RoPE) are what the codebooks must represent, the first SINK_KEYS of each
window excepted (they score exactly). Codebooks come per band of positions (lut_attention.py), and a
window of 512 only shows keys at positions below 512; so for each band every key is turned, by RoPE
of the difference, to a position drawn uniformly from the band: the same content at the positions it
will be met at. The bands reach `span`, the longest context the codebooks are to serve (later
positions use the last band). For each layer, KV head and band, each sub-space of d_sub dimensions
gets 16 centroids by k-means (seeded, so the same text gives the same file). The output is the
model's single file with the codebooks added (written to a temporary name, then renamed).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import EdgeInferError
from .kernels.lut_attention import SINK_KEYS, band_start, bands_for, fit_codebooks
from .kernels.reference import apply_rope, rope_of, rope_tables
from .model import Model
from .storage.source import KeyCodebooks, WeightSource

D_SUBS = (1, 2, 4)


def collect_keys(model: Model, ids: list[int], ctx: int, max_tokens: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per layer, the keys (kv_heads, n, head_dim) the model produced over the first max_tokens of ids
    but the first SINK_KEYS of each window, and the positions (n,) they were at."""
    ids = ids[:max_tokens]
    if len(ids) < 16:
        raise EdgeInferError(f"the calibration text has {len(ids)} tokens; it needs at least 16")
    c = model.config
    per_layer: list[list[np.ndarray]] = [[] for _ in range(c.num_layers)]
    positions = []
    cache = model.new_cache(ctx, rings=False)  # every key, the local layers' too
    for start in range(0, len(ids), ctx):
        window = np.asarray(ids[start:start + ctx])
        cache.truncate(0)
        model.forward(window, cache)
        for layer in range(c.num_layers):
            per_layer[layer].append(cache.float_keys(layer, SINK_KEYS, len(window)))
        positions.append(np.arange(SINK_KEYS, len(window)))
    return [np.concatenate(keys, axis=1) for keys in per_layer], np.concatenate(positions)


def spread_keys(keys: np.ndarray, positions: np.ndarray, targets: np.ndarray, rope: np.ndarray) -> np.ndarray:
    """Keys (kv_heads, n, head_dim) after RoPE at `positions`, as they would be at `targets`: RoPE
    rotates each pair by position x frequency, so turning by the difference moves a key (a pure
    turn: the pairs' amplitudes are in the keys already)."""
    cos, sin = rope_tables(rope_of(rope[0]), targets - positions)
    return apply_rope(keys, cos, sin)


def calibrate(model: Model, ids: list[int], d_sub: int, ctx: int = 512, max_tokens: int = 8192, span: int = 0,
              progress: Callable[[int, int], None] | None = None) -> KeyCodebooks:
    """span: the longest context the codebooks serve (0: the model's)."""
    if d_sub not in D_SUBS:
        raise EdgeInferError(f"--d-sub must be 1, 2 or 4, got {d_sub}")
    if model.config.head_dim % (2 * d_sub):
        raise EdgeInferError(f"head dimension {model.config.head_dim} does not split into pairs of {d_sub}-wide "
                             "sub-spaces")
    if span and span < 16:
        raise EdgeInferError(f"--span must be at least 16, got {span}")
    keys, positions = collect_keys(model, ids, ctx, max_tokens)
    span = span or model.config.max_context
    bands = bands_for(span)
    rng = np.random.default_rng(0)
    targets = [rng.integers(max(SINK_KEYS, band_start(b)), span if b == bands - 1 else band_start(b + 1),
                            len(positions)) for b in range(bands)]
    layers = []
    ropes = model.layer_ropes(ctx)  # as the keys were turned in collect_keys's cache
    for i, layer_keys in enumerate(keys):
        per_band = [spread_keys(layer_keys, positions, t, ropes[i]) for t in targets]  # (kv_heads, n, hd) each
        layers.append(np.stack([np.stack([fit_codebooks(band_keys[kh], d_sub, seed=i) for band_keys in per_band])
                                for kh in range(len(layer_keys))]))  # (kv_heads, bands, S, 16, d_sub)
        if progress:
            progress(i + 1, len(keys))
    return KeyCodebooks(d_sub, layers)


def codebooks_summary(source: WeightSource) -> str:
    books = source.key_codebooks()
    if books is None:
        return "LUT codebooks: none (edgeinfer calibrate adds them)"
    kv_heads, bands = books.layers[0].shape[:2]
    return (f"LUT codebooks: d_sub {books.d_sub}, {len(books.layers)} layers x {kv_heads} KV heads x {bands} position "
            f"bands (the last from position {band_start(bands - 1)} on)")
