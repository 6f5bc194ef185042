"""A matrix's kind (kernels/kinds.py) chooses its kernel's loop when the code compiles: a decode
layer over Q4_0 matrices compiles q4.py's folded loop and none of the others' kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from edgeinfer.kernels.kinds import by_kind, kind, name_of

# In a fresh process with an empty kernel cache, so that every kernel the projection needs compiles
# (and so appears among its dispatcher's signatures) and no other does.
PROBE = """
import json, sys
import numpy as np
from edgeinfer.kernels import q4, q6, q8
from edgeinfer.kernels.activations import quantize_activations
from edgeinfer.kernels.decode_layer import activation_buffers, project
from edgeinfer.kernels.kinds import name_of

rng = np.random.default_rng(2)
m = q4.Q4Matrix.from_rows(rng.integers(0, 256, (16, 128), dtype=np.uint8), (rng.random((16, 8)) * 0.02).astype(np.float32))
x, out = rng.standard_normal(256).astype(np.float32), np.empty(16, np.float32)
project(m.kernel_args(), x, activation_buffers(256), 0, out)
expected = q4.gemv_reference(m, quantize_activations(x))  # numpy
compiled = {f"{mod.__name__}.{f.__name__}": len(f.signatures) for mod in (q4, q6, q8)
            for f in (mod._gemv_parallel, mod._gemv_serial, mod._gemm)}
blocks = {name_of(k): len(f.signatures) for k, (f, _) in q4._blocks.items()}
json.dump({"error": float(np.abs(out - expected).max() / np.abs(expected).max()), "compiled": compiled, "blocks": blocks}, sys.stdout)
"""


def test_by_kind_calls_the_kinds_function_from_python():
    a, b = kind("a"), kind("b")
    f = by_kind({a: lambda x: x + 1, b: lambda x: x * 10})
    assert (f(a, 2), f(b, 2), name_of(a)) == (3, 20, "a")


def test_a_decode_layer_compiles_only_its_matrices_kinds(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert found["error"] < 3e-6
    assert found["compiled"] == {"edgeinfer.kernels.q4._gemv_parallel": 1, "edgeinfer.kernels.q4._gemv_serial": 0,
                                 "edgeinfer.kernels.q4._gemm": 0, **{f"edgeinfer.kernels.{m}.{f}": 0 for m in ("q6", "q8")
                                                                     for f in ("_gemv_parallel", "_gemv_serial", "_gemm")}}
    assert found["blocks"] == {"q4": 0, "q4_0": 1, "iq4": 0}
