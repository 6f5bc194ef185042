"""The all-reduce: every node sends its partial sum as soon as it has it, and every node adds all of
them alike. The master is the hub of a star: it sends its own partial to every worker at once and
passes each worker's on to the others; a worker sends its own to the master. So the slower node
finds the others' partials already there, and the total costs one network hop after the last
partial (a star that gathers, adds and sends back the total takes two, with the master's adding
between them), and two when one worker's partial goes through the master to another. A decode
payload is one hidden vector, so latency, not bandwidth, decides (TPI-LLM's finding). Everything
travels on each worker's link (link.py), polled by the computing thread; the master's ZeroMQ
socket is watched meanwhile for a worker's report that it failed.

Each all-reduce of a step has a sequence number (the step's first, then one more per call); a link
carries one plan's messages in order, so any other number is an error. A partial carries its node
(0 is the master, then the workers in plan order), and every node adds them in node order.

On the 4/8-bit path a partial is fixed point (int64, kernels/simd.py; sent as int32 when every
value fits, as is usual below |8|), added as integers: the total is the very one a single node
computes, whatever the split. Float partials (--exact, or sync "f2" which sends them as fp16) are
added in float32 in node order, each as it was sent, so every node holds the same total.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from ..errors import EdgeInferError
from ..kernels.simd import partial_to_float
from .link import PARTIAL, Link, LinkClosed, Received, as_array, wait_any
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
        t0 = time.perf_counter()
        sent, wire, mine = to_wire(partial, self.sync)
        for w in workers:
            self._send(w, sent, wire, seq, 0)
        moved = sent.nbytes * len(workers)  # bytes sent and received
        parts: dict[int, np.ndarray] = {0: mine}  # by node
        deadline = time.monotonic() + self.master.timeout
        quiet_since = time.monotonic()
        while True:
            waiting = [(rank, w) for rank, w in enumerate(workers, 1) if rank not in parts]
            for rank, w in waiting:
                try:
                    m = w.link.take()
                except LinkClosed as e:
                    raise NodeLost(w.identity, f"lost {w.name}'s link: {e}") from None
                if m is not None:
                    parts[rank] = self._partial(w, rank, m, seq, wire, partial.shape)
                    moved += len(m.data) * len(workers)
                    for other in workers:  # on to the others, as it came
                        if other is not w:
                            self._send(other, m.data, m.wire, seq, rank)
                    quiet_since = time.monotonic()
            if len(parts) == len(workers) + 1:
                break
            now = time.monotonic()
            if now >= deadline:
                late = next(w for rank, w in waiting if rank not in parts)
                raise NodeLost(late.identity, f"{late.name} sent nothing for {self.master.timeout:g} s")
            if now - quiet_since >= PING_EVERY:  # a worker whose connection is gone fails the send
                for _, w in waiting:
                    self.master.send(w.identity, "ping")
                quiet_since = now
            wait_any([w.link for _, w in waiting], self.master.sock, min(PING_EVERY, deadline - now))
            if self.master.sock.poll(0):  # hellos, pongs, and a worker's report that it failed
                got = self.master.recv(time.monotonic())
                if got is not None and got[1].kind == "failed":
                    raise NodeLost(got[0], f"{self.master.name_of(got[0])} failed: {got[1].fields['message']}")
        total = combine([parts[i] for i in range(len(parts))], wire)
        if partial.ndim == 1:
            self.stats["calls"] += 1
            self.stats["wait_s"] += time.perf_counter() - t0
            self.stats["bytes"] += moved
            self.stats["payload"] = sent.nbytes
        return total

    def _send(self, w, data, wire: str, seq: int, node: int) -> None:
        try:
            w.link.send(PARTIAL, seq, data, wire, self.master.timeout, node)
        except LinkClosed as e:
            raise NodeLost(w.identity, f"lost {w.name}'s link: {e}") from None

    def _partial(self, w, rank: int, m: Received, seq: int, wire: str, shape: tuple) -> np.ndarray:
        """A worker's partial from its message, checked against the master's own."""
        a = check_partial(m, seq, wire, shape)
        if isinstance(a, str) or m.arg != rank:
            raise NodeLost(w.identity, f"{w.name} sent {a if isinstance(a, str) else f'the partial of node {m.arg}'}")
        return a


class StarMember:
    """A worker's side: send the partial, add it to the others' as they come."""

    def __init__(self, worker: Member, sync: str, rank: int, nodes: int):
        self.worker, self.sync, self.rank, self.nodes = worker, sync, rank, nodes
        self.seq = 0
        self.wait_s = 0.0  # from sending a partial to having the total: network and the other nodes

    def begin(self, seq: int) -> None:
        self.seq = seq

    def allreduce(self, partial: np.ndarray) -> np.ndarray:
        seq, self.seq = self.seq, self.seq + 1
        t0 = time.perf_counter()
        sent, wire, mine = to_wire(partial, self.sync)
        try:
            self.worker.link.send(PARTIAL, seq, sent, wire, self.worker.timeout, self.rank)
            return self._total(seq, mine, wire, partial.shape)
        except LinkClosed as e:
            raise self._interrupted(e) from None
        finally:
            self.wait_s += time.perf_counter() - t0

    def _total(self, seq: int, mine: np.ndarray, wire: str, shape: tuple) -> np.ndarray:
        link = self.worker.link
        parts = {self.rank: mine}
        deadline = time.monotonic() + self.worker.timeout
        while len(parts) < self.nodes:
            m = link.take()
            if m is not None:
                a = check_partial(m, seq, wire, shape)
                if isinstance(a, str) or not 0 <= m.arg < self.nodes or m.arg in parts:
                    raise EdgeInferError(f"the master sent {a if isinstance(a, str) else f'a partial of node {m.arg}'}")
                parts[m.arg] = a
                continue
            now = time.monotonic()
            if now >= deadline:
                raise EdgeInferError(f"the master sent no partials for {self.worker.timeout:g} s")
            wait_any([link], self.worker.sock, deadline - now)
            if self.worker.sock.poll(0):
                self._command(self.worker.recv(0))
        return combine([parts[i] for i in range(self.nodes)], wire)

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
            try:
                self._command(self.worker.recv(rest))
            except Interrupted as e:
                return e
        return EdgeInferError(f"lost the all-reduce link to the master: {closed}")


def to_wire(partial: np.ndarray, sync: str) -> tuple[np.ndarray, str, np.ndarray]:
    """How a node sends its partial (the array, its wire dtype) and the partial as the others
    receive it: fixed point as int64, or as int32 when every value fits (|x| < 8 at 2**-28, as is
    usual: half the bytes, as exact); floats as `sync`."""
    wire = wire_dtype(partial, sync)
    if wire == FIXED:
        if -2 ** 31 <= partial.min(initial=0) and partial.max(initial=0) < 2 ** 31:
            return partial.astype(np.int32), FIXED_SMALL, partial
        return partial, FIXED, partial
    sent = partial_to_float(partial).astype(DTYPES[wire])
    return sent, wire, sent.astype(np.float32)


def check_partial(m: Received, seq: int, wire: str, shape: tuple) -> np.ndarray | str:
    """The partial a message holds, or what is wrong with it: it must be this all-reduce's, of
    this shape, sent as `wire` (fixed point: as int64 or int32)."""
    if m.kind != PARTIAL or m.seq != seq:
        return f"message kind {m.kind} for all-reduce {m.seq}, expected a partial for {seq}"
    a = as_array(m.data, m.wire, shape)
    if a is None or (FIXED if m.wire == FIXED_SMALL else m.wire) != (FIXED if wire == FIXED_SMALL else wire):
        return f"a partial of {len(m.data)} bytes as {m.wire}, not {shape} as {wire}"
    return a


def combine(parts: list[np.ndarray], wire: str) -> np.ndarray:
    """Every node's partial (as received: int64 fixed point, or float32) added in node order into
    the float32 total, which every node computes alike."""
    total = parts[0].copy()
    for p in parts[1:]:
        total += p  # fixed point: exact in any order; floats: in node order, alike on every node
    return partial_to_float(total) if wire in (FIXED, FIXED_SMALL) else total


def wire_dtype(partial: np.ndarray, sync: str) -> str:
    """How a partial travels: fixed point as int64 (exact), unless sync fp16 rounds it; floats as sync."""
    return FIXED if partial.dtype == np.int64 and sync == "f4" else sync
