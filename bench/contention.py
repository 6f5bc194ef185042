"""Prefill and decode beside busy programs, as a user's machine often is, edgeinfer vs llama.cpp on
the same GGUF and threads, rounds alternating.

- edgeinfer: a generation as `run` makes it (Engine.generate, greedy), its thread count re-chosen
  between steps (edgeinfer/threads.py);
- edgeinfer, fixed: the same with the thread count held at --threads (as before threads.py);
- llama.cpp: llama-cpp-python at n_threads=--threads, the same prompt tokens in one eval, then
  single-token evals.
Each in a fresh process, started after the busy programs are. The busy programs are --busy Python
loops, each in a session of its own (setsid), as a program started from another terminal is: Linux
weighs each session as one (sched_autogroup), so they compete with edgeinfer as equals. Each round
also runs the three with nothing beside them: the cost of looking.

    python bench/contention.py [--model smollm2-135m | FILE.gguf] [--threads 2] [--rounds 2] [--busy 1] [-n 32]

Prints JSON and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from peer import run_in_peer  # noqa: E402

PROMPT = "Tell me about the sea, the ships that sail on it and the people who live by it."

PEER_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, threads, n, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
m = Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
t = time.perf_counter(); m.eval(prompt); prefill = len(prompt) / (time.perf_counter() - t)
t = time.perf_counter()
for _ in range(n):
    m.eval([prompt[-1]])
print(json.dumps({"prefill": prefill, "decode": n / (time.perf_counter() - t)}))
"""

ONE = """
import json, sys
import numba
from edgeinfer.sampling import SamplingParams
from edgeinfer.session import open_engine
path, threads, n, prompt, fixed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5] == "fixed"
engine = open_engine(path, 1024)
if fixed:
    numba.set_num_threads(threads)
    engine.threads.adapt = lambda: threads
gen = engine.generate(prompt, SamplingParams(temperature=0.0), max_tokens=n)
gen.run()
print(json.dumps({"prefill": gen.stats.prefill_tok_s, "decode": gen.stats.decode_tok_s,
                  "tokens": gen.stats.decode_tokens, "threads": engine.threads.current}))
"""


def edgeinfer_run(path: str, threads: int, n: int, prompt: list[int], mode: str) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", ONE, path, str(threads), str(n), json.dumps(prompt), mode],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"edgeinfer failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy_programs(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(count)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="a catalog name or any GGUF file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--busy", type=int, default=1, help="busy programs beside the engines")
    p.add_argument("-n", type=int, default=32, help="tokens decoded (beside busy programs, fixed threads run "
                   "at about a token a second here)")
    args = p.parse_args()
    from edgeinfer.session import open_engine
    from edgeinfer.storage.fetch import fetch_gguf

    path = args.model if os.path.exists(args.model) else str(fetch_gguf(args.model))
    prompt = open_engine(path, 1024).prompt_ids(PROMPT)
    names = ("edgeinfer", "edgeinfer_fixed", "llamacpp")
    runs: dict[str, dict[str, list[dict]]] = {beside: {name: [] for name in names} for beside in ("busy", "idle")}
    for _ in range(args.rounds):
        for beside in ("busy", "idle"):
            hogs = busy_programs(args.busy if beside == "busy" else 0)
            try:
                time.sleep(0.5)
                runs[beside]["llamacpp"].append(json.loads(run_in_peer(
                    PEER_SCRIPT, path, str(args.threads), str(args.n), json.dumps(prompt))))
                runs[beside]["edgeinfer_fixed"].append(edgeinfer_run(path, args.threads, args.n, prompt, "fixed"))
                runs[beside]["edgeinfer"].append(edgeinfer_run(path, args.threads, args.n, prompt, "adapt"))
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    result: dict = {"model": os.path.basename(path), "threads": args.threads, "busy": args.busy,
                    "rounds": args.rounds, "prompt_tokens": len(prompt), "decode_tokens": args.n}
    for beside, by_name in runs.items():
        result[beside] = {name: {test: round(statistics.median(r[test] for r in rs), 2) for test in ("prefill", "decode")}
                          for name, rs in by_name.items()}
        result[beside]["edgeinfer_threads"] = [r["threads"] for r in by_name["edgeinfer"]]
        for test in ("prefill", "decode"):
            ours = result[beside]["edgeinfer"][test]
            result[beside][f"{test}_vs_fixed"] = round(ours / result[beside]["edgeinfer_fixed"][test], 2)
            result[beside][f"{test}_vs_llamacpp"] = round(ours / result[beside]["llamacpp"][test], 2)
    print(json.dumps(result, indent=1))
    b, i = result["busy"], result["idle"]
    print(f"{result['model']}, {args.threads} threads, median of {args.rounds} alternating rounds, tok/s decode "
          f"(prefill): beside {args.busy} busy program(s): edgeinfer {b['edgeinfer']['decode']} "
          f"({b['edgeinfer']['prefill']}) on {b['edgeinfer_threads']} threads, fixed threads "
          f"{b['edgeinfer_fixed']['decode']} ({b['edgeinfer_fixed']['prefill']}), llama.cpp {b['llamacpp']['decode']} "
          f"({b['llamacpp']['prefill']}): x{b['decode_vs_llamacpp']} llama.cpp; alone: edgeinfer "
          f"{i['edgeinfer']['decode']} ({i['edgeinfer']['prefill']}), fixed {i['edgeinfer_fixed']['decode']} "
          f"({i['edgeinfer_fixed']['prefill']}), llama.cpp {i['llamacpp']['decode']} ({i['llamacpp']['prefill']}): "
          f"x{i['decode_vs_fixed']} fixed threads")


if __name__ == "__main__":
    main()
