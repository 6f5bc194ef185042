"""Attention time per decoded token, one layer: LUT attention vs exact, both edgeinfer, same run.

Keys, values and the query are random (timing does not depend on them; quality is perplexity's:
bench/RESULTS.md). The kernels run on all threads, a KV head per thread, over the cache as the model
keeps it. Exact attention is timed over three caches: float32 keys and values (`--cache-type f32`),
float32 keys and fp16 values (like for like with LUT's values), and fp16 keys and values (the
default cache). LUT reads hd / (2 * d_sub) bytes of codes and fp16 values, builds a table per band
of positions the context reaches (one codebook per band, lut_attention.py) and scores the first and
the last keys exactly. The four take turns; medians. Prints JSON and a one-line summary per shape
and d_sub.

    python bench/lut_attention.py [--d-sub 1,2,4] [--contexts 1024,4096,16384] [--shapes smollm2-135m,llama2-7b]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgeinfer.kernels.lut_attention import EXACT_SLOTS, attend_one_lut, bands_for, encode_keys_into, fit_codebooks
from edgeinfer.kernels.ops import attend_one

SHAPES = {"smollm2-135m": (9, 3, 64), "llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # heads, KV heads, head dim


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(fns, rounds: int) -> list[float]:
    """Median microseconds of each, run in turn so that drift hits all alike."""
    for fn in fns:
        fn()
    times = [[seconds(fn) for fn in fns] for _ in range(rounds)]
    return [float(np.median([t[i] for t in times])) * 1e6 for i in range(len(fns))]


def measure(shape: str, length: int, d_sub: int, rng: np.random.Generator) -> dict:
    heads, kv_heads, hd = SHAPES[shape]
    keys = rng.standard_normal((kv_heads, length, hd), dtype=np.float32)
    values = rng.standard_normal((kv_heads, length, hd), dtype=np.float32)
    half = values.astype(np.float16).view(np.uint16)
    bands = bands_for(length)
    books = np.stack([np.repeat(fit_codebooks(keys[k, :2048], d_sub, iterations=4)[None], bands, axis=0)
                      for k in range(kv_heads)])
    codes = np.zeros((kv_heads, -(-length // 64), hd // (2 * d_sub), 64), np.uint8)
    encode_keys_into(keys, books, codes, 0)
    exact_keys = np.ascontiguousarray(keys[:, :EXACT_SLOTS])  # the sinks and the ring of recent keys
    q = rng.standard_normal(heads * hd, dtype=np.float32)
    out, scores = np.empty_like(q), np.zeros((heads, length), np.float32)
    tables, sums = np.zeros((heads, hd // d_sub, 64), np.uint8), np.zeros((heads, codes.shape[1] * 64), np.uint16)
    half_keys = keys.astype(np.float16).view(np.uint16)
    exact_us, exact_f16v_us, exact_f16_us, lut_us = alternate(
        [lambda: attend_one(q, keys, values, 0, length, 1 / np.sqrt(hd), scores, out),
         lambda: attend_one(q, keys, half, 0, length, 1 / np.sqrt(hd), scores, out),
         lambda: attend_one(q, half_keys, half, 0, length, 1 / np.sqrt(hd), scores, out),
         lambda: attend_one_lut(q, books, codes, exact_keys, half, length, tables, sums, scores, out)],
        max(7, 100_000 // length))
    return {"shape": shape, "context": length, "d_sub": d_sub, "bands": bands, "exact_us": round(exact_us, 1),
            "exact_f16_values_us": round(exact_f16v_us, 1), "exact_f16_us": round(exact_f16_us, 1),
            "lut_us": round(lut_us, 1), "speedup": round(exact_us / lut_us, 2),
            "speedup_same_values": round(exact_f16v_us / lut_us, 2),
            "speedup_default_cache": round(exact_f16_us / lut_us, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-sub", default="1,2,4")
    p.add_argument("--contexts", default="1024,4096,16384")
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = [measure(shape, length, d_sub, rng) for shape in args.shapes.split(",")
            for d_sub in map(int, args.d_sub.split(",")) for length in map(int, args.contexts.split(","))]
    print(json.dumps(rows, indent=1))
    for shape in args.shapes.split(","):
        for d_sub in map(int, args.d_sub.split(",")):
            print(f"{shape}, d_sub {d_sub}, attention per token per layer, exact f32 / exact f32 keys fp16 values / "
                  "exact fp16 / LUT: " +
                  ", ".join(f"{r['context']}: {r['exact_us']:.0f} / {r['exact_f16_values_us']:.0f} / "
                            f"{r['exact_f16_us']:.0f} / {r['lut_us']:.0f} us (x{r['speedup']}, "
                            f"x{r['speedup_same_values']}, x{r['speedup_default_cache']})"
                            for r in rows if r["shape"] == shape and r["d_sub"] == d_sub))


if __name__ == "__main__":
    main()
