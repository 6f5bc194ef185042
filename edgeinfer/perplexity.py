"""Perplexity over a text, as llama-perplexity computes it, and KL divergence against a base run.

The whole text is tokenized without BOS and cut into non-overlapping windows (the remainder
dropped), each run from an empty cache. For a model without BOS (SmolLM2) a window is `ctx` text
tokens, every one but the first scored; for a model that adds BOS (Gemma), BOS and `ctx` - 1 text
tokens, every text token scored. Either way a window scores ctx - 1 tokens.
PPL = exp(mean NLL), its ± the standard error propagated from the NLLs' (as llama.cpp reports it).

A KL base file holds the log-probabilities of every scored token (float16, one row per token) of a
run, usually of the float32 path (`--exact`); a later run against it reports the mean KL divergence
KL(base || this run) and how often both pick the same top token.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .errors import EdgeInferError
from .model import Model
from .threads import Threads


SCORE_BYTES = 64 << 20  # float64 log-probabilities scored at a time (rows of the vocabulary's width)
SCORE_ROWS = 128  # at most


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_error: float
    tokens_scored: int
    windows: int
    kl_mean: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def windows_of(ids: list[int], ctx: int) -> list[np.ndarray]:
    if ctx < 2:
        raise EdgeInferError(f"--ctx must be at least 2, got {ctx}")
    count = len(ids) // ctx
    if count == 0:
        raise EdgeInferError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    return [np.asarray(ids[i * ctx:(i + 1) * ctx]) for i in range(count)]


def perplexity(model: Model, ids: list[int], ctx: int, kl_base: str | None = None,
               progress: Callable[[int, int], None] | None = None, bos: int | None = None) -> PerplexityResult:
    if bos is None:
        windows = windows_of(ids, ctx)
    else:
        windows = [np.concatenate([[bos], w]) for w in windows_of(ids, ctx - 1)]
    scored = len(windows) * (ctx - 1)
    base = _KLBase(kl_base, scored, model.config.vocab_size) if kl_base else None
    nll = np.empty(scored)
    cache = model.new_cache(ctx)
    block = max(1, min(SCORE_ROWS, SCORE_BYTES // (8 * model.config.vocab_size)))
    threads = Threads()  # re-chosen for each window
    try:
        for w, tokens in enumerate(windows):
            threads.adapt()
            cache.truncate(0)
            h = model.run_layers(model.embed(tokens), cache)
            # A block of rows at a time, logits too: a window's at once take 2 GB with a 262k vocabulary.
            for i, logits in enumerate(model.logit_blocks(h[:ctx - 1], block)):
                r, n = i * block, logits.shape[0]
                logprobs = log_softmax(logits.astype(np.float64))
                rows = slice(w * (ctx - 1) + r, w * (ctx - 1) + r + n)
                nll[rows] = -logprobs[np.arange(n), tokens[r + 1:r + 1 + n]]
                if base:
                    base.add(rows, logprobs)
            if progress:
                progress(w + 1, len(windows))
    except BaseException:
        if base:
            base.abandon()
        raise
    mean = float(nll.mean())
    ppl = math.exp(mean)
    error = ppl * math.sqrt(max(float((nll ** 2).mean()) - mean ** 2, 0.0) / max(scored - 1, 1))
    kl, top1 = base.finish() if base else (None, None)
    return PerplexityResult(ppl, error, scored, len(windows), kl, top1)


class _KLBase:
    """Writes the base's log-probabilities (when the file does not exist yet) or compares with them."""

    def __init__(self, path: str, rows: int, vocab: int):
        self.path, self.writing = path, not os.path.exists(path)
        if self.writing:
            self.tmp = f"{path}.tmp-{os.getpid()}"
            self.data = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float16, shape=(rows, vocab))
        else:
            try:
                self.data = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise EdgeInferError(f"{path}: not a KL base file ({exc})") from None
            if self.data.shape != (rows, vocab):
                raise EdgeInferError(f"{path}: the KL base holds {self.data.shape[0]} tokens x {self.data.shape[1]} "
                                     f"logits, this run scores {rows} x {vocab}: not the same text, --ctx or model")
            self.kl, self.same = 0.0, 0

    def add(self, rows: slice, logprobs: np.ndarray) -> None:
        if self.writing:
            self.data[rows] = logprobs
            return
        base = self.data[rows].astype(np.float64)
        self.kl += float((np.exp(base) * (base - logprobs)).sum())
        # Top tokens compared at the base's own (float16) precision, so that rounding makes no ties.
        self.same += int((base.argmax(-1) == logprobs.astype(np.float16).argmax(-1)).sum())

    def abandon(self) -> None:
        """Leave nothing half-written behind."""
        if self.writing:
            del self.data
            os.unlink(self.tmp)

    def finish(self) -> tuple[float | None, float | None]:
        if self.writing:
            self.data.flush()
            del self.data
            os.replace(self.tmp, self.path)
            return None, None
        return self.kl / self.data.shape[0], self.same / self.data.shape[0]
