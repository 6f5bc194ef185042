"""Warm start and memory, edgeinfer vs llama.cpp on the same GGUF, rounds alternating.

- start: `edgeinfer run MODEL -p hi -n 1 --temp 0` (the installed console script, kernels already
  compiled; MODEL a catalog name runs the file the catalog converted, as a user's run does, or with
  --same-file the GGUF, converted at each load) against llama-cpp-python loading the same file at the same context and answering the
  same chat turn with one token. Wall time from process start to exit and the process's peak RSS
  (wait4's ru_maxrss), medians of --rounds.
- bytecode: an editable install (the README's) keeps no compiled bytecode where the environment sets
  PYTHONDONTWRITEBYTECODE (this machine's does), so every start compiles edgeinfer's modules again;
  llama-cpp-python, installed from a wheel, has its bytecode. edgeinfer is also timed with Python's
  default behaviour (bytecode written once, here into a cache folder of the bench's, so the source
  tree stays clean): "edgeinfer, bytecode".
- preflight: `edgeinfer run FILE --ctx 512 -v -n 64` on a prompt of about 430 tokens (so the KV cache
  it counts is used): the memory plan's total against the run's peak RSS (issue 16's goal: within
  10%), and its runtime figure (the process before any weight, plus the kernels' allowance).

    python bench/startup.py [--model smollm2-135m | FILE.gguf] [--rounds 5] [--same-file]

Prints JSON and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from peer import peer_python  # noqa: E402

PEER_SCRIPT = """
import sys
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=2, n_threads_batch=2, verbose=False)
m.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1, temperature=0)
"""

PROMPT = Path("/usr/share/common-licenses/GPL-3").read_text()[:1800]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Seconds from start to exit, peak RSS in MiB, stderr; the command must succeed."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed: {err.strip()[-500:]}")
    return seconds, usage.ru_maxrss / 1024, err


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="a catalog name or any GGUF file")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--same-file", action="store_true", help="edgeinfer reads the GGUF too, not the catalog's file")
    args = p.parse_args()
    from edgeinfer.engine import default_context
    from edgeinfer.storage import open_model
    from edgeinfer.storage.fetch import fetch_gguf

    path = args.model if os.path.exists(args.model) else str(fetch_gguf(args.model))
    context = default_context(open_model(path).config)
    ours_model = path if args.same_file else args.model  # a catalog name: the file it converts to, what users run
    ours = [str(Path(sys.executable).parent / "edgeinfer"), "run", ours_model, "-p", "hi", "-n", "1", "--temp", "0",
            "-t", "2"]
    peer = [str(peer_python()), "-c", PEER_SCRIPT, path, str(context)]
    bytecode = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    bytecode["PYTHONPYCACHEPREFIX"] = str(Path.home() / ".cache" / "edgeinfer" / "bench-bytecode")
    commands = {"llama.cpp": (peer, None), "edgeinfer": (ours, None), "edgeinfer, bytecode": (ours, bytecode)}
    for cmd, env in commands.values():  # page cache, compiled kernels and bytecode warm for all
        timed(cmd, env)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, (cmd, env) in commands.items():
            runs[name].append(timed(cmd, env)[:2])
    result: dict = {"model": os.path.basename(path), "edgeinfer_model": os.path.basename(ours_model), "context": context,
                    "rounds": args.rounds}
    for name, rows in runs.items():
        result[name] = {"start_s": round(statistics.median(r[0] for r in rows), 3),
                        "peak_rss_mib": round(statistics.median(r[1] for r in rows), 1)}
    for key in ("start_s", "peak_rss_mib"):
        result[f"{key}_ratio"] = round(result["edgeinfer"][key] / result["llama.cpp"][key], 3)
    result["start_s_ratio_bytecode"] = round(result["edgeinfer, bytecode"]["start_s"] / result["llama.cpp"]["start_s"], 3)

    _, peak, err = timed([*ours[:3], "--ctx", "512", "-v", "-n", "64", "--temp", "0", "-t", "2", "-p", PROMPT])
    plan = re.search(r"runtime (\d+) MB; plan: fully resident, (\d+) MB", err)
    if not plan:
        raise SystemExit(f"no memory plan in: {err.strip()[:500]}")
    runtime, total = int(plan.group(1)), int(plan.group(2))
    result["preflight"] = {"plan_mib": total, "runtime_mib": runtime, "peak_rss_mib": round(peak, 1),
                           "plan_over_peak": round(total / peak, 3)}
    print(json.dumps(result, indent=1))
    e, b, l, f = result["edgeinfer"], result["edgeinfer, bytecode"], result["llama.cpp"], result["preflight"]
    print(f"{result['model']} (edgeinfer: {result['edgeinfer_model']}), warm start to one token, median of "
          f"{args.rounds} alternating: edgeinfer "
          f"{e['start_s']} s / {e['peak_rss_mib']} MiB peak, llama.cpp {l['start_s']} s / {l['peak_rss_mib']} MiB "
          f"(x{result['start_s_ratio']} time, x{result['peak_rss_mib_ratio']} memory); with its bytecode kept "
          f"{b['start_s']} s (x{result['start_s_ratio_bytecode']}); preflight at --ctx 512 "
          f"{f['plan_mib']} MB planned (runtime {f['runtime_mib']}) vs {f['peak_rss_mib']} MiB peak "
          f"(x{f['plan_over_peak']})")


if __name__ == "__main__":
    main()
