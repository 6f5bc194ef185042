"""What master and workers say to each other: message kinds, fields, limits, and their validation.

A message is one ZeroMQ multipart: a JSON header {"kind", "v", fields...} and, for kinds that carry
file data, one payload frame. No pickle. Anything that does not match its kind's fields, or is
larger than the limits, raises ProtocolError; the receiver logs and drops it. The steps' arrays
(hidden vectors, partials, sums) go on the links (link.py) as raw bytes of a declared dtype, each
checked against the size its receiver expects; `from_wire` reads them.

The channel is ZeroMQ CURVE (encrypted and authenticated). Its server key pair derives from the join
token, so the token is the one secret the user shares: a worker that knows it can reach the master,
and the token itself travels inside the encrypted channel in the hello.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

import numpy as np
import zmq
import zmq.utils.z85

from .. import __version__
from ..errors import EdgeInferError

PROTOCOL = 4  # 2: 4/8-bit partials travel as int64 fixed point; workers pull their shard; 3: load names the KV cache type;
# 4: steps and partials travel on links (link.py), which load opens, and every node adds the partials
DEFAULT_PORT = 7433
MAX_HEADER = 16 << 10
FILE_CHUNK = 4 << 20
MAX_PAYLOAD = 64 << 20  # a partial sum of 4096 tokens x 4096 floats, or a file chunk
DTYPES = {"f4": np.float32, "f2": np.float16}  # what --sync may choose for activations
FIXED = "i8"  # a 4/8-bit node's partial sums: int64 fixed point (kernels/simd.py), added exactly
FIXED_SMALL = "i4"  # the same, sent as int32 when every value fits (half the bytes, still exact)
WIRE_DTYPES = {**DTYPES, FIXED: np.int64, FIXED_SMALL: np.int32}

_INT, _STR, _FLOAT, _BOOL, _LIST, _DICT = int, str, (int, float), bool, list, dict
# kind -> its fields and their types; kinds in DATA_KINDS carry bytes (a file's, or an echo's)
FIELDS: dict[str, dict[str, type | tuple]] = {
    # worker -> master
    "hello": {"token": _STR, "protocol": _INT, "version": _STR, "cores": _INT, "free_ram": _INT,
              "gemv_gbs": _FLOAT, "disk_mb_s": _FLOAT, "models": _LIST},
    "need": {"fingerprint": _STR, "offset": _INT},  # the worker lacks this file: send the chunk at offset
    "ready": {"rss": _INT},
    "progress": {"done": _INT, "total": _INT},  # while loading: the worker is alive
    "failed": {"message": _STR},
    "pong": {},
    "echo": {"seq": _INT},  # both ways: the worker sends back what the master sent (the sockets' floor)
    # master -> worker
    "welcome": {"node": _INT},
    "refused": {"reason": _STR},
    # the model file, and ("" and 0 when the worker holds the model) the file of the share alone
    "load": {"fingerprint": _STR, "size": _INT, "shard_fingerprint": _STR, "shard_size": _INT, "share": _DICT,
             "context": _INT, "attention": _STR, "exact": _BOOL, "sync": _STR,  # exact: float32 weights (--exact)
             "cache_type": _STR,  # the KV cache's type (--cache-type)
             "link_id": _STR, "link_key": _STR,  # of the link to open (link.py) to the master's port + 1, in hex
             "rank": _INT, "nodes": _INT},  # this worker's place in the plan (the master is 0), and the node count
    "chunk": {"fingerprint": _STR, "offset": _INT},
    "ping": {},
    "bye": {"reason": _STR},
}
DATA_KINDS = {"chunk", "echo"}


class ProtocolError(EdgeInferError):
    """A message that is malformed, of an unknown kind, or over the limits."""


class Refused(EdgeInferError):
    """The master refused this worker (wrong token or version), with its reason."""


class Interrupted(Exception):
    """The master sent a new command in the middle of a step (it re-planned after a node was lost)."""

    def __init__(self, message: "Message"):
        self.message = message


@dataclass
class Message:
    kind: str
    fields: dict = field(default_factory=dict)
    payload: bytes | None = None


def from_wire(data: bytes, dtype: str, shape) -> np.ndarray:
    """Bytes sent as `dtype` as the array they hold: float32 (from fp32 or fp16), or int64 fixed
    point (from int64 or int32)."""
    a = np.frombuffer(data, WIRE_DTYPES[dtype]).reshape(shape)
    return a.astype(np.int64) if dtype in (FIXED, FIXED_SMALL) else a.astype(np.float32)


def encode(kind: str, payload: bytes | np.ndarray | None = None, **fields) -> list[bytes]:
    if kind not in FIELDS:
        raise ValueError(f"unknown message kind {kind}")
    frames = [json.dumps({"kind": kind, "v": PROTOCOL, **fields}).encode()]
    if payload is not None:
        frames.append(payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload))
    return frames


def decode(frames: list[bytes]) -> Message:
    """Validate and decode one message; raises ProtocolError on anything unexpected."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"{len(frames)} frames")
    if len(frames[0]) > MAX_HEADER:
        raise ProtocolError(f"header of {len(frames[0])} bytes")
    try:
        header = json.loads(frames[0])
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not an object")
    kind = header.pop("kind", None)
    if kind not in FIELDS:
        raise ProtocolError(f"unknown kind {str(kind)[:40]!r}")
    version = header.pop("v", None)
    if version != PROTOCOL and kind != "hello":  # a hello of another version gets a readable refusal
        raise ProtocolError(f"{kind}: protocol version {version!r}, expected {PROTOCOL}")
    expected = FIELDS[kind]
    if set(header) != set(expected):
        raise ProtocolError(f"{kind}: fields {sorted(header)}, expected {sorted(expected)}")
    for name, typ in expected.items():
        value = header[name]
        if not isinstance(value, typ) or (typ is _INT and isinstance(value, bool)):
            raise ProtocolError(f"{kind}: field {name} is {type(value).__name__}")
    payload = frames[1] if len(frames) == 2 else None
    wants_payload = kind in DATA_KINDS
    if wants_payload != (payload is not None):
        raise ProtocolError(f"{kind}: {'missing' if wants_payload else 'unexpected'} payload")
    if payload is not None and len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"{kind}: payload of {len(payload)} bytes")
    return Message(kind, header, payload)


def curve_server_keys(token: str) -> tuple[bytes, bytes]:
    """(public, secret) CURVE keys of the master, Z85-encoded, derived from the join token."""
    secret = zmq.utils.z85.encode(hashlib.sha256(b"edgeinfer cluster key\0" + token.encode()).digest())
    return zmq.curve_public(secret), secret


def check_hello(m: Message, token: str) -> str | None:
    """Why the master refuses this hello, or None to accept it."""
    if m.fields["protocol"] != PROTOCOL:
        return f"protocol version {m.fields['protocol']}, the master speaks {PROTOCOL}"
    if m.fields["version"] != __version__:
        return f"edgeinfer {m.fields['version']}, the master runs {__version__}"
    if not hmac.compare_digest(m.fields["token"].encode(), token.encode()):
        return "wrong join token"
    return None
