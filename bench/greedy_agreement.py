"""How far greedy decoding of the 4-bit path follows the float32 path on the same dequantised weights.

The foundation tests' 5 chat prompts, 64 tokens each, SmolLM2-135M-Instruct (catalog file, 4-bit):
for each prompt, the number of tokens before the two paths first differ, and at that point the
float32 path's margin between its top two tokens (a near tie flips under int8 activations).
Prints JSON and a one-line summary.

    python bench/greedy_agreement.py [--model smollm2-135m] [-n 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from chat_prompts import CHAT_PROMPTS  # noqa: E402


def main() -> None:
    from edgeinfer.sampling import SamplingParams
    from edgeinfer.session import open_engine
    from edgeinfer.storage.fetch import resolve_model

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("-n", type=int, default=64)
    args = p.parse_args()
    path = resolve_model(args.model)
    fast, exact = open_engine(path), open_engine(path, float32=True)
    rows = []
    for prompt in CHAT_PROMPTS:
        ids = fast.chat_ids([{"role": "user", "content": prompt}])
        runs = []
        for engine in (fast, exact):
            gen = engine.generate(ids, SamplingParams(temperature=0), max_tokens=args.n)
            gen.run()
            runs.append(gen.token_ids)
        same = next((i for i, (a, b) in enumerate(zip(*runs)) if a != b), min(map(len, runs)))
        margin = None
        if same < min(map(len, runs)):
            logits = exact.model.forward(np.asarray(ids + runs[1][:same]), exact.model.new_cache(len(ids) + same))
            top = np.sort(logits)[-2:]
            margin = round(float(top[1] - top[0]), 4)
        rows.append({"prompt": prompt, "tokens_equal": same, "float32_top2_margin_at_divergence": margin})
    print(json.dumps(rows, indent=1))
    print(f"{args.model}: 4-bit greedy equals float32 for the first " +
          ", ".join(str(r["tokens_equal"]) for r in rows) + f" of {args.n} tokens; float32 top-2 margins where "
          "they part: " + ", ".join(str(r["float32_top2_margin_at_divergence"]) for r in rows))


if __name__ == "__main__":
    main()
