"""Continuous batching: several requests decode together, one token each per step, every weight read
once for all of them (Model.decode_batch); a new request is prefilled between steps and joins the
next one; a finished or cancelled one leaves its slot at once.

Each slot is a KV cache that keeps the tokens it holds after its request ends, so a request that
extends an earlier conversation is given the slot sharing its longest prefix and computes only the
rest (as the chat loop does with its one cache). Results do not depend on the company a request
keeps: its greedy tokens are those of engine.Engine alone (Model.decode_batch's rows equal forward's
bit for bit, and prompts are prefilled in the same chunks).

One thread runs the steps (run()); requests are submitted from any thread and their events are delivered
through a callback on that thread: ("text", piece, logprobs) as text becomes printable, then
("done", stats), or ("error", message).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .engine import Decoding, Engine, GenerationStats, common_prefix, prefill
from .errors import EdgeInferError
from .sampling import Sampler, SamplingParams

DEFAULT_PARALLEL = 4
Event = Callable[[str, object, object], None]


class QueueFull(EdgeInferError):
    """More requests wait than the queue holds."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams = SamplingParams()
    max_tokens: int = -1
    stop: Sequence[str] = ()
    constraint: object | None = None  # constrain.Constraint
    top_logprobs: int | None = None  # None: no log-probabilities


@dataclass
class Handle:
    """A submitted request. `on_event` is called on the batch's thread."""

    request: Request
    on_event: Event
    stats: GenerationStats = field(default_factory=GenerationStats)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Slot:
    index: int  # in the model's slot caches
    cache: object  # the model's KV cache of this slot
    cached: list[int] = field(default_factory=list)  # the tokens whose keys and values it holds
    handle: Handle | None = None
    seq: Decoding | None = None
    logits: np.ndarray | None = None
    used: float = 0.0


@dataclass
class Metrics:
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0  # prompt tokens whose keys and values came from a slot's cache
    generated_tokens: int = 0
    requests: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=32))  # (tokens, seconds) of the last steps

    @property
    def decode_tok_s(self) -> float:
        seconds = sum(s for _, s in self.recent)
        return sum(t for t, _ in self.recent) / seconds if seconds else 0.0


class Batch:
    def __init__(self, engine: Engine, parallel: int = DEFAULT_PARALLEL, queue_limit: int = 64):
        """`parallel` slots of engine.context positions each. A model without batched decode (a
        cluster master: its workers hold one conversation) serves one request at a time."""
        self.engine, self.model, self.context, self.queue_limit = engine, engine.model, engine.context, queue_limit
        if hasattr(self.model, "decode_batch"):
            self.caches = self.model.new_caches(engine.context, parallel)
            self.slots = [_Slot(s, self.caches.slot(s)) for s in range(parallel)]
        else:
            self.caches, self.slots = None, [_Slot(0, engine.cache)]
        self.metrics = Metrics()
        self._waiting: deque[Handle] = deque()
        self._cond = threading.Condition()
        self._closed = False

    @property
    def parallel(self) -> int:
        return len(self.slots)

    def running(self) -> int:
        return sum(s.handle is not None for s in self.slots)

    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request, on_event: Event) -> Handle:
        """Queue `request`; raises ContextOverflowError for a prompt the context cannot hold and
        QueueFull when the queue is full."""
        request.prompt = self.engine.check_prompt(request.prompt)
        handle = Handle(request, on_event)
        with self._cond:
            if self._closed:
                raise EdgeInferError("the server is shutting down")
            if len(self._waiting) >= self.queue_limit:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    def close(self) -> None:
        """Make run() return after the step it is in."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def run(self) -> None:
        """Run steps until close(), on the thread that opened the model: Numba's OpenMP threads belong
        to the thread that starts their parallel regions, and a second such thread made every step
        slower by 13 ms here (4 ms -> 17 ms a step for SmolLM2)."""
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self.running():
                    self._cond.wait()
                if self._closed:
                    return
                admit = self._waiting.popleft() if self._waiting and self._free() else None
            if admit is not None:
                self._admit(admit)
            self._step()

    def _free(self) -> list[_Slot]:
        return [s for s in self.slots if s.handle is None]

    def _admit(self, handle: Handle) -> None:
        """Prefill a request into the free slot that shares the longest prefix with it."""
        if handle.cancelled.is_set():
            return self._end(None, handle, "cancelled")
        req, stats = handle.request, handle.stats
        slot = max(self._free(), key=lambda s: (common_prefix(s.cached, req.prompt), -s.used))
        sampler = Sampler(req.params)
        stats.prompt_tokens, stats.seed = len(req.prompt), sampler.seed
        slot.handle, slot.used = handle, time.monotonic()
        try:
            slot.cached = slot.cached[:common_prefix(slot.cached, req.prompt)]
            t0 = time.perf_counter()
            slot.logits, stats.prefill_tokens = prefill(self.model, slot.cache, slot.cached, req.prompt,
                                                         self.engine.threads)
            stats.prefill_seconds = time.perf_counter() - t0
            slot.cached = list(req.prompt)
        except Exception as exc:  # noqa: BLE001 — the request fails, the server stays up
            return self._fail(slot, exc)
        m = self.metrics
        m.requests += 1
        m.prompt_tokens += stats.prompt_tokens
        m.prompt_tokens_cached += stats.prompt_tokens - stats.prefill_tokens
        slot.seq = Decoding(self.engine.tokenizer, req.prompt, sampler, stats, req.max_tokens, req.stop,
                            req.constraint, req.top_logprobs)

    def _step(self) -> None:
        """Sample a token for every running sequence, then run those that go on, together."""
        going = []
        for slot in self.slots:
            if slot.handle is None:
                continue
            seq, handle = slot.seq, slot.handle
            if handle.cancelled.is_set():
                seq.finish("cancelled")
            else:
                known, before = len(seq.logprobs), len(seq.token_ids)
                try:
                    text = seq.step(slot.logits, room=slot.cache.length < self.context)
                except Exception as exc:  # noqa: BLE001
                    self._fail(slot, exc)
                    continue
                self.metrics.generated_tokens += len(seq.token_ids) - before
                if text or len(seq.logprobs) > known:
                    handle.on_event("text", text, seq.logprobs[known:])
            if handle.stats.finish_reason:
                tail = seq.flush()
                if tail:
                    handle.on_event("text", tail, [])
                self._end(slot, handle, handle.stats.finish_reason)
            else:
                going.append(slot)
        if not going:
            return
        tokens = np.array([s.seq.token_ids[-1] for s in going])
        self.engine.threads.adapt()
        t0 = time.perf_counter()
        try:
            if self.caches is not None:
                logits = self.model.decode_batch(tokens, self.caches, [s.index for s in going])
            else:
                logits = [self.model.forward(tokens[:1], going[0].cache)]
        except Exception as exc:  # noqa: BLE001
            for slot in going:
                self._fail(slot, exc)
            return
        seconds = time.perf_counter() - t0
        m = self.metrics
        m.decode_steps += 1
        m.decode_tokens += len(going)
        m.decode_seconds += seconds
        m.recent.append((len(going), seconds))
        for slot, row in zip(going, logits):
            slot.logits = row
            slot.cached.append(int(slot.seq.token_ids[-1]))
            slot.handle.stats.decode_tokens += 1
            slot.handle.stats.decode_seconds += seconds

    def _end(self, slot: _Slot | None, handle: Handle, reason: str) -> None:
        handle.stats.finish_reason = reason
        if slot is not None:
            slot.handle, slot.seq, slot.logits, slot.used = None, None, None, time.monotonic()
        handle.on_event("done", handle.stats, None)

    def _fail(self, slot: _Slot, exc: Exception) -> None:
        """A request that failed: its slot's cache is no longer trusted."""
        handle = slot.handle
        slot.cached, slot.handle, slot.seq, slot.logits = [], None, None, None
        slot.cache.truncate(0)
        handle.on_event("error", f"{type(exc).__name__}: {exc}" if not isinstance(exc, EdgeInferError) else str(exc),
                        None)
