"""Sampling, in llama.cpp's default order: repetition, frequency and presence penalties, top-k, top-p, min-p, temperature.

Defaults are llama.cpp's: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no repetition penalty
(1.0) over the last 64 tokens. Temperature 0 is greedy. The same seed gives the same tokens.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # the window of all three penalties
    presence_penalty: float = 0.0  # subtracted once from a token seen in the window (OpenAI's), 0 = off
    frequency_penalty: float = 0.0  # subtracted per time it was seen, 0 = off
    seed: int | None = None  # None = a fresh random seed


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(32)
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        p = self.params
        if p.temperature <= 0 and not self._penalised(history):
            return int(np.argmax(logits))  # float32 to float64 is exact: the same argmax, without the copy
        logits = np.asarray(logits, dtype=np.float64)
        if self._penalised(history):
            logits = logits.copy()
            recent, counts = np.unique(np.asarray(history[-p.repeat_last_n:]), return_counts=True)
            vals = logits[recent]
            vals = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
            logits[recent] = vals - counts * p.frequency_penalty - p.presence_penalty
        if p.temperature <= 0:
            return int(np.argmax(logits))
        ids = np.arange(logits.size)
        if 0 < p.top_k < logits.size:
            ids = np.argpartition(-logits, p.top_k - 1)[:p.top_k]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        cand = logits[ids]
        probs = _softmax(cand)
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            ids, cand, probs = ids[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            ids, cand = ids[keep], cand[keep]
        probs = _softmax(cand / p.temperature)
        return int(ids[self._rng.choice(ids.size, p=probs)])

    def _penalised(self, history: Sequence[int]) -> bool:
        p = self.params
        return bool((p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty) and p.repeat_last_n > 0
                    and len(history))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
