"""Instructions in the hot loop of each 4/8-bit kernel and of LUT attention's lookups, per unit of
work, read from the code LLVM compiled on this machine (static: the loop body's instructions, one
pass of it per chunk). Under qemu no time means anything, so for ARM this is the one speed figure:
run it natively on x86 and on each emulated CPU, and compare.

    python bench/instructions.py                                    # x86, this CPU's path
    scripts/aarch64.sh neoverse-n2 python3 bench/instructions.py    # and cortex-a72, neoverse-n1

Prints JSON (per kernel: the loop's instruction count, its dot-product instructions, and the count
per 512 weights, or per 128 LUT lookups) and a one-line summary.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeinfer.kernels import lut_attention, q4, q8  # noqa: E402
from edgeinfer.kernels.activations import quantize_activations  # noqa: E402
from edgeinfer.kernels.simd import kernel_path  # noqa: E402

BRANCH = re.compile(r"^(?P<op>[a-z][\w.]*)\s.*?(?P<label>\.LBB\d+_\d+)\s*$")
DOTS = {"vpdpbusd", "vpmaddubsw", "vpmaddwd", "sdot", "udot", "usdot", "smull", "smull2", "umull", "umull2",
        "smlal", "smlal2", "mul", "saddw", "saddw2", "sadalp", "vpmullw", "tbl", "vpshufb"}


def instructions(asm: str) -> list[tuple[str, str]]:
    """(label defined here or "", instruction text or "") per meaningful line, comments dropped."""
    out = []
    for line in asm.splitlines():
        line = re.split(r"\s(?:#|//)", " " + line.strip(), maxsplit=1)[0].strip()
        if not line:
            continue
        if line.endswith(":"):
            out.append((line[:-1], ""))
        elif not line.startswith("."):
            out.append(("", line))
    return out


SHUFFLES = {"vpshufb", "tbl"}


def hot_loop(asm: str, lookups: bool | None = None) -> list[str]:
    """The innermost loop (a backward branch to a label, with no such loop inside it) with the most
    dot-product instructions, then the most instructions; with `lookups` True or False, among the
    loops with or without byte lookups (one q4 kernel holds a loop for Q4_0, for IQ4 and for Q4_1)."""
    lines = instructions(asm)
    where = {label: i for i, (label, _) in enumerate(lines) if label}
    loops = []
    for i, (_, text) in enumerate(lines):
        m = BRANCH.match(text)
        if m and m["label"] in where and where[m["label"]] < i:
            loops.append((where[m["label"]], i))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    if lookups is not None:
        innermost = [(a, b) for a, b in innermost
                     if any(t.split()[0] in SHUFFLES for _, t in lines[a:b + 1] if t) == lookups]

    def weight(loop):
        body = [text.split()[0] for _, text in lines[loop[0]:loop[1] + 1] if text]
        return sum(m in DOTS for m in body), len(body)
    a, b = max(innermost, key=weight)
    return [text for _, text in lines[a:b + 1] if text]


def count(kernel, args, unit: str, per_pass: int, passes, lookups: bool | None = None) -> dict:
    """Compile a fresh copy of `kernel` (no cache: its assembly), run it once, count its hot loop.
    LLVM may unroll the loop: `passes(mnemonics)` says how many passes of the source loop (each
    `per_pass` units of work) one turn of the compiled loop makes."""
    fresh = njit(kernel.py_func)
    fresh(*args)
    body = hot_loop(fresh.inspect_asm(fresh.signatures[0]), lookups)
    mnemonics = [text.split()[0] for text in body]
    turns = passes(mnemonics)
    return {"loop_instructions": len(body), "source_passes": turns, "dot_instructions": sum(m in DOTS for m in mnemonics),
            f"per_{unit}": round(len(body) / turns * UNITS[unit] / per_pass, 1),
            "mnemonics": dict(sorted(((m, mnemonics.count(m)) for m in set(mnemonics)), key=lambda kv: -kv[1])[:12])}


UNITS = {"512_weights": 512, "128_lookups": 128}
LOOKUPS_PER_SHUFFLE = {"vpshufb": 64 if kernel_path() == "avx512-vnni" else 32, "tbl": 16}


def prefetch_passes(mnemonics: list[str]) -> float:
    """q4/q8: each pass of the group or chunk loop prefetches 4 weight lines and 2 scale lines."""
    return sum(m in ("prefetcht0", "prefetcht1", "prefetcht2", "prfm") for m in mnemonics) / 6


def lookup_passes(mnemonics: list[str]) -> float:
    """lut_sums: each pass looks up 64 keys in 2 subspaces (128 byte lookups)."""
    return sum(LOOKUPS_PER_SHUFFLE.get(m, 0) for m in mnemonics) / 128


def main() -> None:
    rng = np.random.default_rng(0)
    rows, cols = 64, 1024
    x = quantize_activations(rng.standard_normal(cols).astype(np.float32))
    m4 = q4.Q4Matrix.from_values(rng.integers(0, 16, (rows, cols)), rng.random((rows, cols // 32)).astype(np.float32))
    m8 = q8.Q8Matrix.from_values(rng.integers(-128, 128, (rows, cols)), rng.random((rows, cols // 32)).astype(np.float32))
    out = np.empty(rows, np.float32)
    pairs, blocks = 32, 8  # LUT: 64 subspaces (d_sub 1 over 64 dims), 8 blocks of 64 keys
    tables = rng.integers(0, 64, (2 * pairs, 64)).astype(np.uint8)
    codes = rng.integers(0, 256, (blocks, pairs, 64)).astype(np.uint8)
    sums = np.empty(blocks * 64, np.uint16)
    result = {
        "kernel_path": kernel_path(),
        # one pass of the source loop: q4 16 rows x 32 columns, q8 4 rows x 64 columns, LUT 64 keys x 2 subspaces
        "q4_gemv": count(q4._gemv_serial, (m4.kind, m4.packed, m4.scales, m4.offsets, m4.offset_factor, x.flat, x.scales,
                                          x.sums, x.starts, out), "512_weights", 512, prefetch_passes, False),
        "iq4_gemv": count(q4._gemv_serial, (q4.LOOKUP, m4.packed, m4.scales, m4.offsets, q4.IQ4_FACTOR, x.flat, x.scales,
                                           x.sums, x.starts, out), "512_weights", 512, prefetch_passes, True),
        "q8_gemv": count(q8._gemv_serial, (m8.kind, m8.packed, m8.scales, m8.offsets, m8.offset_factor, x.flat, x.scales,
                                          x.halves, out), "512_weights", 256, prefetch_passes),
        "lut_sums": count(lut_attention.lut_sums, (tables, codes, 0, blocks, sums), "128_lookups", 128, lookup_passes),
    }
    print(json.dumps(result, indent=1))
    print(f"instructions ({result['kernel_path']}): q4 GEMV {result['q4_gemv']['per_512_weights']} per 512 weights, "
          f"IQ4 GEMV {result['iq4_gemv']['per_512_weights']}, "
          f"q8 GEMV {result['q8_gemv']['per_512_weights']} per 512 weights, "
          f"LUT {result['lut_sums']['per_128_lookups']} per 128 lookups")


if __name__ == "__main__":
    main()
