"""The steps' own connection between the master and each worker: a TCP socket read and written by
the thread that computes, each message sealed with ChaCha20-Poly1305 under a key the master makes
for each plan and hands out over the CURVE channel (sockets.py).

Why not ZeroMQ for this too: a ZeroMQ message crosses two threads on each side (the caller's and
ZeroMQ's I/O thread), and waking them is most of a round trip, on a VM's vCPUs above all: 85-100 us
for a 2.3 KB partial on loopback, against 13 us for a TCP socket polled by the thread that waits,
and 25 us sealed (bench/RESULTS.md). A decode step makes two all-reduces per layer.

A link carries what the steps need, in order: the hidden vectors that start a step, and the
partials (a message on another channel could overtake them). On the wire a message is its sealed
length (4 bytes, little-endian), then the sealed bytes: kind (1 byte), sequence number (8), an
argument (8: a step's cache position, a partial's node), the array's wire dtype (1), the array's
bytes. Each direction has its own nonces, counting up from 0: a message replayed, dropped or
reordered fails to open. Both ends may send at once (every node sends its partial as soon as it
has it): a send that finds the socket full takes in what arrives meanwhile, so neither waits on
the other. The worker opens a link with the link's id in the clear (which key to use), then a
sealed HELLO.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections import deque
from typing import NamedTuple

import numpy as np
import zmq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import EdgeInferError
from .protocol import FIXED, FIXED_SMALL, MAX_PAYLOAD, WIRE_DTYPES, from_wire
from .sockets import SPIN_SECONDS

HELLO, STEP, PARTIAL, ECHO = range(4)
KINDS = {HELLO: "hello", STEP: "step", PARTIAL: "partial", ECHO: "echo"}
WIRE_CODES = {"f4": 0, "f2": 1, FIXED: 2, FIXED_SMALL: 3}
WIRE_NAMES = {code: name for name, code in WIRE_CODES.items()}
_HEAD = struct.Struct("<BQQB")  # kind, seq, arg, wire dtype
_LENGTH = struct.Struct("<I")
TAG = 16
ID_BYTES, KEY_BYTES = 16, 32
MAX_SEALED = _HEAD.size + MAX_PAYLOAD + TAG


class Received(NamedTuple):
    kind: int
    seq: int  # a step's first all-reduce, or the all-reduce's
    wire: str  # the dtype the array was sent as (protocol.WIRE_DTYPES)
    data: bytes  # the array's
    arg: int  # a step's cache position; a partial's node (0: the master)


class LinkClosed(EdgeInferError):
    """The other end closed the link, or sent what does not open under its key."""


class Link:
    """One end of an open link. `take` never waits; `wait_any` waits for several links at once."""

    def __init__(self, sock: socket.socket, key: bytes, master: bool):
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:  # (tests use socket pairs)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each message at once
        self.sock, self.aead = sock, ChaCha20Poly1305(key)
        self._out, self._in = (b"\0\0\0\0", b"\1\0\0\0") if master else (b"\1\0\0\0", b"\0\0\0\0")
        self.sent = self.received = 0  # messages each way: the next nonces
        self._length: int | None = None  # of the sealed message being read, once its prefix is in
        self._buf, self._got = bytearray(_LENGTH.size), 0
        self._inbox: deque[Received] = deque()  # taken in while a send waited

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, kind: int, seq: int, array: np.ndarray | bytes = b"", wire: str = "f4",
             timeout: float = 30.0, arg: int = 0) -> None:
        """Seal and send one message; waits only while the socket's buffer is full (a large
        prefill partial), taking in what the other end sends meanwhile, for up to `timeout` s."""
        nonce = self._out + self.sent.to_bytes(8, "little")
        self.sent += 1
        body = np.ascontiguousarray(array).view(np.uint8).reshape(-1) if isinstance(array, np.ndarray) else array
        sealed = self.aead.encrypt(nonce, b"".join([_HEAD.pack(kind, seq, arg, WIRE_CODES[wire]), body]), None)
        data = memoryview(b"".join([_LENGTH.pack(len(sealed)), sealed]))
        deadline = time.monotonic() + timeout
        while data:
            try:
                data = data[self.sock.send(data):]
            except (BlockingIOError, InterruptedError):
                rest = deadline - time.monotonic()
                readable, writable, _ = select.select([self.sock], [self.sock], [], max(rest, 0))
                if readable:  # the other end may be sending too, and waiting for us to read
                    while (m := self._receive()) is not None:
                        self._inbox.append(m)
                elif not writable:
                    raise LinkClosed(f"the other end took nothing for {timeout:g} s") from None
            except OSError as e:
                raise LinkClosed(f"the link is closed ({e.strerror or e})") from None

    def take(self) -> Received | None:
        """The next whole message if it has arrived; reads what is there and returns None otherwise."""
        return self._inbox.popleft() if self._inbox else self._receive()

    def _receive(self) -> Received | None:
        while True:
            if self._got < len(self._buf):
                try:
                    n = self.sock.recv_into(memoryview(self._buf)[self._got:])
                except (BlockingIOError, InterruptedError):
                    return None
                except OSError as e:
                    raise LinkClosed(f"the link is closed ({e.strerror or e})") from None
                if n == 0:
                    raise LinkClosed("the other end closed the link")
                self._got += n
                continue
            if self._length is None:
                (length,) = _LENGTH.unpack(self._buf)
                if not _HEAD.size + TAG <= length <= MAX_SEALED:
                    raise LinkClosed(f"a message of {length} bytes on the link")
                self._length, self._buf, self._got = length, bytearray(length), 0
                continue
            nonce = self._in + self.received.to_bytes(8, "little")
            try:
                plain = self.aead.decrypt(nonce, self._buf, None)
            except InvalidTag:
                raise LinkClosed("a message on the link did not open under its key") from None
            self.received += 1
            self._length, self._buf, self._got = None, bytearray(_LENGTH.size), 0
            kind, seq, arg, code = _HEAD.unpack_from(plain)
            if kind not in KINDS or code not in WIRE_NAMES:
                raise LinkClosed(f"a message of kind {kind} and dtype {code} on the link")
            return Received(kind, seq, WIRE_NAMES[code], plain[_HEAD.size:], arg)


def as_array(data: bytes, wire: str, shape: tuple) -> np.ndarray | None:
    """A message's bytes as the array of `shape` they hold (protocol.from_wire); None when their
    size is another shape's."""
    if len(data) != np.dtype(WIRE_DTYPES[wire]).itemsize * int(np.prod(shape)):
        return None
    return from_wire(data, wire, shape)


def wait_any(links: list[Link], zsock: zmq.Socket | None, timeout: float) -> None:
    """Until a link has bytes, `zsock` a message, or `timeout` s passed: awake for up to
    SPIN_SECONDS (polling, yielding the core), then asleep in poll(2)."""
    if any(link._inbox for link in links):
        return
    start = time.perf_counter()
    poller = zmq.Poller()
    for link in links:
        poller.register(link.sock, zmq.POLLIN)
    if zsock is not None:
        poller.register(zsock, zmq.POLLIN)
    spin_until = start + min(SPIN_SECONDS, timeout)
    while time.perf_counter() < spin_until:
        if poller.poll(0):
            return
        os.sched_yield()
    poller.poll(max(0, int((timeout - (time.perf_counter() - start)) * 1000)))


def link_address(endpoint: str) -> tuple[str, int]:
    """Where the links of the master at `endpoint` (tcp://HOST:PORT, sockets.endpoint) are: its
    host, the next port."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if int(port) >= 65535:
        raise EdgeInferError(f"port {port}: the master's links take the next port, "
                             "so a master listens on 65534 at most")
    return host, int(port) + 1


class LinkListener:
    """The master's end: a TCP port that workers open their links to."""

    def __init__(self, host: str, port: int):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(("" if host in ("*", "0.0.0.0") else host, port))
        except OSError as e:
            raise EdgeInferError(f"cannot listen for all-reduce links on port {port}: {e.strerror or e}") from None
        self.sock.listen(64)
        self.port = port

    def close(self) -> None:
        self.sock.close()

    def accept(self, keys: dict[bytes, bytes], deadline: float) -> dict[bytes, Link]:
        """The links of these ids (id -> key), opened by their workers before `deadline`
        (monotonic seconds): an id is taken once, and a connection that does not say a known id
        and a sealed HELLO under its key within a second is closed."""
        links: dict[bytes, Link] = {}
        while len(links) < len(keys):
            rest = deadline - time.monotonic()
            if rest <= 0 or not select.select([self.sock], [], [], rest)[0]:
                break
            conn, _ = self.sock.accept()
            try:
                conn.settimeout(1.0)
                link_id = _recv_exactly(conn, ID_BYTES)
                if link_id not in keys or link_id in links:
                    conn.close()
                    continue
                link = Link(conn, keys[link_id], master=True)
                hello = _take_within(link, 1.0)
                if hello is None or hello.kind != HELLO:
                    conn.close()
                    continue
                links[link_id] = link
            except (OSError, LinkClosed):
                conn.close()
        return links


def open_link(host: str, port: int, link_id: bytes, key: bytes, timeout: float = 10.0) -> Link:
    """A worker's end: connect to the master's link port and say who it is."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise EdgeInferError(f"cannot open the all-reduce link to {host}:{port}: {e.strerror or e} "
                             "(the master listens for links on its port + 1)") from None
    sock.sendall(link_id)
    link = Link(sock, key, master=False)
    link.send(HELLO, 0)
    return link


def new_link_keys() -> tuple[bytes, bytes]:
    """A fresh link id and key."""
    return os.urandom(ID_BYTES), ChaCha20Poly1305.generate_key()


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise LinkClosed("closed before saying its id")
        data += chunk
    return data


def _take_within(link: Link, timeout: float) -> Received | None:
    deadline = time.monotonic() + timeout
    while (m := link.take()) is None:
        rest = deadline - time.monotonic()
        if rest <= 0 or not select.select([link.sock], [], [], rest)[0]:
            return None
    return m
