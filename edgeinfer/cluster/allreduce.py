"""Star all-reduce: every worker sends its partial sum to the master, which adds them in node order
and sends the total back. Two network hops whatever the node count (a ring needs 2(N-1)); a decode
payload is one hidden vector, so latency, not bandwidth, decides (TPI-LLM's finding). Partials and
sums travel on each worker's link (link.py), polled by the computing thread; the master's ZeroMQ
socket is watched meanwhile for a worker's report that it failed.

Each all-reduce of a step has a sequence number (the step's first, then one more per call); a link
carries one plan's messages in order, so any other number is an error.

On the 4/8-bit path a partial is fixed point (int64, kernels/simd.py; sent as int32 when every
value fits, as is usual below |8|): the master adds them as integers, so the total is the very one a
single node computes, whatever the split, and sends it back as float32. With sync "f2" partials (as
floats) and total travel as fp16 instead, the master rounding the total it keeps the same way: every
node adds the same vector, no longer one node's.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from ..errors import EdgeInferError
from ..kernels.simd import partial_to_float
from .link import PARTIAL, SUM, Link, LinkClosed, Received, as_array, wait_any
from .protocol import DTYPES, FIXED, FIXED_SMALL, Interrupted, Message

PING_EVERY = 1.0  # seconds without a partial between pings of the workers awaited


class Hub(Protocol):
    """The master as the star's hub sees it (master.Master): workers have a `link`."""

    workers: list
    timeout: float
    sock: object

    def recv(self, deadline: float | None, awaiting: list[bytes] = ()) -> tuple[bytes, Message] | None: ...
    def send(self, identity: bytes, kind: str, payload=None, **fields) -> None: ...
    def name_of(self, identity: bytes) -> str: ...


class Member(Protocol):
    """A worker as a member of the star sees it (worker.Worker)."""

    sock: object
    link: Link | None
    timeout: float

    def recv(self, timeout: float | None) -> Message | None: ...
    def send(self, kind: str, payload=None, **fields) -> None: ...


class NodeLost(EdgeInferError):
    """A worker failed, or sent nothing within the timeout."""

    def __init__(self, identity: bytes, reason: str):
        super().__init__(reason)
        self.identity = identity


class StarHub:
    """The master's side."""

    def __init__(self, master: Hub, sync: str = "f4"):
        self.master, self.sync = master, sync
        self.seq = 0
        # decode all-reduces (one vector each), and the last one's partial payload
        self.stats = {"calls": 0, "wait_s": 0.0, "bytes": 0, "payload": 0}

    def allreduce(self, partial: np.ndarray) -> np.ndarray:
        seq, self.seq = self.seq, self.seq + 1
        workers = self.master.workers
        wire = wire_dtype(partial, self.sync)
        parts: dict[bytes, np.ndarray] = {}
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.master.timeout
        quiet_since = time.monotonic()
        while True:
            waiting = [w for w in workers if w.identity not in parts]
            for w in waiting:
                try:
                    m = w.link.take()
                except LinkClosed as e:
                    raise NodeLost(w.identity, f"lost {w.name}'s link: {e}") from None
                if m is not None:
                    parts[w.identity] = self._partial(w, m, seq, wire, partial.shape)
                    quiet_since = time.monotonic()
            if len(parts) == len(workers):
                break
            now = time.monotonic()
            if now >= deadline:
                late = next(w for w in workers if w.identity not in parts)
                raise NodeLost(late.identity, f"{late.name} sent nothing for {self.master.timeout:g} s")
            if now - quiet_since >= PING_EVERY:  # a worker whose connection is gone fails the send
                for w in waiting:
                    self.master.send(w.identity, "ping")
                quiet_since = now
            wait_any([w.link for w in waiting], self.master.sock, min(PING_EVERY, deadline - now))
            if self.master.sock.poll(0):  # hellos, pongs, and a worker's report that it failed
                got = self.master.recv(time.monotonic())
                if got is not None and got[1].kind == "failed":
                    raise NodeLost(got[0], f"{self.master.name_of(got[0])} failed: {got[1].fields['message']}")
        if wire == FIXED:
            total = partial_to_float(partial + sum(parts.values()))  # integers: any order gives the same sum
        else:
            total = np.array(partial_to_float(partial), np.float32)
            if self.sync != "f4":
                total = total.astype(DTYPES[self.sync]).astype(np.float32)  # as the workers' partials travel
            for w in workers:
                total += parts[w.identity]
            if self.sync != "f4":
                total = total.astype(DTYPES[self.sync]).astype(np.float32)
        sent = total.astype(DTYPES[self.sync])
        for w in workers:
            try:
                w.link.send(SUM, seq, sent, self.sync, self.master.timeout)
            except LinkClosed as e:
                raise NodeLost(w.identity, f"lost {w.name}'s link: {e}") from None
        if partial.ndim == 1:
            self.stats["calls"] += 1
            self.stats["wait_s"] += time.perf_counter() - t0
            self.stats["bytes"] += sent.nbytes * len(workers)
        return total

    def _partial(self, w, m: Received, seq: int, wire: str, shape: tuple) -> np.ndarray:
        """A worker's partial from its message, checked against the master's own."""
        kind, got_seq, dtype, data = m.kind, m.seq, m.wire, m.data
        if kind != PARTIAL or got_seq != seq:
            raise NodeLost(w.identity, f"{w.name} sent message kind {kind} for all-reduce {got_seq}, "
                                       f"expected a partial for {seq}")
        a = as_array(data, dtype, shape)
        if a is None or (FIXED if dtype == FIXED_SMALL else dtype) != wire:
            raise NodeLost(w.identity, f"{w.name} sent a partial of {len(data)} bytes as {dtype}, "
                                       f"not {shape} as {wire}")
        if len(shape) == 1:
            self.stats["bytes"] += len(data)
            self.stats["payload"] = len(data)
        return a


class StarMember:
    """A worker's side: send the partial, wait for the total."""

    def __init__(self, worker: Member, sync: str = "f4"):
        self.worker, self.sync = worker, sync
        self.seq = 0
        self.wait_s = 0.0  # from sending a partial to having the total: network and the other nodes

    def begin(self, seq: int) -> None:
        self.seq = seq

    def allreduce(self, partial: np.ndarray) -> np.ndarray:
        seq, self.seq = self.seq, self.seq + 1
        t0 = time.perf_counter()
        wire = wire_dtype(partial, self.sync)
        sent = partial if wire == FIXED else partial_to_float(partial).astype(DTYPES[wire])
        if wire == FIXED and -2 ** 31 <= partial.min(initial=0) and partial.max(initial=0) < 2 ** 31:
            wire, sent = FIXED_SMALL, partial.astype(np.int32)  # every value fits: half the bytes, as exact
        try:
            self.worker.link.send(PARTIAL, seq, sent, wire, self.worker.timeout)
            return self._total(seq, partial.shape)
        except LinkClosed as e:
            raise self._interrupted(e) from None
        finally:
            self.wait_s += time.perf_counter() - t0

    def _total(self, seq: int, shape: tuple) -> np.ndarray:
        link = self.worker.link
        deadline = time.monotonic() + self.worker.timeout
        while True:
            m = link.take()
            if m is not None:
                kind, got_seq, dtype, data = m.kind, m.seq, m.wire, m.data
                total = as_array(data, dtype, shape) if kind == SUM and got_seq == seq and dtype == self.sync else None
                if total is None:
                    raise EdgeInferError(f"the master sent message kind {kind} for all-reduce {got_seq} "
                                         f"({len(data)} bytes as {dtype}), expected the sum of {shape} for {seq}")
                return total
            now = time.monotonic()
            if now >= deadline:
                raise EdgeInferError(f"the master sent no sum for {self.worker.timeout:g} s")
            wait_any([link], self.worker.sock, deadline - now)
            if self.worker.sock.poll(0):
                self._command(self.worker.recv(0))

    def _command(self, m: Message | None) -> None:
        """A message from the master in the middle of a step: a new command interrupts it."""
        if m is None:
            return
        if m.kind in ("load", "bye"):
            raise Interrupted(m)
        if m.kind == "ping":
            self.worker.send("pong")

    def _interrupted(self, closed: LinkClosed) -> Exception:
        """The master closed the link: it re-plans (a load follows) or is gone."""
        deadline = time.monotonic() + self.worker.timeout
        while (rest := deadline - time.monotonic()) > 0:
            m = self.worker.recv(rest)
            if m is not None and m.kind in ("load", "bye"):
                return Interrupted(m)
            if m is not None and m.kind == "ping":
                self.worker.send("pong")
        return EdgeInferError(f"lost the all-reduce link to the master: {closed}")


def wire_dtype(partial: np.ndarray, sync: str) -> str:
    """How a partial travels: fixed point as int64 (exact), unless sync fp16 rounds it; floats as sync."""
    return FIXED if partial.dtype == np.int64 and sync == "f4" else sync
