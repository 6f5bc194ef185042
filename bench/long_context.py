"""End-to-end decode at a long context: LUT attention vs exact, both edgeinfer, same run, same weights.

A 16k-token prefill would take a 7B model hours on this machine, so the cache is filled to --depth
with random keys, values and codes, and the decode steps then run for real: embedding, every layer's
projections, attention over `depth` positions, head. What a decode step reads and computes does not
depend on the cache's contents (speed only: quality is perplexity's). The model's own codebooks serve
the LUT cache; a model without them (a synth shape) gets random ones. The caches take turns for
`--rounds` rounds, one held at a time (a 7B's exact cache at 16k is 17 GB): exact (float32 keys and
values), exact_f16 (fp16 keys and values, `run`'s default and the like-for-like baseline), exact_q8_0
(8 bits and a scale per 32, `--cache-type q8_0`) and lut (codes and fp16 values). Each round times
`--tokens` steps; medians of the per-round mean step time. The order rotates from round to round:
the kind that ran right after a freed cache of many GB ran a third slower (7B at 16k, LUT 1.11
tok/s after exact's 17 GB, 1.52 first). Prints JSON and one line per model.

    python bench/long_context.py MODEL [MODEL ...] [--depth 16384] [--tokens 8] [--rounds 3] [-t 2]
                                 [--kinds exact,exact_f16,lut]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from numba import set_num_threads

from edgeinfer.kernels.lut_attention import CENTROIDS, bands_for
from edgeinfer.kv_cache import KVCache
from edgeinfer.model import Model
from edgeinfer.storage import open_model

TILE = 1024  # positions of random content, repeated to the depth (np.resize)
FILLER_TOKEN = 1


def random_codebooks(model: Model, depth: int, rng: np.random.Generator, d_sub: int = 1) -> list[np.ndarray]:
    c = model.config
    shape = (c.num_kv_heads, bands_for(depth), c.head_dim // d_sub, CENTROIDS, d_sub)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(c.num_layers)]


def filled_cache(model: Model, codebooks: list[np.ndarray] | None, cache_type: str, depth: int, extra: int,
                 rng: np.random.Generator) -> KVCache:
    cache = KVCache(model.config, depth + extra, codebooks, cache_type, kernels=True)
    kv_heads, hd = model.config.num_kv_heads, model.config.head_dim
    keys = rng.standard_normal((kv_heads, TILE, hd), dtype=np.float32)
    values = np.resize(keys[:, ::-1].astype(np.float16).astype(np.float32), (kv_heads, depth, hd))
    for layer in range(model.config.num_layers):
        if codebooks is None:  # keys and values in the cache's type, as the kernels write them
            cache.append(layer, 0, np.resize(keys, (kv_heads, depth, hd)), values)
        else:  # LUT attention keeps float keys for the first positions only, random codes for the rest
            kept = min(depth, cache.k[layer].shape[1])
            cache.k[layer][:, :kept] = np.resize(keys, (kv_heads, kept, hd))
            cache.v[layer][:, :depth] = values.astype(np.float16).view(np.uint16)
            codes = cache.lut[layer][1]
            codes[:, :depth // 64] = rng.integers(0, 256, codes[:, :depth // 64].shape, dtype=np.uint8)
    cache.commit(depth)
    return cache


def step_seconds(model: Model, cache: KVCache, tokens: int) -> float:
    token = np.array([FILLER_TOKEN])
    model.forward(token, cache)  # the first step pages in what the fill did not touch
    start = time.perf_counter()
    for _ in range(tokens):
        model.forward(token, cache)
    return (time.perf_counter() - start) / tokens


def bench_model(path: str, depth: int, tokens: int, rounds: int, kinds: list[str], rng: np.random.Generator) -> dict:
    source = open_model(path)
    model = Model(source, quantized=True)
    if not model.path.fused:
        raise SystemExit(f"{path}: LUT attention runs on the 4/8-bit path; this model has float projections")
    books = source.key_codebooks()
    codebooks = books.layers if books is not None else random_codebooks(model, depth, rng)
    caches = {"exact": (None, "f32"), "exact_f16": (None, "f16"), "exact_q8_0": (None, "q8_0"),
              "lut": (codebooks, "f16")}
    model.warm_up()
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # each kind in each place in turn
            cache = filled_cache(model, *caches[kind], depth, tokens + 2, rng)
            times[kind].append(step_seconds(model, cache, tokens))
            del cache
    d_sub = codebooks[0].shape[-1]
    row = {"model": os.path.basename(path), "depth": depth, "tokens": tokens, "rounds": rounds,
           "codebooks": "the model's" if books is not None else "random", "bands": codebooks[0].shape[1]}
    for kind in kinds:
        row[f"{kind}_tok_s"] = round(1 / float(np.median(times[kind])), 3)
        row[f"{kind}_round_tok_s"] = [round(1 / t, 3) for t in times[kind]]
        kind_books, cache_type = caches[kind]
        row[f"{kind}_cache_mb"] = round(KVCache.size(model.config, depth, cache_type, kind_books and d_sub) / 2**20)
    for kind in set(kinds) & {"exact", "exact_f16", "exact_q8_0"}:
        if "lut" in kinds:
            row[f"lut_vs_{kind}"] = round(row["lut_tok_s"] / row[f"{kind}_tok_s"], 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--depth", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    p.add_argument("--kinds", default="exact,exact_f16,lut")
    args = p.parse_args()
    set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    kinds = args.kinds.split(",")
    rows = [bench_model(path, args.depth, args.tokens, args.rounds, kinds, rng) for path in args.models]
    print(json.dumps(rows, indent=1))
    for r in rows:
        print(f"{r['model']} at depth {r['depth']}, decode tok/s (KV cache MB): " +
              ", ".join(f"{k} {r[f'{k}_tok_s']} ({r[f'{k}_cache_mb']})" for k in kinds) +
              "".join(f"; LUT x{r[key]} of {key[7:]}" for key in sorted(r) if key.startswith("lut_vs_")))


if __name__ == "__main__":
    main()
