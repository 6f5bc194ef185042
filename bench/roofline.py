"""Roofline for decode: this machine's read bandwidth vs the 4-bit GEMV's effective GB/s.

Both are measured in this run, on data far larger than the caches (each pass walks a rotation of
matrix copies of WORKING_SET bytes), with 1 and 2 threads. Prints JSON and a one-line summary.

    python bench/roofline.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from numba import njit, prange, set_num_threads

from edgeinfer.kernels.activations import quantize_activations
from edgeinfer.kernels.q4 import Q4Matrix, gemv
from edgeinfer.kernels.simd import add, hsum, load_f32, zeros_f32

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # Llama-2-7B: attention, FFN up/gate, FFN down


def _last_level_cache() -> int:
    """The largest cache Linux reports for CPU 0, in bytes (0 if it reports none)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=0)


# At least 8x the last-level cache: a VM here reports a 300 MiB L3, and over the 512 MB this was
# before, part of each pass came from it (the GEMV's share of the read 92-98% against 90-93% over
# 2 GB, same run order, twenty-seventh session).
WORKING_SET = max(512 << 20, 8 * _last_level_cache())
PASSES = 7  # alternating rounds of read and GEMV


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


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def q4_walk(rows: int, cols: int):
    """A pass of the GEMV over enough copies of a rows x cols Q4_0 matrix to leave the caches: the
    function, and the bytes it reads (the matrices' own size, scales included)."""
    rng = np.random.default_rng(0)
    first = Q4Matrix.from_rows(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                               (rng.random((rows, cols // 32)) * 0.02).astype(np.float32))
    copies = max(2, -(-WORKING_SET // first.nbytes))
    mats = [first] + [Q4Matrix(first.packed.copy(), s := first.scales.copy(), s, first.offset_factor, rows, cols)
                      for _ in range(copies - 1)]
    x = quantize_activations(rng.standard_normal(cols).astype(np.float32))
    out = np.empty(rows, np.float32)

    def walk():
        for m in mats:
            gemv(m, x, out)

    return walk, first.nbytes * copies


def main() -> None:
    rows = []
    stream = np.ones(WORKING_SET // 4, dtype=np.float32)
    for threads in (1, 2):
        set_num_threads(threads)
        parts = threads * 8

        def read():
            _read_all(stream, parts)

        for r, c in SHAPES:
            walk, nbytes = q4_walk(r, c)
            read(), walk()
            # Alternate the two, so that the machine's drift hits both alike; the ratio per round.
            pairs = [(stream.nbytes / seconds(read) / 1e9, nbytes / seconds(walk) / 1e9) for _ in range(PASSES)]
            bw, g = (float(np.median([p[i] for p in pairs])) for i in (0, 1))
            rows.append({"threads": threads, "shape": f"{r}x{c}", "read_gb_s": round(bw, 1), "gemv_gb_s": round(g, 1),
                         "fraction": round(float(np.median([p[1] / p[0] for p in pairs])), 3)})
    print(json.dumps(rows, indent=1))
    two = [r for r in rows if r["threads"] == 2]
    print("2 threads, median of alternating rounds: " +
          ", ".join(f"{r['shape']} GEMV {r['gemv_gb_s']} GB/s vs read {r['read_gb_s']} ({r['fraction']:.0%})"
                    for r in two))


if __name__ == "__main__":
    main()
