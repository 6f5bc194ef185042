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
        prompt = list(prompt)
        if not prompt:
            raise EdgeInferError("the prompt is empty: there is nothing to generate from")
        if len(prompt) >= self.context:
            raise ContextOverflowError(f"the prompt is {len(prompt)} tokens but the context holds {self.context}; "
                                       "shorten it or raise --ctx")
        sampler = Sampler(params)
        stats = GenerationStats(prompt_tokens=len(prompt), seed=sampler.seed)
        gen = Generation(iter(()), stats)
        gen._steps = self._run(gen, prompt, sampler, max_tokens, tuple(s for s in stop if s))
        return gen

    def _prefill(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        """Logits after the prompt, and how many prompt tokens had to be computed.

        The cached prefix is reused (a chat resends the whole conversation); at least one token runs."""
        reuse = 0
        for a, b in zip(self.cached_tokens, prompt[:-1]):
            if a != b:
                break
            reuse += 1
        self.cache.truncate(reuse)
        self.cached_tokens = prompt[:reuse]
        logits = self.model.forward(np.asarray(prompt[reuse:]), self.cache)
        self.cached_tokens = list(prompt)
        return logits, len(prompt) - reuse

    def _run(self, gen: Generation, prompt: list[int], sampler: Sampler, max_tokens: int,
             stop: tuple[str, ...]) -> Iterator[str]:
        stats, eos = gen.stats, set(self.tokenizer.eos_ids)
        t0 = time.perf_counter()
        logits, stats.prefill_tokens = self._prefill(prompt)
        stats.prefill_seconds = time.perf_counter() - t0
        history, stream, pending = list(prompt), self.tokenizer.stream(), ""
        stats.finish_reason = "length"
        while max_tokens < 0 or stats.generated_tokens < max_tokens:
            if gen._cancel.is_set():
                stats.finish_reason = "cancelled"
                break
            token = sampler(logits, history)
            if token in eos:
                stats.finish_reason = "stop"
                break
            history.append(token)
            gen.token_ids.append(token)
            stats.generated_tokens += 1
            pending += stream.feed(token)
            text, pending, hit = _split_stop(pending, stop)
            if text:
                yield text
            if hit:
                stats.finish_reason = "stop"
                return
            if max_tokens >= 0 and stats.generated_tokens >= max_tokens:
                break
            if self.cache.length >= self.context:
                stats.finish_reason = "context"
                break
            t1 = time.perf_counter()
            logits = self.model.forward(np.asarray([token]), self.cache)
            self.cached_tokens.append(token)
            stats.decode_seconds += time.perf_counter() - t1
            stats.decode_tokens += 1
        text, _, _ = _split_stop(pending + stream.flush(), stop, final=True)
        if text:
            yield text


def _split_stop(pending: str, stop: tuple[str, ...], final: bool = False) -> tuple[str, str, bool]:
    """(text safe to emit, text held back, whether a stop string was hit); nothing is held when final."""
    hits = [i for s in stop if (i := pending.find(s)) >= 0]
    if hits:
        return pending[:min(hits)], "", True
    if final or not stop:
        return pending, "", False
    hold = max((k for s in stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
    return pending[:len(pending) - hold], pending[len(pending) - hold:], False
