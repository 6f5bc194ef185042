"""ZeroMQ sockets of the cluster: CURVE-encrypted, size-capped, with handshake failures visible.

The master is the CURVE server (key pair derived from the join token, protocol.py); a worker is a
client with a fresh key pair of its own. ZeroMQ drops a peer whose message exceeds MAXMSGSIZE before
any of it reaches us. A wrong token fails the CURVE handshake itself, which only the socket monitor
sees: both sides read it there, so both can say so.
"""

from __future__ import annotations

import os
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..errors import EdgeInferError
from .protocol import DEFAULT_PORT, MAX_HEADER, MAX_PAYLOAD, curve_server_keys

HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_AUTH


class Monitor:
    """Connection events of a socket: failed handshakes, and lost connections (ZMTP heartbeats,
    answered by the peer's ZeroMQ I/O thread, notice a dead or cut-off peer within HEARTBEAT_TIMEOUT)."""

    def __init__(self, sock: zmq.Socket):
        self.watched = sock
        self.sock = sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED)
        self.failed = self.disconnected = 0

    def close(self) -> None:
        """Stop the events, then close the socket they come on. In the other order, libzmq's I/O
        thread blocks for good on the next event it sends (a peer that goes away), and with it
        every socket of the process: a worker then never reached its next master (libzmq #3575)."""
        if not self.sock.closed:
            self.watched.disable_monitor()
            self.sock.close(linger=0)

    def update(self) -> None:
        while self.sock.poll(0):
            event = recv_monitor_message(self.sock)["event"]
            if event & HANDSHAKE_FAILED:
                self.failed += 1
            else:
                self.disconnected += 1

    def handshake_failed(self) -> int:
        """How many handshakes failed since the last call (one can be a peer that went away
        mid-handshake; a wrong key fails every retry)."""
        self.update()
        failed, self.failed = self.failed, 0
        return failed


# A decode step's all-reduce mostly answers within this on loopback: wait for it awake (on a link,
# link.wait_any, or a ZeroMQ socket), polling and yielding the core (to the other nodes on one
# machine, and to ZeroMQ's I/O thread), rather than
# sleeping in the kernel: waking a sleeping thread, on a VM's vCPU above all, costs about as much
# as the round trip itself. Longer spins (2 ms) took cores from computing nodes when several share a
# machine (measured in bench/RESULTS.md).
SPIN_SECONDS = 0.0003


def wait_readable(sock: zmq.Socket, timeout_ms: int) -> bool:
    """Whether a message is ready within timeout_ms: polled awake for up to SPIN_SECONDS, then
    waited for asleep."""
    start = time.perf_counter()
    spin_until = start + min(SPIN_SECONDS, timeout_ms / 1000)
    while not sock.poll(0):
        now = time.perf_counter()
        if now >= spin_until:
            rest = timeout_ms - int((now - start) * 1000)
            return rest > 0 and bool(sock.poll(rest))
        os.sched_yield()
    return True


def endpoint(address: str, default_host: str = "127.0.0.1") -> str:
    """tcp://HOST:PORT from HOST, HOST:PORT, :PORT or PORT."""
    host, _, port = address.rpartition(":") if ":" in address else ("", "", address)
    if not host and not port.isdigit():
        host, port = port, str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgeInferError(f"bad address {address!r}: expected [HOST:]PORT")
    return f"tcp://{host or default_host}:{port}"


HEARTBEAT_IVL, HEARTBEAT_TIMEOUT = 1000, 3000  # ms


def _common(sock: zmq.Socket) -> None:
    sock.maxmsgsize = MAX_HEADER + MAX_PAYLOAD
    sock.linger = 1000
    sock.heartbeat_ivl, sock.heartbeat_timeout = HEARTBEAT_IVL, HEARTBEAT_TIMEOUT


def curve_server(ctx: zmq.Context, token: str, address: str) -> tuple[zmq.Socket, Monitor, str]:
    """The master's ROUTER socket bound at `address`; returns it, its monitor and its public key."""
    public, secret = curve_server_keys(token)
    sock = ctx.socket(zmq.ROUTER)
    _common(sock)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.router_mandatory = True  # a send to a worker that is gone raises instead of vanishing
    monitor = Monitor(sock)
    try:
        sock.bind(address)
    except zmq.ZMQError as e:
        raise EdgeInferError(f"cannot listen on {address}: {e}") from None
    return sock, monitor, public.decode()


def curve_client(ctx: zmq.Context, token: str, address: str) -> tuple[zmq.Socket, Monitor]:
    """A worker's DEALER socket connecting to the master at `address`."""
    public, secret = zmq.curve_keypair()
    sock = ctx.socket(zmq.DEALER)
    _common(sock)
    sock.routing_id = os.urandom(16)  # the master knows it by this, also after a reconnect
    sock.curve_serverkey = curve_server_keys(token)[0]
    sock.curve_publickey, sock.curve_secretkey = public, secret
    monitor = Monitor(sock)
    sock.connect(address)
    return sock, monitor
