"""edgeinfer vs llama.cpp on the same GGUF, same threads, runs alternating: decode tg128, prefill pp512.

As llama-bench measures them: tg128 = 128 single-token evaluations after an empty context,
pp512 = one 512-token batch; no sampling. llama.cpp is llama-cpp-python built natively in its own
venv (bench/peer.py). Each round also measures the read bandwidth (bench/roofline.py's streaming
read, same threads): decode's GB/s is the file's bytes a step reads (every tensor but the embedding,
unless tied) times tok/s, for both engines. Prints JSON and a one-line summary with the ratios
edgeinfer / llama.cpp.

    python bench/peer_llamacpp.py [--model smollm2-135m | FILE.gguf] [--threads 2] [--rounds 3] [--depth D]

With --depth D both engines first fill their KV cache with D tokens, and only tg128 is measured, at
that depth. Both engines' KV cache is of --cache-type (f16 by default, both engines' default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

from peer import llama_cache_kwargs, run_in_peer  # noqa: E402

PEER_SCRIPT = """
import json, sys, time
from llama_cpp import Llama
path, threads, depth, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
m = Llama(model_path=path, n_ctx=max(1024, depth + 256), n_batch=512, n_threads=threads, n_threads_batch=threads,
          verbose=False, **cache)
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


def bytes_per_token(path: str) -> int:
    """What a decode step reads of the file's tensors: all of them but the embedding, whose one row
    is read, unless it is also the (tied) output head."""
    from edgeinfer.storage.gguf import GGUFFile

    tensors = GGUFFile(path).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(t.data.nbytes for t in tensors if tied or t.name != "token_embd.weight")


def read_gb_s(threads: int) -> float:
    """This machine's read bandwidth now: the median of 5 passes over 512 MB (bench/roofline.py)."""
    import numpy as np
    from numba import set_num_threads
    from roofline import WORKING_SET, _read_all, seconds

    set_num_threads(threads)
    stream = np.ones(WORKING_SET // 4, dtype=np.float32)
    _read_all(stream, threads * 8)
    return stream.nbytes / float(np.median([seconds(lambda: _read_all(stream, threads * 8)) for _ in range(5)])) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="a catalog name or any GGUF file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=0, help="tokens in the KV cache before tg128 (then no pp512)")
    p.add_argument("--cache-type", default="f16", help="both engines' KV cache: f16, q8_0 (llama.cpp then with flash "
                   "attention, which its quantized V cache needs) or f32")
    args = p.parse_args()
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    from edgeinfer.storage.fetch import fetch_gguf

    path = args.model if os.path.exists(args.model) else str(fetch_gguf(args.model))
    runs: dict[str, list[dict[str, float]]] = {"edgeinfer": [], "llama.cpp": []}
    bandwidth = []
    for _ in range(args.rounds):  # alternate, so drift hits both alike
        bandwidth.append(read_gb_s(args.threads))
        runs["llama.cpp"].append(json.loads(run_in_peer(PEER_SCRIPT, path, str(args.threads), str(args.depth),
                                                              llama_cache_kwargs(args.cache_type))))
        runs["edgeinfer"].append(edgeinfer_round(path, args.threads, args.depth, args.cache_type))
    result = {"model": os.path.basename(args.model), "threads": args.threads, "rounds": args.rounds,
              "depth": args.depth, "cache_type": args.cache_type}
    tests = ("tg128",) if args.depth else ("tg128", "pp512")
    for test in tests:
        ours = statistics.median(r[test] for r in runs["edgeinfer"])
        peer = statistics.median(r[test] for r in runs["llama.cpp"])
        result[test] = {"edgeinfer_tok_s": round(ours, 1), "llamacpp_tok_s": round(peer, 1), "ratio": round(ours / peer, 3)}
    per_token, read = bytes_per_token(path), statistics.median(bandwidth)
    result["decode_bytes_per_token_mb"], result["read_gb_s"] = round(per_token / 2**20, 1), round(read, 1)
    for name, key in (("edgeinfer", "edgeinfer_tok_s"), ("llamacpp", "llamacpp_tok_s")):  # weights only
        gb_s = per_token * result["tg128"][key] / 1e9
        result["tg128"][f"{name}_gb_s"], result["tg128"][f"{name}_of_read"] = round(gb_s, 1), round(gb_s / read, 3)
    weights_only = "" if not args.depth else ", the KV cache's reads not counted"
    print(json.dumps(result, indent=1))
    print(f"{result['model']}, {args.threads} threads, depth {args.depth}, cache {args.cache_type}, median of "
          f"{args.rounds} alternating rounds: "
          + "; ".join(f"{t} edgeinfer {result[t]['edgeinfer_tok_s']} vs llama.cpp {result[t]['llamacpp_tok_s']} tok/s "
                      f"(x{result[t]['ratio']})" for t in tests)
          + f"; decode reads {result['decode_bytes_per_token_mb']} MB of the file per token{weights_only}: edgeinfer "
            f"{result['tg128']['edgeinfer_gb_s']} GB/s, llama.cpp {result['tg128']['llamacpp_gb_s']} GB/s, read bandwidth "
            f"{result['read_gb_s']} GB/s ({result['tg128']['edgeinfer_of_read']:.0%}, "
            f"{result['tg128']['llamacpp_of_read']:.0%})")


if __name__ == "__main__":
    main()
