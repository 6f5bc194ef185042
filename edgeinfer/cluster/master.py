"""The master: `edgeinfer run MODEL --listen [HOST:]PORT --token TOKEN [--workers N]`.

It owns the tokenizer, sampling, the embedding and head, and its own shard of every layer; workers
join over ZeroMQ (CURVE) and compute theirs. `ClusterModel` stands in for `Model` in the engine: the
same forward pass, each half-layer's partial sums added over the nodes by the star all-reduce.

Faults: every receive has a deadline. A worker that fails or sends nothing within the timeout is
dropped; the master re-plans over the nodes left (down to itself alone), and since every node's KV
cache shard changes with the plan, the caches are rebuilt by running the tokens they held again
before the generation continues where it was. Workers that join during a generation wait for the
next prompt; before each prompt the master pings its workers (the heartbeat between requests).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from ..errors import ContextOverflowError, EdgeInferError
from ..model import Model, cache_size, own_sum
from ..paths import home
from ..storage import open_model
from ..storage.scheduler import available_memory, plan_memory
from .allreduce import NodeLost, StarHub
from .node import fingerprint, gemv_speed, log
from .plan import Share, node_weight, plan_around, plan_shares
from .protocol import FILE_CHUNK, Message, ProtocolError, check_hello, decode, encode, encode_array
from .shard import ShardSource, shard_file, written_shards
from .sockets import curve_server, endpoint

PING_TIMEOUT = 5.0
# A worker building its share and loading (or compiling) its kernels sends nothing for a while, all
# the longer on a slow or busy device: loading waits this long, or the step timeout if longer,
# between two messages (progress resets it), so that a short --timeout drops stalled steps only.
LOAD_TIMEOUT = 120.0


def shard_dir() -> Path:
    """Where the master writes share files (its own under --mem-limit, and those workers pull)."""
    return home() / "cluster"


@dataclass
class WorkerInfo:
    identity: bytes
    node: int  # the join order: worker 1, 2, ... (stable across re-plans)
    hello: dict
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"worker {self.node}"


class Master:
    def __init__(self, listen: str, token: str, timeout: float = 30.0, sync: str = "f4"):
        if len(token) < 8:
            raise EdgeInferError("the join token must be at least 8 characters")
        self.address, self.token, self.timeout = endpoint(listen), token, timeout
        self.sock, self.monitor, self.public_key = curve_server(zmq.Context.instance(), token, self.address)
        self.workers: list[WorkerInfo] = []
        self.waiting: list[WorkerInfo] = []  # joined, not yet in the plan
        self._joined = 0
        self.hub = StarHub(self, sync)
        log(f"listening on {self.address}, CURVE public key {self.public_key}")

    def name_of(self, identity: bytes) -> str:
        return next((w.name for w in self.workers + self.waiting if w.identity == identity), "an unknown peer")

    def send_frames(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart([identity, *frames])
        except zmq.ZMQError as e:
            raise NodeLost(identity, f"{self.name_of(identity)} is unreachable: {e}") from None

    def send(self, identity: bytes, kind: str, payload=None, **fields) -> None:
        self.send_frames(identity, encode(kind, payload, **fields))

    def recv(self, deadline: float | None) -> tuple[bytes, Message] | None:
        """The next valid message from a known worker, or None at the deadline (monotonic seconds).
        Hellos are handled here; malformed messages are logged and dropped."""
        while True:
            wait = 1000 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            ready = self.sock.poll(min(wait, 1000))  # at least once a second: handshake failures
            if self.monitor.handshake_failed():
                log("a peer failed the encrypted handshake (a wrong join token?)")
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            identity, *frames = self.sock.recv_multipart()
            try:
                m = decode(frames)
            except ProtocolError as e:
                log(f"dropped a malformed message from {self.name_of(identity)}: {e}")
                continue
            if m.kind == "hello":
                self._hello(identity, m)
            elif any(w.identity == identity for w in self.workers + self.waiting):
                return identity, m
            else:
                log(f"dropped {m.kind} from a peer that has not joined")

    def _hello(self, identity: bytes, m: Message) -> None:
        if any(w.identity == identity for w in self.workers + self.waiting):
            log(f"dropped a second hello from {self.name_of(identity)}")
            return
        reason = check_hello(m, self.token)
        if reason:
            log(f"refused a worker: {reason}")
            self.send(identity, "refused", reason=reason)
            return
        self._joined += 1
        w = WorkerInfo(identity, self._joined, m.fields)
        self.waiting.append(w)
        self.send(identity, "welcome", node=w.node)
        f = m.fields
        log(f"{w.name} joined: {f['cores']} cores, {f['free_ram'] >> 20} MB free, GEMV {f['gemv_gbs']:.1f} GB/s, "
            f"disk {f['disk_mb_s']:.0f} MB/s")

    def wait_for(self, count: int, wait: float) -> None:
        """Until `count` workers joined, or `wait` seconds: then it starts with whoever joined."""
        deadline = time.monotonic() + wait
        while len(self.waiting) + len(self.workers) < count:
            if time.monotonic() >= deadline:
                log(f"starting with {len(self.waiting) + len(self.workers)} of {count} workers")
                return
            self.recv(min(deadline, time.monotonic() + 0.1))

    def poll(self) -> None:
        """Take in hellos that arrived meanwhile (no waiting)."""
        self.recv(time.monotonic())

    def heartbeat(self) -> None:
        """Ping every worker; drop those that do not answer."""
        for w in list(self.workers):
            try:
                self.send(w.identity, "ping")
            except NodeLost as e:
                self.drop(w.identity, str(e))
        answered: set[bytes] = set()
        deadline = time.monotonic() + min(self.timeout, PING_TIMEOUT)
        while len(answered) < len(self.workers):
            got = self.recv(deadline)
            if got is None:
                break
            if got[1].kind == "pong":
                answered.add(got[0])
        for w in [w for w in self.workers if w.identity not in answered]:
            self.drop(w.identity, f"{w.name} did not answer a ping")

    def drop(self, identity: bytes, reason: str) -> None:
        lost = [w for w in self.workers + self.waiting if w.identity == identity]
        self.workers = [w for w in self.workers if w.identity != identity]
        self.waiting = [w for w in self.waiting if w.identity != identity]
        for w in lost:
            log(f"dropped {w.name}: {reason}")
            try:
                self.sock.send_multipart([identity, *encode("bye", reason=reason)], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def admit(self) -> bool:
        """Move the workers that joined into the plan; whether there were any."""
        admitted, self.waiting = self.waiting, []
        self.workers += admitted
        return bool(admitted)

    def load(self, shares: list[Share], path: str, fp: str, context: int, attention: str, exact: bool) -> None:
        """Each worker loads its share: from the model file if it holds it, otherwise from a file of
        its share alone, which it pulls from here once (written here once per share, shard.py)."""
        size = os.path.getsize(path)
        files = {fp: path}  # what workers may pull, by fingerprint
        for w, share in zip(self.workers, shares):
            shard_fp, shard_size = "", 0
            if fp not in w.hello["models"]:
                shard = str(shard_file(ShardSource(open_model(path), share, layers_only=True), shard_dir(), fp))
                shard_fp, shard_size = fingerprint(shard), os.path.getsize(shard)
                files[shard_fp] = shard
            self.send(w.identity, "load", fingerprint=fp, size=size, shard_fingerprint=shard_fp, shard_size=shard_size,
                      share=share.to_dict(), context=context, attention=attention, exact=exact, sync=self.hub.sync)
        handles: dict[str, object] = {}  # the files being sent, opened once
        ready: set[bytes] = set()
        patience = max(self.timeout, LOAD_TIMEOUT)
        deadline = time.monotonic() + patience
        try:
            while len(ready) < len(self.workers):
                got = self.recv(deadline)
                if got is None:
                    late = next(w for w in self.workers if w.identity not in ready)
                    raise NodeLost(late.identity, f"{late.name} did not load its share within {patience:g} s")
                identity, m = got
                deadline = time.monotonic() + patience  # progress resets the clock
                if m.kind == "need":
                    want, offset = m.fields["fingerprint"], m.fields["offset"]
                    if want not in files or not 0 <= offset < os.path.getsize(files[want]):
                        raise NodeLost(identity, f"{self.name_of(identity)} asked for {want[:16]} at offset {offset}")
                    f = handles.get(want) or handles.setdefault(want, open(files[want], "rb"))
                    f.seek(offset)
                    self.send(identity, "chunk", f.read(FILE_CHUNK), fingerprint=want, offset=offset)
                    if offset == 0:
                        what = "the model file" if want == fp else "its shard"
                        log(f"sending {what} ({os.path.getsize(files[want]) >> 20} MB) to {self.name_of(identity)}")
                elif m.kind == "ready":
                    ready.add(identity)
                    log(f"{self.name_of(identity)} ready, {m.fields['rss'] >> 20} MB resident")
                elif m.kind == "failed":
                    raise NodeLost(identity, f"{self.name_of(identity)} failed to load: {m.fields['message']}")
        finally:
            for f in handles.values():
                f.close()

    def step(self, start: int, h: np.ndarray) -> None:
        """Start every worker on hidden vectors h at cache position `start`."""
        frames = encode_array("step", h, "f4", seq=self.hub.seq, start=start)
        for w in self.workers:
            self.send_frames(w.identity, frames)

    def close(self, reason: str = "the master stopped") -> None:
        st = self.hub.stats
        if st["calls"]:
            log(f"decode: {st['calls']} all-reduces: {st['wait_s']:.3f} s waiting in them "
                f"({st['wait_s'] / st['calls'] * 1e3:.3f} ms each), {st['bytes'] >> 10} KB sent and received")
        for w in self.workers + self.waiting:
            try:
                self.sock.send_multipart([w.identity, *encode("bye", reason=reason)], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.sock.close(linger=1000)


class ClusterCache:
    """The engine's KV cache on a cluster: the tokens it holds and the master's own shard of it.
    When the plan changes, the shards are rebuilt from the tokens."""

    def __init__(self, model: "ClusterModel", capacity: int):
        self.capacity = capacity
        self.tokens: list[int] = []
        self.local = model.local.new_cache(capacity)
        self.plan = model.plan_id

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        del self.tokens[length:]


class ClusterModel:
    """What the engine calls a model, computed by the master and its workers."""

    def __init__(self, master: Master, path: str, context: int, quantized: bool = True, attention: str = "exact",
                 mem_limit: int | None = None):
        """context: the KV cache capacity every node allocates for its shard. mem_limit: the master
        streams its own share within it (from a file of the share, as workers with --mem-limit do)."""
        self.master, self.path, self.quantized, self.attention = master, path, quantized, attention
        self.mem_limit = mem_limit
        self.config = open_model(path).config
        self.fingerprint = fingerprint(path)
        self.size = os.path.getsize(path)
        self.weight = gemv_speed()
        self.context = context
        self.plan_id = 0
        self.local: Model | None = None
        self._planned: list[bytes] = []  # the workers in the current plan
        self._replan()

    @property
    def precision(self) -> str:
        return self.local.precision

    def _replan(self) -> None:
        """Shares over the master and its workers, loaded everywhere; retried without any worker
        that fails meanwhile."""
        while True:
            self.master.admit()
            workers = self.master.workers
            shares = self._held_plan(workers)
            if shares is None:  # in proportion to the nodes' speeds
                for w in workers:
                    w.weight = node_weight(w.hello["gemv_gbs"], w.hello["free_ram"], self.size, len(workers) + 1)
                own = node_weight(self.weight, available_memory(), self.size, len(workers) + 1)
                shares = plan_shares(self.config, [own] + [w.weight for w in workers])
            self.local = None  # the previous plan's shard goes before the new one is loaded
            self.local = self._local_model(shares[0], alone=not workers)
            self.local.allreduce = own_sum  # compile both halves at load, not at a token
            self.local.warm_up()
            try:
                self.master.load(shares[1:], self.path, self.fingerprint, self.context, self.attention,
                                 not self.quantized)
            except NodeLost as e:
                self.master.drop(e.identity, str(e))
                continue
            self.local.allreduce = self.master.hub.allreduce if workers else None
            self.plan_id += 1
            self._planned = [w.identity for w in workers]
            parts = [f"master KV heads {shares[0].kv_start}-{shares[0].kv_end} columns "
                     f"{shares[0].col_start}-{shares[0].col_end}"]
            parts += [f"{w.name} KV heads {s.kv_start}-{s.kv_end} columns {s.col_start}-{s.col_end}"
                      for w, s in zip(workers, shares[1:])]
            log(f"plan {self.plan_id} over {len(workers) + 1} nodes: " + "; ".join(parts))
            return

    def _held_plan(self, workers: list[WorkerInfo]) -> list[Share] | None:
        """The plan the workers' held shards make, when each holds one of this model's (the shares
        pulled from here before) and they fit together: the same nodes keep their shards, which a
        plan by measured speed, noisy by a tenth, would change and send again."""
        if not workers:
            return None
        written = written_shards(shard_dir(), self.fingerprint)
        held = [next((written[m] for m in w.hello["models"] if m in written), None) for w in workers]
        if None in held:
            return None
        shares = plan_around(self.config, held)
        if shares is not None:
            log("plan: the shards the workers hold")
        return shares

    def _local_model(self, share: Share, alone: bool) -> Model:
        source = open_model(self.path)
        if self.mem_limit is None:
            return Model(source if alone else ShardSource(source, share), quantized=self.quantized,
                         attention=self.attention)
        if not alone:
            source = open_model(str(shard_file(ShardSource(source, share), shard_dir(), self.fingerprint)))
        plan = plan_memory(source, self.context, self.mem_limit,
                           cache_size(source, self.context, self.quantized, self.attention))
        log(plan.describe())
        return Model(source, quantized=self.quantized, window=plan.window, attention=self.attention)

    def new_cache(self, capacity: int) -> ClusterCache:
        if capacity > self.context:  # the workers' caches are made at load: reload with this size
            self.context = capacity
            self._replan()
        return ClusterCache(self, capacity)

    def warm_up(self) -> None:
        pass  # every load warms the local shard up

    def forward(self, tokens: np.ndarray, cache: ClusterCache, all_logits: bool = False) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        start = cache.length
        if start + len(tokens) > cache.capacity:
            raise ContextOverflowError(f"{start + len(tokens)} tokens exceed the context of {cache.capacity}")
        if len(tokens) > 1:  # a new prompt: check on the workers, let new ones in
            self.master.heartbeat()
            self.master.poll()
            if self.master.waiting or [w.identity for w in self.master.workers] != self._planned:
                self._replan()
        while True:
            try:
                if cache.plan != self.plan_id:  # the shards moved: rebuild them from the tokens
                    cache.local, cache.plan = self.local.new_cache(cache.capacity), self.plan_id
                    if start:
                        self._run(cache.tokens[:start], 0, cache.local, False)
                logits = self._run(tokens, start, cache.local, all_logits)
                cache.tokens[start:] = tokens
                return logits
            except NodeLost as e:
                self.master.drop(e.identity, str(e))
                self._replan()

    def _run(self, tokens: list[int], start: int, local, all_logits: bool) -> np.ndarray:
        local.truncate(start)
        h = self.local.embed(np.asarray(tokens))
        self.master.step(start, h)
        return self.local.logits(self.local.run_layers(h, local), all_logits)
