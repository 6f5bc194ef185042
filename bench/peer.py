"""The llama.cpp peer: llama-cpp-python built natively in its own cached venv, never a dependency.

Building takes about 10 minutes on 2 cores, once; the venv lives outside edgeinfer's model cache so
clearing models does not throw the build away.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PEER_VERSION = "0.3.36"
PEER_HOME = Path(os.environ.get("EDGEINFER_PEER_HOME") or Path.home() / ".cache" / "edgeinfer-peer")


# Native, but without AMX: a VM may advertise it (CPUID, /proc/cpuinfo) and still fault on its first
# tile instruction (seen here: SIGILL on `tilezero` in libggml-cpu at the first eval, with the
# kernel granting the tile permission). GCC keeps an explicit -mno-* over -march=native's set.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS = f"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'"


def peer_python() -> Path:
    """The peer venv's python, building llama-cpp-python into it first if needed (or again, if it
    was built with other CMAKE_ARGS)."""
    python, built = PEER_HOME / "venv" / "bin" / "python", PEER_HOME / "venv" / "edgeinfer-cmake-args"
    check = [str(python), "-c", f"import llama_cpp; assert llama_cpp.__version__ == '{PEER_VERSION}'"]
    if python.exists() and built.exists() and built.read_text() == CMAKE_ARGS and \
            subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"building llama-cpp-python=={PEER_VERSION} ({CMAKE_ARGS}, about 10 minutes, once) in {PEER_HOME}",
          file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_HOME / "venv")], check=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([str(python), "-m", "pip", "install", "--no-cache-dir", f"llama-cpp-python=={PEER_VERSION}"],
                   check=True, env=env)
    built.write_text(CMAKE_ARGS)
    return python


def run_in_peer(script: str, *args: str) -> str:
    """Run a python snippet in the peer venv; its stdout."""
    result = subprocess.run([str(peer_python()), "-c", script, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"peer failed: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout


# ggml's type numbers for llama.cpp's -ctk/-ctv; a quantized V cache needs flash attention there.
_GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


def llama_cache_kwargs(cache_type: str) -> str:
    """Llama(...) keyword arguments (as JSON) for a KV cache of `cache_type`, as edgeinfer's --cache-type;
    f16 is llama.cpp's default and adds nothing."""
    import json

    if cache_type == "f16":
        return "{}"
    kwargs = {"type_k": _GGML_TYPES[cache_type], "type_v": _GGML_TYPES[cache_type]}
    return json.dumps({**kwargs, "flash_attn": True} if cache_type == "q8_0" else kwargs)
