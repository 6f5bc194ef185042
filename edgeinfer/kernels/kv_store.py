"""How new keys and values enter a layer's KV cache arrays, for the fused decode layer and for
prefill alike (the KV cache object, edgeinfer/kv_cache.py, owns the arrays and calls this)."""

from __future__ import annotations

from numba import njit

from .lut_attention import encode_keys_into
from .kv_rows import rows_shape, store_row


@njit(cache=True)
def append_kv(keys, values, lut, new_keys, new_values, start):
    """new_keys (after RoPE) and new_values, both (kv_heads, count, hd) float32 and contiguous, of
    positions start.. into a layer's cache: values (kv_heads, capacity, hd) rows of any type
    (kv_rows.py); keys likewise, or with LUT attention (lut's codebooks not empty) as codes,
    the float keys that score exactly being kept by the LUT attention kernels as each query reaches
    them (lut_attention.attend_causal_lut)."""
    kv_heads, count, hd = new_values.shape
    capacity = rows_shape(values)[1]
    for kh in range(kv_heads):
        for j in range(count):
            store_row(values, (kh * capacity + start + j) * hd, new_values, (kh * count + j) * hd, hd)
    codebooks, codes, _, _ = lut
    if codebooks.shape[0]:
        encode_keys_into(new_keys, codebooks, codes, start)
    else:
        for kh in range(kv_heads):
            for j in range(count):
                store_row(keys, (kh * rows_shape(keys)[1] + start + j) * hd, new_keys, (kh * count + j) * hd, hd)
