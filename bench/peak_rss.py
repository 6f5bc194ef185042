"""Peak RSS of a run of each quant type of one model, against issue 15's goal: no more than the
Q4_1 file's run plus the difference in file size.

    python bench/peak_rss.py [--model smollm2-135m] [--rounds 5] [Q4_K_M Q6_K ...]

Each file (the model's own Q4_1 GGUF, and the types named, requantized by llama.cpp's quantizer as
bench/requantize.py makes them) runs `edgeinfer run FILE -p 'The capital of France is' -n 16 --raw
--temp 0 -c 512` once to warm the kernel cache, then in --rounds alternating rounds; its peak is
wait4's ru_maxrss of that process (KiB). Medians, and each file's goal and gap, in MiB.
Prints JSON and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

from requantize import requantized  # noqa: E402

TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS", "Q4_0", "Q8_0"]
RUN = ["-p", "The capital of France is", "-n", "16", "--raw", "--temp", "0", "-c", "512"]


def peak_mib(path: str) -> float:
    proc = subprocess.Popen(["edgeinfer", "run", path, *RUN], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"edgeinfer run {path} failed: {err.strip()[-500:]}")
    return usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="a catalog name or a Q4_1 GGUF path")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("types", nargs="*", default=TYPES)
    args = p.parse_args()
    from edgeinfer.storage.fetch import fetch_gguf

    base = args.model if os.path.exists(args.model) else str(fetch_gguf(args.model))
    files = {"Q4_1": base, **{t: requantized(base, t) for t in args.types}}
    for path in files.values():  # kernels compiled and cached, file pages read once; then the run that
        peak_mib(path)            # loads them from the cache writes the list a start preloads (jit_cache)
        peak_mib(path)
    peaks: dict[str, list[float]] = {t: [] for t in files}
    for _ in range(args.rounds):
        for t, path in files.items():
            peaks[t].append(peak_mib(path))
    median = {t: statistics.median(v) for t, v in peaks.items()}
    rows = []
    for t, path in files.items():
        goal = median["Q4_1"] + (os.path.getsize(path) - os.path.getsize(base)) / 2**20
        rows.append({"type": t, "file": path, "file_mib": round(os.path.getsize(path) / 2**20, 2),
                     "peak_mib": round(median[t], 2), "peaks_mib": [round(v, 2) for v in peaks[t]],
                     "goal_mib": round(goal, 2), "gap_mib": round(median[t] - goal, 2)})
    print(json.dumps({"rounds": args.rounds, "command": " ".join(["edgeinfer", "run", "FILE", *RUN]), "files": rows},
                     indent=1))
    missed = [f"{r['type']} +{r['gap_mib']}" for r in rows if r["gap_mib"] > 0]
    gaps = ", ".join(f"{r['type']} {r['gap_mib']:+.1f}" for r in rows[1:])
    print(f"peak RSS against the Q4_1 run ({median['Q4_1']:.1f} MiB) plus the file size difference, MiB: {gaps}; "
          + (f"missed: {', '.join(missed)}" if missed else "met on every file"))


if __name__ == "__main__":
    main()
