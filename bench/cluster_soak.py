"""Kill soak of the home cluster on loopback: many generations on 3 nodes, a worker SIGKILLed at a
random moment in each (while the master loads, during prefill or decode, or between sessions).

Two `edgeinfer worker --stay` processes serve one master after another; each generation is one
`edgeinfer run ... --listen` (it loads, waits for both workers, generates greedily). At a random
moment one worker is killed and, as a supervisor would, started again at once (a --stay worker
joins the next master, or this one's next prompt). Checked for every generation: the master ends
within its deadline (no hang), its text equals one node's, and a worker it had planned with and lost
is named in its log within the step timeout of the kill, when it had joined this master (and the
reply had not ended). Bounded: --generations, each at most
--deadline s; loopback only. Prints JSON and a one-line summary.

    python bench/cluster_soak.py [--generations 50] [--tokens 64] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from cluster import TOKEN, cli, free_port, held_model_dir  # noqa: E402

PROMPT = "Write a short story about a robot."
STEP_TIMEOUT = 5.0


class Timed:
    """A process whose stderr lines are kept with the time each arrived."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.out = ""
        threading.Thread(target=self._read_err, daemon=True).start()
        threading.Thread(target=self._read_out, daemon=True).start()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def _read_out(self) -> None:
        self.out = self.proc.stdout.read()


def start_worker(port: int, cache: str) -> Timed:
    return Timed(cli("worker", "--join", f"127.0.0.1:{port}", "--token", TOKEN, "-t", "1", "--stay",
                     "--cache-dir", cache))


def generation(model: str, port: int, tokens: int, workers: list[Timed], cache: str, deadline: float,
               rng: random.Random) -> dict:
    master = Timed(cli("run", model, "-p", PROMPT, "-n", str(tokens), "--temp", "0", "-t", "1", "--listen",
                       str(port), "--token", TOKEN, "--workers", "2", "--wait", "60", "--timeout", str(STEP_TIMEOUT)))
    started = time.monotonic()
    time.sleep(rng.uniform(0.0, 4.5))  # load, prefill and decode of 64 tokens take about this long here
    victim = rng.randrange(len(workers))
    killed_at = time.monotonic()
    workers[victim].proc.send_signal(signal.SIGKILL)
    workers[victim].proc.wait()
    joined = any(started <= t < killed_at and "joined tcp://" in line for t, line in workers[victim].lines)
    workers[victim] = start_worker(port, cache)
    try:
        master.proc.wait(timeout=max(1.0, deadline - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        master.proc.kill()
        return {"hang": True, "kill_after_s": killed_at - started}
    time.sleep(0.2)  # the reader threads catch up with the last lines
    planned = [t for t, line in master.lines if "plan 1 over 3 nodes" in line]
    ended = [t for t, line in master.lines if line.startswith("prefill: ")]  # the reply's stats line
    drops = [t for t, line in master.lines if "dropped worker" in line and t >= killed_at]
    when = "before it joined" if not joined else "before the plan" if not planned or killed_at < planned[0] else \
        "after the reply" if ended and killed_at > ended[0] else "during the reply"
    return {"hang": False, "code": master.proc.returncode, "kill_after_s": round(killed_at - started, 2),
            "text": master.out, "killed_while": when,
            "named_after_s": round(drops[0] - killed_at, 2) if drops else None,
            "named_as": next((line for t, line in master.lines if "dropped worker" in line and t >= killed_at), None),
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="default: the catalog's SmolLM2 (4-bit)")
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--deadline", type=float, default=180.0, help="seconds a generation may take before it is a hang")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.model is None:
        from edgeinfer.storage.fetch import pull

        args.model = str(pull("smollm2-135m"))
    alone = subprocess.run(cli("run", args.model, "-p", PROMPT, "-n", str(args.tokens), "--temp", "0", "-t", "1"),
                           capture_output=True, text=True, check=True).stdout
    port, rng = free_port(), random.Random(args.seed)
    cache = held_model_dir(args.model)
    workers = [start_worker(port, cache) for _ in range(2)]
    rows = []
    try:
        for g in range(args.generations):
            row = generation(args.model, port, args.tokens, workers, cache, args.deadline, rng)
            row["same_text"] = row.pop("text", None) == alone
            rows.append(row)
            print(f"# {g + 1}: {row}", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            w.proc.kill()
    lost = [r for r in rows if r.get("killed_while") in ("before the plan", "during the reply")]  # to be named
    late = [r for r in lost if r["named_after_s"] is None or r["named_after_s"] > STEP_TIMEOUT + 1]
    summary = {"generations": len(rows), "hangs": sum(r["hang"] for r in rows),
               "wrong_text": sum(not r["hang"] and not r["same_text"] for r in rows),
               "failed_exit": sum(not r["hang"] and r["code"] != 0 for r in rows),
               "killed_after_joining": len(lost), "loss_not_named_within_timeout": len(late),
               **{f"killed {k}": sum(r.get("killed_while") == k for r in rows)
                  for k in ("before it joined", "before the plan", "during the reply", "after the reply")},
               "named_after_s_max": max((r["named_after_s"] for r in lost if r["named_after_s"] is not None),
                                        default=None)}
    print(json.dumps({"summary": summary, "rows": rows, "step_timeout_s": STEP_TIMEOUT}, indent=1))
    print(f"soak: {summary['generations']} generations of {args.tokens} tokens on 3 nodes, a worker killed in each: "
          f"{summary['hangs']} hangs, {summary['wrong_text']} texts unlike one node's, {summary['failed_exit']} failed "
          f"exits; kills before the worker joined / before the plan / during the reply / after it: "
          f"{summary['killed before it joined']} / {summary['killed before the plan']} / "
          f"{summary['killed during the reply']} / {summary['killed after the reply']}; of those after joining, "
          f"{summary['loss_not_named_within_timeout']} not named within {STEP_TIMEOUT:g} s "
          f"(latest {summary['named_after_s_max']} s)")


if __name__ == "__main__":
    main()
