"""Generation: prefill, decode, the conversation's KV cache, stop conditions and timings.

The CLI, the TUI and the cluster master all consume a `Generation` the same way: iterate it for text
pieces as they become printable, read `.stats` when it ends, call `.cancel()` from any thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .config import ModelConfig
from .errors import ContextOverflowError, EdgeInferError, TokenizerError
from .model import Model
from .sampling import Sampler, SamplingParams
from .storage.memory_plan import MemoryPlan
from .threads import Threads
from .tokenizer import Tokenizer

DEFAULT_CONTEXT = 4096


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens computed; the rest came from the cache
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_tokens: int = 0  # forward passes after the first generated token
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop", "length", "context" or "cancelled"
    seed: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Generation:
    """One request's stream of text pieces; `text`, `token_ids` and `stats` fill in as it runs."""

    _steps: Iterator[str]
    stats: GenerationStats
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    _cancel: threading.Event = field(default_factory=threading.Event)

    def __iter__(self) -> Iterator[str]:
        for piece in self._steps:
            self.text += piece
            yield piece

    def cancel(self) -> None:
        self._cancel.set()

    def run(self) -> str:
        for _ in self:
            pass
        return self.text


def default_context(config: ModelConfig, requested: int | None = None) -> int:
    """The context a model runs at: as asked, else the model's, at most DEFAULT_CONTEXT."""
    return requested or min(config.max_context, DEFAULT_CONTEXT)


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, context: int | None = None):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise TokenizerError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                                 f"{model.config.vocab_size} rows")
        self.model, self.tokenizer = model, tokenizer
        self.context = default_context(model.config, context)
        self.cache = model.new_cache(self.context)
        self.cached_tokens: list[int] = []  # the tokens whose keys and values are in the cache
        self.memory_plan: MemoryPlan | None = None  # set by the session: resident, or streaming with a window
        self.threads = Threads()  # the kernels' thread count, re-chosen between steps

    def prompt_ids(self, text: str, raw: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a one-shot prompt (chat_ids of one user message)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return self.chat_ids(messages, raw)

    def chat_ids(self, messages: list[dict[str, str]], raw: bool = False) -> list[int]:
        """Token ids of a conversation: the chat template applied, or, when `raw` or the model has
        none, the last message as it is."""
        if raw or not self.tokenizer.chat_template:
            return self.tokenizer.encode(messages[-1]["content"])
        # Templates write BOS themselves where the model wants it (as transformers assumes).
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_bos=False)

    def generate(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), max_tokens: int = -1,
                 stop: Sequence[str] = ()) -> Generation:
        """Start generating after `prompt`; max_tokens < 0 means until end of generation or a full context."""
        prompt = self.check_prompt(prompt)
        sampler = Sampler(params)
        stats = GenerationStats(prompt_tokens=len(prompt), seed=sampler.seed)
        seq = Decoding(self.tokenizer, prompt, sampler, stats, max_tokens, stop)
        gen = Generation(iter(()), stats, seq.token_ids)
        gen._steps = self._run(gen, seq)
        return gen

    def check_prompt(self, prompt: Sequence[int]) -> list[int]:
        prompt = list(prompt)
        if not prompt:
            raise EdgeInferError("the prompt is empty: there is nothing to generate from")
        if len(prompt) >= self.context:
            raise ContextOverflowError(f"the prompt is {len(prompt)} tokens but the context holds {self.context}; "
                                       "shorten it or raise --ctx")
        return prompt

    def _prefill(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        """Logits after the prompt, and how many prompt tokens had to be computed."""
        logits, computed = prefill(self.model, self.cache, self.cached_tokens, prompt, self.threads)
        self.cached_tokens = list(prompt)
        return logits, computed

    def _run(self, gen: Generation, seq: "Decoding") -> Iterator[str]:
        stats = gen.stats
        t0 = time.perf_counter()
        logits, stats.prefill_tokens = self._prefill(seq.history)
        stats.prefill_seconds = time.perf_counter() - t0
        while True:
            if gen._cancel.is_set():
                seq.finish("cancelled")
                break
            text = seq.step(logits, room=self.cache.length < self.context)
            if text:
                yield text
            if stats.finish_reason:
                break
            self.threads.adapt()
            t1 = time.perf_counter()
            logits = self.model.forward(np.asarray([seq.token_ids[-1]]), self.cache)
            self.cached_tokens.append(seq.token_ids[-1])
            stats.decode_seconds += time.perf_counter() - t1
            stats.decode_tokens += 1
        text = seq.flush()
        if text:
            yield text


PREFILL_CHUNK = 512  # prompt tokens per forward call: bounds the prefill's scratch, and lets a batch step in


def common_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many of the prompt's tokens a cache holding `cached` can keep: their common prefix, but at
    least one token of the prompt must run (its logits are needed)."""
    reuse = 0
    for a, b in zip(cached, prompt[:-1]):
        if a != b:
            break
        reuse += 1
    return reuse


def prefill(model: Model, cache, cached: Sequence[int], prompt: Sequence[int],
            threads: Threads | None = None) -> tuple[np.ndarray, int]:
    """Logits after `prompt` in `cache`, which holds `cached` (a chat resends the whole conversation:
    the shared prefix is kept, as far as the cache can keep it); and how many prompt tokens had to
    be computed. In chunks of PREFILL_CHUNK tokens on the op-by-op path, whose rows do not depend on
    their neighbours: the same bits however much was cached and however the prompt is split.
    `threads` re-chooses the thread count before each chunk."""
    reuse = cache.truncate(common_prefix(cached, prompt))  # a local layer's ring may keep less
    for start in range(reuse, len(prompt), PREFILL_CHUNK):
        if threads is not None:
            threads.adapt()
        logits = model.prefill(np.asarray(prompt[start:start + PREFILL_CHUNK]), cache)
    return logits, len(prompt) - reuse


class Decoding:
    """One sequence after its prompt: each step samples a token from the logits, sees whether the
    sequence ends (end of generation, a stop string, max_tokens, a full context, the constraint's
    grammar complete) and returns the text that became printable, never showing a stop string.
    `token_ids[-1]` is what to feed next while `stats.finish_reason` is empty."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], sampler: Sampler, stats: GenerationStats,
                 max_tokens: int = -1, stop: Sequence[str] = (), constraint=None, top_logprobs: int | None = None):
        self.history, self.sampler, self.stats, self.max_tokens = list(prompt), sampler, stats, max_tokens
        self.stop, self.eos, self.stream = tuple(s for s in stop if s), set(tokenizer.eos_ids), tokenizer.stream()
        self.constraint = constraint  # masks the logits and follows the tokens (constrain.py)
        self.top_logprobs = top_logprobs  # None: no log-probabilities; else how many alternatives per token
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.token_ids: list[int] = []
        self.pending, self._cut = "", False

    def finish(self, reason: str) -> None:
        self.stats.finish_reason = reason

    def step(self, logits: np.ndarray, room: bool) -> str:
        """The text the next token adds; `room`: whether the cache can take one more token."""
        if 0 <= self.max_tokens <= self.stats.generated_tokens:
            self.finish("length")
            return ""
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        token = self.sampler(logits, self.history)
        if self.top_logprobs is not None:
            self.logprobs.append(_logprobs(logits, token, self.top_logprobs))
        if token in self.eos:
            self.finish("stop")
            return ""
        self.history.append(token)
        self.token_ids.append(token)
        self.stats.generated_tokens += 1
        if self.constraint is not None and self.constraint.accept(token):
            self.finish("stop")  # the grammar is complete
        self.pending += self.stream.feed(token)
        text, self.pending, hit = _split_stop(self.pending, self.stop)
        if hit:
            self._cut = True
            self.finish("stop")
        elif not self.stats.finish_reason:
            if 0 <= self.max_tokens <= self.stats.generated_tokens:
                self.finish("length")
            elif not room:
                self.finish("context")
        return text

    def flush(self) -> str:
        """What is held back once the sequence has ended (nothing after a stop string)."""
        if self._cut:
            return ""
        text, _, _ = _split_stop(self.pending + self.stream.flush(), self.stop, final=True)
        self.pending = ""
        return text


def _logprobs(logits: np.ndarray, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """The token's log-probability under the model's distribution, and the `top` likeliest tokens'."""
    x = np.asarray(logits, np.float64)
    finite = x[np.isfinite(x)]
    logz = finite.max() + np.log(np.exp(finite - finite.max()).sum())
    best = np.argsort(-x, kind="stable")[:top] if top else []
    return token, float(x[token] - logz), [(int(i), float(x[i] - logz)) for i in best]


def _split_stop(pending: str, stop: tuple[str, ...], final: bool = False) -> tuple[str, str, bool]:
    """(text safe to emit, text held back, whether a stop string was hit); nothing is held when final."""
    hits = [i for s in stop if (i := pending.find(s)) >= 0]
    if hits:
        return pending[:min(hits)], "", True
    if final or not stop:
        return pending, "", False
    hold = max((k for s in stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
    return pending[:len(pending) - hold], pending[len(pending) - hold:], False
