"""edgeinfer vs llama.cpp on the same GGUF, same threads, runs alternating: decode tg128, prefill pp512.

As llama-bench measures them: tg128 = 128 single-token evaluations after an empty context,
pp512 = one 512-token batch; no sampling. llama.cpp is llama-cpp-python built natively in its own
venv (bench/peer.py). Prints JSON and a one-line summary with the ratios edgeinfer / llama.cpp.

    python bench/peer_llamacpp.py [--model smollm2-135m | FILE.gguf] [--threads 2] [--rounds 3] [--depth D]

With --depth D both engines first fill their KV cache with D tokens, and only tg128 is measured, at
that depth (llama.cpp's cache is fp16; edgeinfer's is what --cache-type says, fp16 by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

from peer import run_in_peer  # noqa: E402

PEER_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, threads, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = Llama(model_path=path, n_ctx=max(1024, depth + 256), n_batch=512, n_threads=threads, n_threads_batch=threads,
          verbose=False)
bos = 1
result = {}
if not depth:
    m.reset(); m.eval([bos] * 512); m.reset()
    t = time.perf_counter(); m.eval([bos] * 512); result["pp512"] = 512 / (time.perf_counter() - t)
m.reset(); m.eval([bos] * (depth + 1))
t = time.perf_counter()
for _ in range(128):
    m.eval([bos])
result["tg128"] = 128 / (time.perf_counter() - t)
print(json.dumps(result))
"""


def edgeinfer_round(path: str, threads: int, depth: int, cache_type: str) -> dict[str, float]:
    from edgeinfer.bench import run_bench
    from edgeinfer.session import open_engine

    model = open_engine(path, max(1024, depth + 256), cache_type=cache_type).model
    rows = run_bench(model, 0.0, 0 if depth else 512, 128, 1, [threads], depth)
    return {r.test: r.tok_s for r in rows}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="a catalog name or any GGUF file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=0, help="tokens in the KV cache before tg128 (then no pp512)")
    p.add_argument("--cache-type", default="f16", help="edgeinfer's KV cache: f16 or f32")
    args = p.parse_args()
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    from edgeinfer.storage.fetch import fetch_gguf

    path = args.model if os.path.exists(args.model) else str(fetch_gguf(args.model))
    runs: dict[str, list[dict[str, float]]] = {"edgeinfer": [], "llama.cpp": []}
    for _ in range(args.rounds):  # alternate, so drift hits both alike
        runs["llama.cpp"].append(json.loads(run_in_peer(PEER_SCRIPT, path, str(args.threads), str(args.depth))))
        runs["edgeinfer"].append(edgeinfer_round(path, args.threads, args.depth, args.cache_type))
    result = {"model": os.path.basename(args.model), "threads": args.threads, "rounds": args.rounds,
              "depth": args.depth, "cache_type": args.cache_type}
    tests = ("tg128",) if args.depth else ("tg128", "pp512")
    for test in tests:
        ours = statistics.median(r[test] for r in runs["edgeinfer"])
        peer = statistics.median(r[test] for r in runs["llama.cpp"])
        result[test] = {"edgeinfer_tok_s": round(ours, 1), "llamacpp_tok_s": round(peer, 1), "ratio": round(ours / peer, 3)}
    print(json.dumps(result, indent=1))
    print(f"{result['model']}, {args.threads} threads, depth {args.depth}, cache {args.cache_type}, median of "
          f"{args.rounds} alternating rounds: "
          + "; ".join(f"{t} edgeinfer {result[t]['edgeinfer_tok_s']} vs llama.cpp {result[t]['llamacpp_tok_s']} tok/s "
                      f"(x{result[t]['ratio']})" for t in tests))


if __name__ == "__main__":
    main()
