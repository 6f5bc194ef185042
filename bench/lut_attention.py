"""Attention time per decoded token, one layer: LUT attention vs exact, both edgeinfer, same run.

Keys, values and the query are random (timing does not depend on them; quality is measured with
perplexity once calibration lands). Both kernels run on all threads, heads in parallel; exact reads
float32 keys (hd * 4 bytes per key per KV head), LUT reads hd / (2 * d_sub) bytes of codes; values
are float32 in both. Prints JSON and a one-line summary per shape.

    python bench/lut_attention.py [--d-sub 2] [--contexts 1024,4096,16384]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgeinfer.kernels.lut_attention import attend_one_lut, encode_keys, fit_codebooks, pack_codes
from edgeinfer.kernels.ops import attend_one

SHAPES = {"smollm2-135m": (9, 3, 64), "llama2-7b": (32, 32, 128)}  # heads, KV heads, head dim


def median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-sub", type=int, default=2)
    p.add_argument("--contexts", default="1024,4096,16384")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for shape, (heads, kv_heads, hd) in SHAPES.items():
        for length in map(int, args.contexts.split(",")):
            keys = rng.standard_normal((kv_heads, length, hd)).astype(np.float32)
            values = rng.standard_normal((kv_heads, length, hd)).astype(np.float32)
            books = np.stack([fit_codebooks(keys[k, :2048], args.d_sub, iterations=4) for k in range(kv_heads)])
            codes = np.stack([pack_codes(encode_keys(keys[k], books[k])) for k in range(kv_heads)])
            q = rng.standard_normal(heads * hd).astype(np.float32)
            out, s = np.empty_like(q), hd // args.d_sub
            scores = np.zeros((heads, length), np.float32)
            tables, sums = np.zeros((heads, s, 64), np.uint8), np.zeros((heads, codes.shape[1] * 64), np.uint16)
            repeats = max(5, 200_000 // length)
            exact = median_us(lambda: attend_one(q, keys, values, length, scores, out), repeats)
            lut = median_us(lambda: attend_one_lut(q, books, codes, keys, values, length, tables, sums, scores, out), repeats)
            rows.append({"shape": shape, "context": length, "d_sub": args.d_sub, "exact_us": round(exact, 1),
                         "lut_us": round(lut, 1), "speedup": round(exact / lut, 2)})
    print(json.dumps(rows, indent=1))
    for shape in SHAPES:
        print(f"{shape}, d_sub {args.d_sub}, attention per token per layer, exact / LUT: " +
              ", ".join(f"{r['context']}: {r['exact_us']:.0f} / {r['lut_us']:.0f} us (x{r['speedup']})"
                        for r in rows if r["shape"] == shape))


if __name__ == "__main__":
    main()
