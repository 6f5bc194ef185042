"""The master's side of the wire: `edgeinfer run MODEL --listen [HOST:]PORT --token TOKEN`.

Workers join over ZeroMQ (CURVE); the master takes their hellos, sends each its share to load (and
the file of it to pull) with the key of a link to open for the steps and their partials (link.py,
on the master's port + 1), starts every step, pings them between requests and drops those
that fail or go silent. Every receive has a deadline. What the engine runs over the nodes is
cluster_model.ClusterModel.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import zmq

from ..errors import EdgeInferError
from ..paths import cluster_dir
from ..storage import open_model
from .allreduce import NodeLost, StarHub
from .link import ECHO, STEP, Link, LinkClosed, LinkListener, link_address, new_link_keys, wait_any
from .node import fingerprint, log
from .plan import Share
from .protocol import FILE_CHUNK, Message, ProtocolError, check_hello, decode, encode
from .shard import ShardSource, shard_file
from .sockets import curve_server, endpoint, wait_readable

PING_TIMEOUT = 5.0
# A worker building its share and loading (or compiling) its kernels sends nothing for a while, all
# the longer on a slow or busy device: loading waits this long, or the step timeout if longer,
# between two messages (progress resets it), so that a short --timeout drops stalled steps only.
LOAD_TIMEOUT = 120.0


@dataclass
class WorkerInfo:
    identity: bytes
    node: int  # the join order: worker 1, 2, ... (stable across re-plans)
    hello: dict
    weight: float = 1.0
    link: Link | None = None  # opened by each load

    @property
    def name(self) -> str:
        return f"worker {self.node}"

    def close_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None


class Master:
    def __init__(self, listen: str, token: str, timeout: float = 30.0, sync: str = "f4"):
        if len(token) < 8:
            raise EdgeInferError("the join token must be at least 8 characters")
        self.address, self.token, self.timeout = endpoint(listen), token, timeout
        self.sock, self.monitor, self.public_key = curve_server(zmq.Context.instance(), token, self.address)
        try:
            self.links = LinkListener(*link_address(self.address))
        except EdgeInferError:
            self.monitor.close()
            self.sock.close(linger=0)
            raise
        self.workers: list[WorkerInfo] = []
        self.waiting: list[WorkerInfo] = []  # joined, not yet in the plan
        self._joined = 0
        self.hub = StarHub(self, sync)
        log(f"listening on {self.address}, CURVE public key {self.public_key}")

    def name_of(self, identity: bytes) -> str:
        return next((w.name for w in self.workers + self.waiting if w.identity == identity), "an unknown peer")

    def send(self, identity: bytes, kind: str, payload=None, **fields) -> None:
        try:
            self.sock.send_multipart([identity, *encode(kind, payload, **fields)])
        except zmq.ZMQError as e:
            raise NodeLost(identity, f"{self.name_of(identity)} is unreachable: {e}") from None

    def recv(self, deadline: float | None, awaiting: list[bytes] = ()) -> tuple[bytes, Message] | None:
        """The next valid message from a known worker, or None at the deadline (monotonic seconds).
        Hellos are handled here; malformed messages are logged and dropped. Every second without a
        message, the `awaiting` workers are pinged: a worker whose connection is gone (a process
        that died) raises NodeLost at once, not at the deadline."""
        while True:
            wait = 1000 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            ready = wait_readable(self.sock, min(wait, 1000))  # at least once a second: handshake failures
            if self.monitor.handshake_failed():
                log("a peer failed the encrypted handshake (a wrong join token?)")
            if not ready:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                for identity in awaiting:
                    self.send(identity, "ping")  # router_mandatory: fails if its connection is gone
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
        waiting = next((w for w in self.waiting if w.identity == identity), None)
        if waiting is not None:  # it said hello again: the welcome may not have reached it yet
            self.send(identity, "welcome", node=waiting.node)
            return
        if any(w.identity == identity for w in self.workers):
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
            w.close_link()
            try:
                self.sock.send_multipart([identity, *encode("bye", reason=reason)], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def admit(self) -> bool:
        """Move the workers that joined into the plan; whether there were any."""
        admitted, self.waiting = self.waiting, []
        self.workers += admitted
        return bool(admitted)

    def load(self, shares: list[Share], path: str, fp: str, context: int, attention: str, float32: bool,
             cache_type: str) -> None:
        """Each worker loads its share: from the model file if it holds it, otherwise from a file of
        its share alone, which it pulls from here once (written here once per share, shard.py)."""
        size = os.path.getsize(path)
        files = {fp: path}  # what workers may pull, by fingerprint
        keys: dict[bytes, tuple[bytes, WorkerInfo]] = {}  # link id -> its key and worker
        for rank, (w, share) in enumerate(zip(self.workers, shares), 1):
            w.close_link()  # the last plan's: a worker waiting on it learns of the new plan
            link_id, key = new_link_keys()
            keys[link_id] = key, w
            shard_fp, shard_size = "", 0
            if fp not in w.hello["models"]:
                shard = str(shard_file(ShardSource(open_model(path), share, layers_only=True), cluster_dir(), fp))
                shard_fp, shard_size = fingerprint(shard), os.path.getsize(shard)
                files[shard_fp] = shard
            self.send(w.identity, "load", fingerprint=fp, size=size, shard_fingerprint=shard_fp, shard_size=shard_size,
                      share=share.to_dict(), context=context, attention=attention, exact=float32, sync=self.hub.sync,
                      cache_type=cache_type, link_id=link_id.hex(), link_key=key.hex(), rank=rank,
                      nodes=len(self.workers) + 1)
        handles: dict[str, object] = {}  # the files being sent, opened once
        ready: set[bytes] = set()
        patience = max(self.timeout, LOAD_TIMEOUT)
        deadline = time.monotonic() + patience
        try:
            while len(ready) < len(self.workers):
                got = self.recv(deadline, [w.identity for w in self.workers if w.identity not in ready])
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
        # each worker opened its link before loading: it waits in the listener's queue. Those not
        # there are pinged every second, as above: a worker that died fails the ping at once
        deadline = time.monotonic() + min(self.timeout, PING_TIMEOUT)
        while missing := {link_id: key for link_id, (key, w) in keys.items() if w.link is None}:
            for link_id, link in self.links.accept(missing, min(deadline, time.monotonic() + 1.0)).items():
                keys[link_id][1].link = link
            late = [w for _, w in keys.values() if w.link is None]
            if late and time.monotonic() >= deadline:
                raise NodeLost(late[0].identity, f"{late[0].name} did not open its all-reduce link")
            for w in late:
                self.send(w.identity, "ping")

    def step(self, start: int, h: np.ndarray) -> None:
        """Start every worker on hidden vectors h at cache position `start`."""
        h = np.ascontiguousarray(h, np.float32)
        for w in self.workers:
            try:
                w.link.send(STEP, self.hub.seq, h, "f4", self.timeout, arg=start)
            except LinkClosed as e:
                raise NodeLost(w.identity, f"lost {w.name}'s link: {e}") from None

    def round_trip(self, w: WorkerInfo, nbytes: int, rounds: int = 50, on_link: bool = True) -> float:
        """Median seconds for `nbytes` to go to a worker and come back (the worker echoes them at
        once) on its link, which the all-reduces use, or else on the ZeroMQ socket: their floors."""
        times = []
        for seq in range(rounds):
            t = time.perf_counter()
            if on_link:
                self._link_echo(w, nbytes, seq)
            else:
                self.send(w.identity, "echo", bytes(nbytes), seq=seq)
                while True:
                    got = self.recv(time.monotonic() + PING_TIMEOUT)
                    if got is None:
                        raise NodeLost(w.identity, f"{w.name} did not echo within {PING_TIMEOUT:g} s")
                    if got[0] == w.identity and got[1].kind == "echo" and got[1].fields["seq"] == seq:
                        break
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def _link_echo(self, w: WorkerInfo, nbytes: int, seq: int) -> None:
        deadline = time.monotonic() + PING_TIMEOUT
        try:
            w.link.send(ECHO, seq, bytes(nbytes))
            while (m := w.link.take()) is None or (m.kind, m.seq) != (ECHO, seq):
                if m is None and time.monotonic() >= deadline:
                    raise NodeLost(w.identity, f"{w.name} did not echo within {PING_TIMEOUT:g} s")
                if m is None:
                    wait_any([w.link], None, deadline - time.monotonic())
        except LinkClosed as e:
            raise NodeLost(w.identity, f"lost {w.name}'s link: {e}") from None

    def close(self, reason: str = "the master stopped") -> None:
        st = self.hub.stats
        if st["calls"]:
            log(f"decode: {st['calls']} all-reduces: {st['wait_s']:.3f} s waiting in them "
                f"({st['wait_s'] / st['calls'] * 1e3:.3f} ms each), {st['bytes'] >> 10} KB sent and received")
            for w in self.workers:
                try:
                    floor = self.round_trip(w, st["payload"])
                    zmq_floor = self.round_trip(w, st["payload"], on_link=False)
                except NodeLost:
                    continue
                log(f"floor: a {st['payload']}-byte round trip to {w.name} on its link takes "
                    f"{floor * 1e3:.3f} ms (median of 50); on its ZeroMQ socket {zmq_floor * 1e3:.3f} ms")
        for w in self.workers + self.waiting:
            try:
                self.sock.send_multipart([w.identity, *encode("bye", reason=reason)], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        for w in self.workers + self.waiting:
            w.close_link()
        self.links.close()
        self.monitor.close()
        self.sock.close(linger=1000)
