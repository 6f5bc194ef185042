"""Roofline for decode: this machine's read bandwidth vs the 4-bit GEMV's effective GB/s.

Both are measured in this run, on data far larger than the caches (each pass walks a rotation of
matrix copies of at least 512 MB), with 1 and 2 threads. Prints JSON and a one-line summary.

    python bench/roofline.py
"""

from __future__ import annotations

import json
import time

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads

from edgeinfer.kernels.activations import quantize_activations
from edgeinfer.kernels.q4 import Q4Matrix, gemv
from edgeinfer.kernels.simd import add, hsum, load_f32, zeros_f32

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # Llama-2-7B: attention, FFN up/gate, FFN down
WORKING_SET = 512 * 1024 * 1024
PASSES = 7


@njit(parallel=True, cache=True)
def _read_all(a, parts):
    """Sum every float of `a` with four vector accumulators per thread: a pure streaming read."""
    n = a.shape[0] // parts // 64 * 64
    total = 0.0
    for p in prange(parts):
        s0, s1, s2, s3 = zeros_f32(), zeros_f32(), zeros_f32(), zeros_f32()
        for i in range(p * n, (p + 1) * n, 64):
            s0 = add(s0, load_f32(a, i))
            s1 = add(s1, load_f32(a, i + 16))
            s2 = add(s2, load_f32(a, i + 32))
            s3 = add(s3, load_f32(a, i + 48))
        total += hsum(add(add(s0, s1), add(s2, s3)))
    return total


def median_seconds(fn) -> float:
    fn()
    times = []
    for _ in range(PASSES):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def read_bandwidth() -> float:
    a = np.ones(WORKING_SET // 4, dtype=np.float32)
    parts = get_num_threads() * 8
    return a.nbytes / median_seconds(lambda: _read_all(a, parts)) / 1e9


def gemv_bandwidth(rows: int, cols: int) -> float:
    rng = np.random.default_rng(0)
    one = rows * cols // 2 + rows * cols // 32 * 4
    copies = max(2, -(-WORKING_SET // one))
    mats = [Q4Matrix.from_rows(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                               (rng.random((rows, cols // 32)) * 0.02).astype(np.float32)) for _ in range(copies)]
    x = quantize_activations(rng.standard_normal(cols).astype(np.float32))
    out = np.empty(rows, np.float32)

    def walk():
        for m in mats:
            gemv(m, x, out)

    return one * copies / median_seconds(walk) / 1e9


def main() -> None:
    rows = []
    for threads in (1, 2):
        set_num_threads(threads)
        bw = read_bandwidth()
        for r, c in SHAPES:
            g = gemv_bandwidth(r, c)
            rows.append({"threads": threads, "shape": f"{r}x{c}", "read_gb_s": round(bw, 1),
                         "gemv_gb_s": round(g, 1), "fraction": round(g / bw, 3)})
    print(json.dumps(rows, indent=1))
    two = [r for r in rows if r["threads"] == 2]
    print(f"2 threads: read {two[0]['read_gb_s']} GB/s; 4-bit GEMV " +
          ", ".join(f"{r['shape']} {r['gemv_gb_s']} GB/s ({r['fraction']:.0%})" for r in two))


if __name__ == "__main__":
    main()
