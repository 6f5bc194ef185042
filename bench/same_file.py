"""edgeinfer and llama.cpp on the same GGUF, for quality: perplexity and greedy completions.

Perplexity over a text (default /usr/share/common-licenses/GPL-3) at each --ctx, both engines fed
the same token ids (edgeinfer's tokenization): for a model that adds BOS (Gemma) each window is BOS
and ctx - 1 text tokens, every text token scored; otherwise ctx text tokens, all but the first
scored (edgeinfer/perplexity.py). Then greedy raw completions of five prompts (-n tokens): how many
tokens agree before the two first part, and there edgeinfer's float32 top-2 margin (a near tie).
llama.cpp is llama-cpp-python in the peer venv (bench/peer.py), 2 threads; both engines' KV cache
is of --cache-type. Prints JSON and a summary.

    python bench/same_file.py [--model gemma3-270m | FILE.gguf] [--ctx 512 2048] [-n 32] [--cache-type f16]
                              [--no-greedy]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from peer import llama_cache_kwargs, run_in_peer  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):\n",
           "The three primary colors are", "In 1969, Neil Armstrong"]

PEER_SCRIPT = """
import json, math, sys
import numpy as np
from llama_cpp import Llama
path, job, cache = sys.argv[1], json.load(open(sys.argv[2])), json.loads(sys.argv[3])
out = {"ppl": {}, "greedy": []}
for ctx, windows in job["windows"].items():
    m = Llama(model_path=path, n_ctx=int(ctx), n_batch=512, n_threads=2, logits_all=True, verbose=False, **cache)
    nll = []
    for tokens in windows:
        m.reset()
        m.eval(tokens)
        logits = np.asarray(m.scores[:len(tokens) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll += list(-logp[np.arange(len(tokens) - 1), tokens[1:]])
    out["ppl"][ctx] = math.exp(float(np.mean(nll)))
    del m
m = Llama(model_path=path, n_ctx=512, n_threads=2, logits_all=True, verbose=False, **cache)
for ids in job["prompts"]:
    m.reset()
    m.eval(ids)
    got = []
    for _ in range(job["n"]):
        tok = int(np.argmax(m.scores[m.n_tokens - 1]))
        got.append(tok)
        m.eval([tok])
    out["greedy"].append(got)
print(json.dumps(out))
"""


def main() -> None:
    from edgeinfer.perplexity import perplexity, windows_of
    from edgeinfer.sampling import SamplingParams
    from edgeinfer.session import open_engine
    from edgeinfer.storage.fetch import fetch_gguf

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gemma3-270m", help="a catalog name or any GGUF file")
    p.add_argument("--ctx", type=int, nargs="*", default=[512, 2048], help="none: greedy completions only")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--cache-type", default="f16", help="both engines' KV cache: f16, q8_0 or f32")
    p.add_argument("--no-greedy", action="store_true", help="perplexity only")
    args = p.parse_args()
    path = args.model if os.path.exists(args.model) else str(fetch_gguf(args.model))
    fast = open_engine(path, max(args.ctx, default=512), cache_type=args.cache_type)
    exact = None if args.no_greedy else open_engine(path, 512, float32=True)  # top-2 margins where greedy parts
    tok = fast.tokenizer
    ids = tok.encode(open(args.text).read(), add_bos=False)
    bos = tok.bos_id if tok.spec.add_bos else None
    windows = {ctx: [([bos] if bos is not None else []) + w.tolist()
                     for w in windows_of(ids, ctx - 1 if bos is not None else ctx)] for ctx in args.ctx}
    prompts = [] if args.no_greedy else [tok.encode(text) for text in PROMPTS]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as job:
        json.dump({"windows": windows, "prompts": prompts, "n": args.n}, job)
        job.flush()
        peer = json.loads(run_in_peer(PEER_SCRIPT, path, job.name, llama_cache_kwargs(args.cache_type)))
    result = {"model": os.path.basename(path), "cache_type": args.cache_type, "ppl": {}, "greedy": []}
    for ctx in args.ctx:
        ours = perplexity(fast.model, ids, ctx, bos=bos).ppl
        theirs = peer["ppl"][str(ctx)]
        result["ppl"][ctx] = {"edgeinfer": round(ours, 4), "llamacpp": round(theirs, 4),
                              "difference": f"{(ours / theirs - 1) * 100:+.2f}%"}
    for text, prompt, theirs in zip(PROMPTS, prompts, peer["greedy"]):
        gen = fast.generate(prompt, SamplingParams(temperature=0), max_tokens=args.n)
        gen.run()
        ours = gen.token_ids
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        margin = None
        if same < min(len(ours), len(theirs)):
            logits = exact.model.forward(np.asarray(prompt + ours[:same]), exact.model.new_cache(len(prompt) + same))
            top = np.sort(logits)[-2:]
            margin = round(float(top[1] - top[0]), 4)
        result["greedy"].append({"prompt": text, "tokens_equal": same, "of": args.n,
                                 "float32_top2_margin_where_they_part": margin,
                                 "edgeinfer": tok.decode(ours), "llamacpp": tok.decode(theirs)})
    print(json.dumps(result, indent=1))
    print(f"{result['model']}, cache {args.cache_type}: PPL "
          + ("; ".join(f"ctx {c} edgeinfer {v['edgeinfer']} vs llama.cpp {v['llamacpp']} ({v['difference']})"
                       for c, v in result["ppl"].items()) or "-")
          + ("" if args.no_greedy else "; greedy tokens equal: "
             + ", ".join(f"{g['tokens_equal']}/{args.n}" for g in result["greedy"])))


if __name__ == "__main__":
    main()
