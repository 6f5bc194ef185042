"""llama-bench-shaped measurements: prefill (ppN) and decode (tgN) tok/s, optionally at a KV depth.

As llama-bench does: ppN evaluates one N-token batch, tgN evaluates N single tokens, both after
`depth` tokens already in the KV cache, with no sampling. Each test is repeated and reported as
mean and standard deviation.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from .model import Model

FILLER_TOKEN = 1  # any valid id: the cost does not depend on which


@dataclass(frozen=True)
class BenchRow:
    test: str  # "pp512", "tg128"
    threads: int
    depth: int
    tok_s: float
    tok_s_std: float
    model_size_mb: float
    weights: str  # "q4", "q8", "f32"
    attention: str = "exact"  # or "lut"

    def to_dict(self) -> dict:
        return asdict(self)


def _seconds(model: Model, tokens: int, depth: int, batch: bool) -> float:
    cache = model.new_cache(depth + tokens + 1)
    if depth:
        model.forward(np.full(depth, FILLER_TOKEN), cache)
    ids = np.full(tokens, FILLER_TOKEN)
    start = time.perf_counter()
    if batch:
        model.forward(ids, cache)
    else:
        for t in range(tokens):
            model.forward(ids[t:t + 1], cache)
    return time.perf_counter() - start


def run_bench(model: Model, model_size_mb: float, prompt: int, generate: int, repetitions: int,
              threads: list[int], depth: int = 0, attention: str = "exact") -> list[BenchRow]:
    from numba import set_num_threads

    model.warm_up()
    rows = []
    for n in threads:
        set_num_threads(n)
        for name, tokens, batch in ((f"pp{prompt}", prompt, True), (f"tg{generate}", generate, False)):
            if tokens <= 0:
                continue
            rates = [tokens / _seconds(model, tokens, depth, batch) for _ in range(repetitions)]
            std = statistics.stdev(rates) if len(rates) > 1 else 0.0
            rows.append(BenchRow(name, n, depth, statistics.mean(rates), std, model_size_mb, model.precision,
                                 attention))
    return rows


def markdown(rows: list[BenchRow]) -> str:
    lines = ["| weights | size MB | attention | threads | test | depth | tok/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.weights} | {r.model_size_mb:.1f} | {r.attention} | {r.threads} | {r.test} | {r.depth} | "
              f"{r.tok_s:.2f} ± {r.tok_s_std:.2f} |" for r in rows]
    return "\n".join(lines)
