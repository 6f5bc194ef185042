"""`edgeinfer calibrate`: fit LUT attention's key codebooks on a text and store them in the model file.

The model runs over the text in windows of `ctx` tokens from an empty cache; the keys each layer
puts in the cache (after RoPE) are what the codebooks must represent. For each layer and KV head,
each sub-space of d_sub dimensions gets 16 centroids by k-means (seeded, so the same text gives the
same file). The output is the model's single file with the codebooks added (written to a temporary
name, then renamed).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import EdgeInferError
from .kernels.lut_attention import fit_codebooks
from .model import Model
from .storage.source import KeyCodebooks, WeightSource

D_SUBS = (1, 2, 4)


def collect_keys(model: Model, ids: list[int], ctx: int, max_tokens: int) -> list[np.ndarray]:
    """Per layer, the keys (kv_heads, n, head_dim) the model produced over the first max_tokens of ids."""
    ids = ids[:max_tokens]
    if len(ids) < 16:
        raise EdgeInferError(f"the calibration text has {len(ids)} tokens; it needs at least 16")
    c = model.config
    per_layer: list[list[np.ndarray]] = [[] for _ in range(c.num_layers)]
    cache = model.new_cache(ctx)
    for start in range(0, len(ids), ctx):
        window = np.asarray(ids[start:start + ctx])
        cache.truncate(0)
        model.forward(window, cache)
        for layer in range(c.num_layers):
            per_layer[layer].append(cache.k[layer, :, :len(window)].copy())
    return [np.concatenate(keys, axis=1) for keys in per_layer]


def calibrate(model: Model, ids: list[int], d_sub: int, ctx: int = 512, max_tokens: int = 8192,
              progress: Callable[[int, int], None] | None = None) -> KeyCodebooks:
    if d_sub not in D_SUBS:
        raise EdgeInferError(f"--d-sub must be 1, 2 or 4, got {d_sub}")
    if model.config.head_dim % (2 * d_sub):
        raise EdgeInferError(f"head dimension {model.config.head_dim} does not split into pairs of {d_sub}-wide "
                             "sub-spaces")
    keys = collect_keys(model, ids, ctx, max_tokens)
    layers = []
    for i, layer_keys in enumerate(keys):
        layers.append(np.stack([fit_codebooks(head_keys, d_sub, seed=i) for head_keys in layer_keys]))
        if progress:
            progress(i + 1, len(keys))
    return KeyCodebooks(d_sub, layers)


def codebooks_summary(source: WeightSource) -> str:
    books = source.key_codebooks()
    if books is None:
        return "LUT codebooks: none (edgeinfer calibrate adds them)"
    return f"LUT codebooks: d_sub {books.d_sub}, {len(books.layers)} layers x {books.layers[0].shape[0]} KV heads"
