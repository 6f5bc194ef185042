"""The 4-bit GEMM against this machine's int8 peak, measured in the same run.

- peak: 12 independent chains of the byte dot product the kernels use (simd.dpbusd: vpdpbusd on
  AVX-512 VNNI), per thread and on all threads; 64 multiply-adds each.
- GEMM: `q4.gemm` over 512 tokens on random Q4_0 and Q4_1 matrices of the Llama-3.2-1B shapes
  (2048x2048, 512x2048, 8192x2048, 2048x8192), into float32 and into fixed point (int64: o_proj and
  down_proj, whose partial sums a cluster adds exactly); median of 7 passes, after a warm-up.

    python bench/gemm.py [--threads 2]

Prints JSON and a one-line summary. A prefill's share of the peak is tok/s x multiply-adds per token
(the 1B body shape: 0.973 G in its matrices) / the peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from numba import njit, prange, set_num_threads

from edgeinfer.kernels.activations import Q8Activations, quantize_activations
from edgeinfer.kernels.q4 import Q4Matrix, gemm
from edgeinfer.kernels.simd import add_i64, dpbusd, kernel_path, load_i8, store_f32, to_f32, zeros_i32

SHAPES = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]
TOKENS = 512
CHAIN_STEPS = 20_000_000


@njit
def _chains(a, steps, out):
    """12 independent dpbusd chains, `steps` times each."""
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = zeros_i32()
    v, w = load_i8(a, 0), load_i8(a, 64)
    for _ in range(steps):
        c0, c1, c2, c3 = dpbusd(c0, v, w), dpbusd(c1, v, w), dpbusd(c2, v, w), dpbusd(c3, v, w)
        c4, c5, c6, c7 = dpbusd(c4, v, w), dpbusd(c5, v, w), dpbusd(c6, v, w), dpbusd(c7, v, w)
        c8, c9, c10, c11 = dpbusd(c8, v, w), dpbusd(c9, v, w), dpbusd(c10, v, w), dpbusd(c11, v, w)
    s = add_i64(add_i64(add_i64(c0, c1), add_i64(c2, c3)), add_i64(add_i64(c4, c5), add_i64(c6, c7)))
    store_f32(out, 0, to_f32(add_i64(s, add_i64(add_i64(c8, c9), add_i64(c10, c11)))))


@njit(parallel=True)
def _chains_parallel(a, steps, out, threads):
    for t in prange(threads):
        _chains(a, steps, out[t])


def peak_gmacs(threads: int) -> float:
    """Multiply-adds per second (G) of 12 dpbusd chains on each of `threads` threads."""
    a, out = np.ones(128, np.int8), np.zeros((threads, 16), np.float32)
    _chains_parallel(a, 10, out, threads)
    t = time.perf_counter()
    _chains_parallel(a, CHAIN_STEPS, out, threads)
    return CHAIN_STEPS * 12 * 64 * threads / (time.perf_counter() - t) / 1e9


def gemm_gmacs(minima: bool, fixed: bool) -> float:
    rng = np.random.default_rng(0)
    mats = []
    for r, c in SHAPES:
        scales = rng.random((r, c // 32), dtype=np.float32) * 0.01 + 0.001
        mats.append(Q4Matrix.from_values(rng.integers(0, 16, (r, c), dtype=np.uint8), scales,
                                         -8 * scales if minima else None))
    acts = {}
    for c in {c for _, c in SHAPES}:
        acts[c] = quantize_activations(rng.standard_normal((TOKENS, c)).astype(np.float32), Q8Activations.empty(c, TOKENS))
    outs = [np.zeros((TOKENS, m.rows), np.int64 if fixed else np.float32) for m in mats]

    def once() -> float:
        t = time.perf_counter()
        for m, o in zip(mats, outs):
            gemm(m, acts[m.cols], o)
        return time.perf_counter() - t

    once()
    return sum(r * c for r, c in SHAPES) * TOKENS / statistics.median(once() for _ in range(7)) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    set_num_threads(args.threads)
    result = {"kernel_path": kernel_path(), "threads": args.threads, "tokens": TOKENS,
              "peak_gmacs_1_thread": round(peak_gmacs(1), 1), "peak_gmacs": round(peak_gmacs(args.threads), 1)}
    for name, minima in (("q4_0", False), ("q4_1", True)):
        for out, fixed in (("float32", False), ("fixed", True)):
            g = gemm_gmacs(minima, fixed)
            result[f"{name}_{out}_gmacs"] = round(g, 1)
            result[f"{name}_{out}_of_peak"] = round(g / result["peak_gmacs"], 3)
    print(json.dumps(result, indent=1))
    print(f"{result['kernel_path']}, {args.threads} threads: peak {result['peak_gmacs']} GMAC/s; 4-bit GEMM, 1B shapes, "
          f"{TOKENS} tokens: " + ", ".join(f"{n} {o} {result[f'{n}_{o}_gmacs']} ({result[f'{n}_{o}_of_peak']:.0%})"
                                          for n in ("q4_0", "q4_1") for o in ("float32", "fixed")))


if __name__ == "__main__":
    main()
