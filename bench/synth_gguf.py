"""A random-weight GGUF of a real model's shape, with SmolLM2's real tokenizer, as llama.cpp would
write it: F16, then requantized by llama.cpp's own quantizer (bench/requantize.py), so both engines
run the very same file at a real size. Honest for speed and memory, never for quality.

    python bench/synth_gguf.py [--shape llama3.2-1b-body] [--type Q4_0]   # prints the file's path
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from requantize import requantized  # noqa: E402

# name -> (hidden, layers, heads, kv heads, ffn); the vocabulary is SmolLM2's (49152)
SHAPES = {"llama3.2-1b-body": (2048, 16, 32, 8, 8192), "llama3-8b-body": (4096, 32, 32, 8, 14336)}
_TOKENIZER_SETTERS = {"model": "add_tokenizer_model", "pre": "add_tokenizer_pre", "tokens": "add_token_list",
                      "token_type": "add_token_types", "merges": "add_token_merges", "bos_token_id": "add_bos_token_id",
                      "eos_token_id": "add_eos_token_id"}


def write_f16(path: str, shape: str, tokenizer_from: str) -> None:
    import gguf

    from edgeinfer.storage.gguf import GGUFFile

    hidden, layers, heads, kv_heads, ffn = SHAPES[shape]
    src = GGUFFile(tokenizer_from)
    vocab = len(src.value("tokenizer.ggml.tokens"))
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, setter in _TOKENIZER_SETTERS.items():
        if (value := src.value(f"tokenizer.ggml.{key}")) is not None:
            getattr(w, setter)(value)
    rng = np.random.default_rng(0)
    normal = lambda *s: (rng.standard_normal(s, np.float32) * 0.02).astype(np.float16)  # noqa: E731
    hd = hidden // heads
    w.add_tensor("token_embd.weight", normal(vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        for name, rows, cols in (("attn_q", heads * hd, hidden), ("attn_k", kv_heads * hd, hidden),
                                 ("attn_v", kv_heads * hd, hidden), ("attn_output", hidden, heads * hd),
                                 ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)):
            w.add_tensor(f"blk.{i}.{name}.weight", normal(rows, cols))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    from edgeinfer.paths import home
    from edgeinfer.storage.fetch import fetch_gguf

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3.2-1b-body", choices=sorted(SHAPES))
    p.add_argument("--type", default="Q4_0", help="a llama.cpp file type (Q4_0, Q4_K_M, ...); F16 keeps it")
    args = p.parse_args()
    f16 = str(home() / "downloads" / f"synth-{args.shape}.F16.gguf")
    if not os.path.exists(f16):
        write_f16(f16 + ".part", args.shape, str(fetch_gguf("smollm2-135m")))
        os.replace(f16 + ".part", f16)
    print(f16 if args.type == "F16" else requantized(f16, args.type))


if __name__ == "__main__":
    main()
