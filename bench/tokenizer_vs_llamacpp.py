"""Tokenizer agreement with llama.cpp on the GGUF vocabularies edgeinfer rebuilds.

For each catalog GGUF (SmolLM2: byte-level BPE; Gemma 3: sentencepiece), tokenizes a few thousand
lines (a licence, Python source, generated unicode/numbers/whitespace) with edgeinfer and with
llama.cpp (vocab only, special tokens parsed, no BOS) and prints JSON plus a one-line summary.

    python bench/tokenizer_vs_llamacpp.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

from peer import run_in_peer  # noqa: E402

from edgeinfer.storage.fetch import fetch_gguf  # noqa: E402
from edgeinfer.storage.gguf import read_gguf_tokenizer  # noqa: E402
from edgeinfer.tokenizer import Tokenizer  # noqa: E402

PEER_TOKENIZE = """
import json, sys
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
lines = json.load(open(sys.argv[2]))
print(json.dumps([m.tokenize(l.encode(), add_bos=False, special=True) for l in lines]))
"""


def main() -> None:
    from test_real_model import real_text_lines

    lines = real_text_lines()
    results = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(lines, f)
    try:
        for name in ("smollm2-135m", "gemma3-270m"):
            path = str(fetch_gguf(name))
            peer = json.loads(run_in_peer(PEER_TOKENIZE, path, f.name))
            tok = Tokenizer(read_gguf_tokenizer(path))
            ours = [tok.encode(line, add_bos=False) for line in lines]
            same = sum(a == b for a, b in zip(ours, peer))
            results.append({"model": name, "kind": tok.spec.kind, "lines": len(lines), "identical": same,
                            "tokens": sum(map(len, ours)), "ratio_identical": same / len(lines)})
    finally:
        os.unlink(f.name)
    print(json.dumps(results, indent=1))
    print("; ".join(f"{r['model']} ({r['kind']}): {r['identical']}/{r['lines']} lines identical to llama.cpp"
                    for r in results))


if __name__ == "__main__":
    main()
