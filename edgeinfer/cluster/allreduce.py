"""Star all-reduce: every worker sends its partial sum to the master, which adds them in node order
and sends the total back. Two network hops whatever the node count (a ring needs 2(N-1)); a decode
payload is one hidden vector, so latency, not bandwidth, decides (TPI-LLM's finding).

Each all-reduce of a step has a sequence number (the step's first, then one more per call), so a
late partial from before a re-plan is recognised and dropped.

On the 4/8-bit path a partial is fixed point (int64, kernels/simd.py; sent as int32 when every
value fits, as is usual below |8|): the master adds them as integers, so the total is the very one a single node computes, whatever the split, and sends it back
as float32. With sync "f2" partials (as floats) and total travel as fp16 instead, the master rounding
the total it keeps the same way: every node adds the same vector, no longer one node's.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from ..errors import EdgeInferError
from ..kernels.simd import partial_to_float
from .protocol import DTYPES, FIXED, FIXED_SMALL, Interrupted, Message, encode_array


class Hub(Protocol):
    """The master as the star's hub sees it (master.Master)."""

    workers: list
    timeout: float

    def recv(self, deadline: float | None, awaiting: list[bytes] = ()) -> tuple[bytes, Message] | None: ...
    def send_frames(self, identity: bytes, frames: list[bytes]) -> None: ...
    def name_of(self, identity: bytes) -> str: ...


class Member(Protocol):
    """A worker as a member of the star sees it (worker.Worker)."""

    sock: object
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
        while len(parts) < len(workers):
            got = self.master.recv(deadline, [w.identity for w in workers if w.identity not in parts])
            if got is None:
                late = next(w for w in workers if w.identity not in parts)
                raise NodeLost(late.identity, f"{late.name} sent nothing for {self.master.timeout:g} s")
            identity, m = got
            if m.kind == "failed":
                raise NodeLost(identity, f"{self.master.name_of(identity)} failed: {m.fields['message']}")
            if m.kind != "partial" or m.fields["seq"] != seq or identity in parts:
                continue  # late from an earlier step; joins are handled by the master between requests
            a = m.array()
            sent = FIXED if m.fields["dtype"] == FIXED_SMALL else m.fields["dtype"]
            if a.shape != partial.shape or sent != wire:
                raise NodeLost(identity, f"{self.master.name_of(identity)} sent a partial of shape {a.shape} "
                                         f"as {m.fields['dtype']}, not {partial.shape} as {wire}")
            parts[identity] = a
            if partial.ndim == 1:
                self.stats["bytes"] += len(m.payload)
                self.stats["payload"] = len(m.payload)
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
        frames = encode_array("sum", total, self.sync, seq=seq)
        for w in workers:
            self.master.send_frames(w.identity, frames)
        if partial.ndim == 1:
            self.stats["calls"] += 1
            self.stats["wait_s"] += time.perf_counter() - t0
            self.stats["bytes"] += sum(len(m) for m in frames[1:]) * len(workers)
        return total


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
        sent = partial if wire == FIXED else partial_to_float(partial)
        if wire == FIXED and -2 ** 31 <= partial.min(initial=0) and partial.max(initial=0) < 2 ** 31:
            wire = FIXED_SMALL  # every value fits int32 (|x| < 8 at 2**-28): half the bytes, as exact
        self.worker.sock.send_multipart(encode_array("partial", sent, wire, seq=seq))
        try:
            return self._total(seq, partial.shape)
        finally:
            self.wait_s += time.perf_counter() - t0

    def _total(self, seq: int, shape: tuple) -> np.ndarray:
        while True:
            m = self.worker.recv(self.worker.timeout)
            if m is None:
                raise EdgeInferError(f"the master sent no sum for {self.worker.timeout:g} s")
            if m.kind == "sum" and m.fields["seq"] == seq:
                total = m.array()
                if total.shape != shape:
                    raise EdgeInferError(f"a sum of shape {total.shape} for a partial of {shape}")
                return total
            if m.kind in ("load", "step", "bye"):
                raise Interrupted(m)
            if m.kind == "ping":
                self.worker.send("pong")


def wire_dtype(partial: np.ndarray, sync: str) -> str:
    """How a partial travels: fixed point as int64 (exact), unless sync fp16 rounds it; floats as sync."""
    return FIXED if partial.dtype == np.int64 and sync == "f4" else sync
