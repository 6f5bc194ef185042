"""What an aarch64 run must reproduce from an x86 one (tests/test_aarch64.py runs this on both):
a 4-bit model's greedy tokens on the fused path, and the fixed-point partial sums a cluster node
computes for its column shard of each quantized layout (integers: bit for bit, on any CPU).

    python tests/aarch64_probe.py OUT.json [MODEL]     (without MODEL: the partial sums only)
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from edgeinfer.kernels.activations import quantize_activations
from edgeinfer.kernels.simd import kernel_path
from edgeinfer.model import Model
from edgeinfer.storage import open_model
from edgeinfer.storage.gguf_quants import gguf_matrix
from test_gguf_quants import random_blocks

SHARD_KINDS = ("Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0", "IQ4_NL")  # q4 with and without minima, q8, a lookup type
PROMPT = list(range(5, 21))
STEPS = 24


def greedy_tokens(path: str) -> tuple[list[int], list[float]]:
    """Greedy tokens after PROMPT on the fused 4/8-bit path, and each step's top logit."""
    model = Model(open_model(path), quantized=True)
    assert model.path.fused, model.path
    cache = model.new_cache(len(PROMPT) + STEPS)
    logits = model.forward(np.array(PROMPT), cache)
    tokens, tops = [], []
    for _ in range(STEPS):
        tokens.append(int(np.argmax(logits)))
        tops.append(float(np.max(logits)))
        logits = model.forward(np.array([tokens[-1]]), cache)
    return tokens, tops


def shard_partials() -> dict[str, str]:
    """Per layout: the digest of one shard's fixed-point partials (GEMV and a 3-token GEMM)."""
    rows, cols, cut = 20, 1024, 256 + 128
    out = {}
    for kind in SHARD_KINDS:
        m = gguf_matrix(kind, random_blocks(kind, rows, cols, seed=11), cols)
        shard = m.select(slice(0, rows), slice(cut, cols))
        x = np.random.default_rng(12).standard_normal((3, cols)).astype(np.float32)[:, cut:]
        one = shard.matmul(quantize_activations(x[0]), np.empty(rows, np.int64))
        batch = shard.matmul(quantize_activations(x), np.empty((3, rows), np.int64))
        out[kind] = hashlib.sha256(one.tobytes() + batch.tobytes()).hexdigest()[:16]
    return out


def probe(model: str | None = None) -> dict:
    found = {"kernel_path": kernel_path(), "partials": shard_partials()}
    if model:
        found["tokens"], found["top_logits"] = greedy_tokens(model)
    return found


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(probe(sys.argv[2] if len(sys.argv) > 2 else None), f)
