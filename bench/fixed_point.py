"""What exact cluster sums cost: the 4-bit GEMV and GEMM writing float32 vs fixed point (int64).

o_proj and down_proj write fixed-point sums (kernels/simd.py) so that a cluster's partials add up to
one node's bit for bit; every other product stays float32. This times both outputs of the same
kernel on the shapes of those two matrices (SmolLM2-135M and Llama-2-7B), in alternating rounds,
and checks that the column pieces of a 4-way split add up to the whole exactly. Random weights:
speed only. Prints JSON and a one-line summary per shape.

    python bench/fixed_point.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgeinfer.kernels.activations import quantize_activations
from edgeinfer.kernels.q4 import Q4Matrix, gemm, gemv

SHAPES = {"smollm2 o_proj": (576, 576), "smollm2 down_proj": (576, 1536), "7b o_proj": (4096, 4096),
          "7b down_proj": (4096, 11008)}
TOKENS = 64  # a prefill batch


def random_q4(rng, rows: int, cols: int) -> Q4Matrix:
    return Q4Matrix.from_rows(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                              (rng.random((rows, cols // 32)) * 0.02).astype(np.float32),
                              (rng.standard_normal((rows, cols // 32)) * 0.05).astype(np.float32))


def seconds(fn, budget: float = 0.2) -> float:
    """Seconds per call, one round: `fn` repeated for about `budget` seconds after a first call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def split_is_exact(m: Q4Matrix, x: np.ndarray) -> bool:
    groups = m.cols // 32
    edges = [0, *(groups * k // 4 * 32 for k in (1, 2, 3)), m.cols]  # pieces on groups, not on 128-column chunks
    whole = gemv(m, quantize_activations(x), np.empty(m.rows, np.int64))
    parts = sum(gemv(m.select(slice(None), slice(a, b)), quantize_activations(x[a:b]), np.empty(m.rows, np.int64))
                for a, b in zip(edges, edges[1:]))
    return bool(np.array_equal(parts, whole))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for name, (r, c) in SHAPES.items():
        m = random_q4(rng, r, c)
        x = rng.standard_normal(c).astype(np.float32)
        xq, xb = quantize_activations(x), quantize_activations(rng.standard_normal((TOKENS, c)).astype(np.float32))
        times = {k: [] for k in ("gemv_f32", "gemv_fixed", "gemm_f32", "gemm_fixed")}
        for _ in range(args.rounds):
            for dtype, tag in ((np.float32, "f32"), (np.int64, "fixed")):
                out, outs = np.empty(r, dtype), np.empty((TOKENS, r), dtype)
                times[f"gemv_{tag}"].append(seconds(lambda: gemv(m, xq, out)))
                times[f"gemm_{tag}"].append(seconds(lambda: gemm(m, xb, outs)))
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows.append({"shape": name, "rows": r, "cols": c, "gemv_us": {k[5:]: med[k] * 1e6 for k in med if "gemv" in k},
                     f"gemm{TOKENS}_us": {k[5:]: med[k] * 1e6 for k in med if "gemm" in k},
                     "gemv_fixed_over_f32": med["gemv_fixed"] / med["gemv_f32"],
                     "gemm_fixed_over_f32": med["gemm_fixed"] / med["gemm_f32"],
                     "four_way_split_exact": split_is_exact(m, x)})
    print(json.dumps({"rounds": args.rounds, "results": rows}, indent=1))
    for row in rows:
        print(f"{row['shape']} {row['rows']}x{row['cols']}: fixed point / float32 GEMV x{row['gemv_fixed_over_f32']:.2f}, "
              f"GEMM{TOKENS} x{row['gemm_fixed_over_f32']:.2f}; 4-way split exact: {row['four_way_split_exact']}")


if __name__ == "__main__":
    main()
