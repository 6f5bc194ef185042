"""Requantize a GGUF with llama.cpp's own quantizer (llama-cpp-python in the peer venv), so
edgeinfer is measured on the files llama.cpp users make: the same weights in Q4_K_M, Q6_K, ...

    python bench/requantize.py [--model smollm2-135m] Q4_K_M Q6_K ...   # prints the files' paths

Files go beside the source in edgeinfer's download cache and are made once.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from peer import run_in_peer  # noqa: E402

QUANTIZE_SCRIPT = """
import ctypes, sys
import llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], sys.argv[3]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
params.allow_requantize = True
params.nthread = 2
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
sys.exit(rc)
"""


def requantized(source: str, ftype: str) -> str:
    """`source` requantized to `ftype` (a llama.cpp file type name such as Q4_K_M), made once."""
    stem = os.path.splitext(source)[0].rsplit(".", 1)[0]
    out = f"{stem}.requant-{ftype}.gguf"
    if not os.path.exists(out):
        tmp = out + ".part"
        run_in_peer(QUANTIZE_SCRIPT, source, tmp, ftype)
        os.replace(tmp, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="a catalog name or a GGUF path")
    p.add_argument("ftypes", nargs="+")
    args = p.parse_args()
    from edgeinfer.storage.fetch import fetch_gguf

    source = args.model if os.path.exists(args.model) else str(fetch_gguf(args.model))
    for ftype in args.ftypes:
        print(requantized(source, ftype))


if __name__ == "__main__":
    main()
