"""`edgeinfer worker --join HOST[:PORT] --token TOKEN`: a node that computes its share of every layer.

It joins the master (hello: versions, token, cores, free memory, GEMV speed, the model files it
holds), gets a share to load (from the model file when it holds it; otherwise from a file of its
share alone, pulled from the master once into its cache dir, resumable and hash-checked, and reused
while the plan gives it the same share), then serves steps: for each batch of hidden vectors the master sends,
it runs the same forward pass as a single node over its shard, and each half-layer's partial sum
goes through the all-reduce (allreduce.py), on the link each load opens (link.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path

import zmq

from .. import __version__
from ..errors import EdgeInferError
from ..kernels.simd import partial_to_float
from ..kv_cache import model_memory_plan
from ..model import Model
from ..paths import cluster_dir
from ..storage import open_model
from ..storage.source import WeightSource
from ..storage.memory_plan import available_memory, process_rss
from ..threads import Threads
from .allreduce import StarMember
from .link import (ECHO, ID_BYTES, KEY_BYTES, STEP, Link, LinkClosed, Received, as_array, link_address, open_link,
                   wait_any)
from .node import cores, disk_speed, gemv_speed, log, sha256_file
from .plan import Share
from .protocol import DTYPES, PROTOCOL, Interrupted, Message, ProtocolError, Refused, decode, encode
from .shard import ShardSource, shard_file
from .sockets import curve_client, endpoint, wait_readable

SHARE_INDEX = "shares.json"  # the share files a worker pulled or wrote, and the model of each
RETRY_NOTE = 5.0  # seconds between the lines that say a worker is still waiting for its master
WRONG_KEY_FAILURES = 3  # ZeroMQ retries every 0.1 s: a wrong key fails each time, a passing glitch once


class Worker:
    def __init__(self, join: str, token: str, cache_dir: str | None = None, timeout: float = 60.0,
                 mem_limit: int | None = None):
        """mem_limit: stream this node's shard through a window of layers within it (its own file,
        written once from the model file), instead of holding the shard."""
        self.address, self.token, self.timeout, self.mem_limit = endpoint(join), token, timeout, mem_limit
        self.cache_dir = Path(cache_dir) if cache_dir else cluster_dir()
        self.sock, self.monitor = curve_client(zmq.Context.instance(), token, self.address)
        self.model: Model | None = None
        self.cache = None
        self.member: StarMember | None = None
        self.link: Link | None = None
        self.joined = False
        self.failed_handshakes = 0
        self.steps, self.step_s, self.step_wait_s = 0, 0.0, 0.0  # decode steps (one token each)
        self.threads = Threads()  # the kernels' thread count, re-chosen between steps

    def close(self) -> None:
        self._drop_link()
        self.monitor.close()
        self.sock.close(linger=0)

    def recv(self, timeout: float | None) -> Message | None:
        """The next valid message (malformed ones are logged and dropped); None after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 500 if deadline is None else max(0, min(500, int((deadline - time.monotonic()) * 1000)))
            if not wait_readable(self.sock, wait):
                self.failed_handshakes += self.monitor.handshake_failed()
                if self.failed_handshakes >= WRONG_KEY_FAILURES and not self.joined:
                    raise Refused("the master refused the encrypted handshake: wrong join token")
                if self.monitor.disconnected and self.joined:
                    raise EdgeInferError(f"lost the connection to the master at {self.address}")
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            frames = self.sock.recv_multipart()
            try:
                return decode(frames)
            except ProtocolError as e:
                log(f"dropped a malformed message from the master: {e}")

    def send(self, kind: str, payload=None, **fields) -> None:
        self.sock.send_multipart(encode(kind, payload, **fields))

    def join(self, forever: bool = False) -> int:
        """Say hello until the master answers (ZeroMQ reconnects meanwhile, so a master started
        later, or restarted, is found): a line every RETRY_NOTE s, up to the timeout unless `forever`.
        The hello is said again with each line: the first may have gone to a master on its way out
        (one restarted on the same address)."""
        log(f"connecting to the master at {self.address}")
        usable = min(available_memory(), self.mem_limit or 1 << 62)  # the plan weighs nodes by it
        hello = dict(token=self.token, protocol=PROTOCOL, version=__version__, cores=cores(), free_ram=usable,
                     gemv_gbs=gemv_speed(), disk_mb_s=disk_speed(self.cache_dir), models=self._held_models())
        self.send("hello", **hello)
        start = time.monotonic()
        note, deadline = start + RETRY_NOTE, None if forever else start + self.timeout
        while True:
            m = self.recv(max(0.0, (note if deadline is None else min(note, deadline)) - time.monotonic()))
            if m is None:
                if deadline is not None and time.monotonic() >= deadline:
                    raise EdgeInferError(f"no answer from the master at {self.address} within {self.timeout:g} s")
                log(f"no answer from the master at {self.address} after {note - start:.0f} s; still trying "
                    "(is it started, and is this its address?)")
                note += RETRY_NOTE
                self.send("hello", **hello)
                continue
            if m.kind == "refused":
                raise Refused(f"the master refused this worker: {m.fields['reason']}")
            if m.kind == "welcome":
                log(f"joined {self.address} as node {m.fields['node']}")
                self.monitor.update()
                self.monitor.disconnected = 0
                self.joined = True
                return m.fields["node"]
            log(f"dropped {m.kind} before the welcome")

    def serve(self) -> None:
        """Run the master's commands until it says bye."""
        pending: Message | None = None  # the command that interrupted a step
        while True:
            m = pending or self._command()
            pending = None
            try:
                if isinstance(m, Received):  # a step, from the link
                    self._step(m)
                elif m.kind == "bye":
                    log(f"the master ended the session: {m.fields['reason']}")
                    if self.steps:
                        log(f"served {self.steps} decode steps: {self.step_s - self.step_wait_s:.3f} s computing, "
                            f"{self.step_wait_s:.3f} s waiting for sums")
                    return
                elif m.kind == "load":
                    self._load(m)
                elif m.kind == "ping":
                    self.send("pong")
                elif m.kind == "echo":
                    self.send("echo", m.payload, seq=m.fields["seq"])
                else:
                    log(f"dropped an unexpected {m.kind}")
            except Interrupted as e:
                pending = e.message
            except EdgeInferError as e:
                log(f"failed: {e}")
                self.send("failed", message=str(e))
            except Exception as e:  # a bug: the master hears of it at once, and the traceback is printed
                self.send("failed", message=f"{type(e).__name__}: {e}")
                raise

    def _command(self) -> Message | Received:
        """The master's next command: a step from the link, or a message from the ZeroMQ socket.
        Meanwhile echoes on the link (how the master measures its floor); a link the master closed
        is dropped (it re-plans or stops: a command follows)."""
        while True:
            if self.link is None:
                return self.recv(None)
            try:
                while (got := self.link.take()) is not None:
                    if got.kind == STEP:
                        return got
                    if got.kind == ECHO:
                        self.link.send(ECHO, got.seq, got.data, timeout=self.timeout)
                    else:
                        log(f"dropped a link message of kind {got.kind} between steps")
            except LinkClosed:
                self._drop_link()
                continue
            wait_any([self.link], self.sock, 0.5)
            m = self.recv(0)
            if m is not None:
                return m

    def _drop_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def _held_models(self) -> list[str]:
        """The fingerprints of the files held whole as FINGERPRINT.safetensors (pulled, or linked by
        the user); not shard files written from them (a master on this machine shares the dir)."""
        if not self.cache_dir.is_dir():
            return []
        return sorted(p.stem for p in self.cache_dir.glob("*.safetensors") if re.fullmatch(r"[0-9a-f]{64}", p.stem))

    def _load(self, m: Message) -> None:
        f = m.fields
        self._drop_link()
        try:
            link_id, key = bytes.fromhex(f["link_id"]), bytes.fromhex(f["link_key"])
        except ValueError:
            link_id = key = b""
        if (len(link_id), len(key)) != (ID_BYTES, KEY_BYTES):
            raise EdgeInferError("a load with a malformed link id or key")
        # before loading: the master takes the links once every worker is ready
        self.link = open_link(*link_address(self.address), link_id, key, self.timeout)
        shard, share, share_file = self._open_share(f)
        self._keep_only(f["fingerprint"], share_file)
        window, pinned = None, ()
        if self.mem_limit is not None:
            plan = model_memory_plan(shard, f["context"], self.mem_limit, not f["exact"], f["attention"],
                                     cache_type=f["cache_type"])
            log(plan.describe())
            window, pinned = plan.window, plan.pinned
        self.model = Model(shard, quantized=not f["exact"], attention=f["attention"], window=window, pinned=pinned,
                           cache_type=f["cache_type"])
        self.model.allreduce = partial_to_float  # compile both halves now, not at the first step
        self.model.warm_up()
        self.cache = self.model.new_cache(f["context"])
        if f["sync"] not in DTYPES:
            raise EdgeInferError(f"unknown sync type {f['sync'][:10]!r}")
        if not 0 < f["rank"] < f["nodes"]:
            raise EdgeInferError(f"node {f['rank']} of {f['nodes']}")
        self.member = StarMember(self, f["sync"], f["rank"], f["nodes"])
        self.model.allreduce = self.member.allreduce
        log(f"loaded its share: KV heads {share.kv_start}-{share.kv_end}, MLP columns {share.col_start}-{share.col_end}, "
            f"{self.model.path.cache_type} KV cache")
        self.send("ready", rss=process_rss())

    def _open_share(self, f: dict) -> tuple[WeightSource, Share, Path | None]:
        """The share to load as a source, and the file of it this worker pulled or wrote (None when
        it slices the model file it holds)."""
        if f["shard_fingerprint"] and not self._holds(f["fingerprint"], f["size"]):
            share_file = self._model_file(f["shard_fingerprint"], f["shard_size"])
            shard, share = open_model(str(share_file)), Share.parse(f["share"])
            if (shard.config.num_kv_heads, shard.config.intermediate_size) != (share.kv_heads, share.columns):
                raise EdgeInferError(f"the shard file does not hold the share {f['share']}")
            return shard, share, share_file
        path = self._model_file(f["fingerprint"], f["size"])
        source = open_model(str(path))
        share = Share.from_dict(f["share"], source.config)
        shard = ShardSource(source, share, layers_only=True)  # the master keeps embedding and head
        if self.mem_limit is None:
            return shard, share, None
        # stream from a file of the share alone
        share_file = shard_file(shard, path.parent, path.stem,
                                lambda done, total: self.send("progress", done=done, total=total))
        return open_model(str(share_file)), share, share_file

    def _keep_only(self, model_fp: str, share_file: Path | None) -> None:
        """Remove the files of this model's earlier shares that this worker pulled or wrote (listed
        in its cache dir's SHARE_INDEX): the plans that used them are gone."""
        index_path = self.cache_dir / SHARE_INDEX
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
        for name, model in list(index.items() if isinstance(index, dict) else []):
            if model == model_fp and (share_file is None or name != share_file.name):
                (self.cache_dir / name).unlink(missing_ok=True)
                del index[name]
                log(f"removed {name}, the share of an earlier plan")
        if share_file is not None:
            index[share_file.name] = model_fp
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)

    def _holds(self, fp: str, size: int) -> bool:
        path = self.cache_dir / f"{fp}.safetensors"
        return path.exists() and path.stat().st_size == size

    def _model_file(self, fp: str, size: int) -> Path:
        """The file with this fingerprint (the model's or a shard's): from the cache dir, or pulled
        from the master once."""
        if len(fp) != 64 or not all(c in "0123456789abcdef" for c in fp):
            raise EdgeInferError(f"malformed model fingerprint {fp[:70]!r}")
        path = self.cache_dir / f"{fp}.safetensors"
        if self._holds(fp, size):
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        with open(part, "ab") as out:
            fcntl.flock(out, fcntl.LOCK_EX)  # another worker on this device may be pulling it: wait
            if self._holds(fp, size):
                return path
            self._pull(fp, size, out)
            if sha256_file(str(part)) != fp:
                part.unlink()
                raise EdgeInferError("the pulled model file does not match its fingerprint; removed it")
            os.replace(part, path)
        return path

    def _pull(self, fp: str, size: int, out) -> None:
        """Append the file's bytes from where `out` ends (a pull cut short resumes there)."""
        offset, reported = out.tell(), -1
        while offset < size:
            self.send("need", fingerprint=fp, offset=offset)
            m = self.recv(self.timeout)
            while m is not None and m.kind == "ping":  # the master checks on a worker that keeps it waiting
                self.send("pong")
                m = self.recv(self.timeout)
            if m is None:
                raise EdgeInferError(f"the master sent no model data within {self.timeout:g} s")
            if m.kind != "chunk" or m.fields["offset"] != offset or m.fields["fingerprint"] != fp:
                raise Interrupted(m) if m.kind in ("load", "bye") else EdgeInferError(f"expected model data, got {m.kind}")
            out.write(m.payload)
            offset += len(m.payload)
            if offset * 10 // size != reported:
                reported = offset * 10 // size
                log(f"pulling {fp[:12]}: {offset >> 20} of {size >> 20} MB")
        out.flush()

    def _step(self, m: Received) -> None:
        if self.model is None:
            raise EdgeInferError("a step before any load")
        start, row = m.arg, self.model.config.hidden_size * 4
        if start > self.cache.length:
            raise EdgeInferError(f"the step starts at {start} but this node's cache holds {self.cache.length}")
        h = as_array(m.data, m.wire, (len(m.data) // row, self.model.config.hidden_size)) if m.wire == "f4" else None
        if h is None or not h.shape[0]:
            raise EdgeInferError(f"a step of {len(m.data)} bytes as {m.wire}: not hidden vectors of "
                                 f"{self.model.config.hidden_size} floats")
        if self.cache.truncate(start) != start:
            raise EdgeInferError(f"the step starts at {start}, which this node's cache no longer holds")
        self.member.begin(m.seq)
        self.threads.adapt()
        t0, waited = time.perf_counter(), self.member.wait_s
        self.model.run_layers(h, self.cache)
        if h.shape[0] == 1:
            self.steps += 1
            self.step_s += time.perf_counter() - t0
            self.step_wait_s += self.member.wait_s - waited


REJOIN_AFTER = 2.0  # seconds between a session's end (or a lost master) and the next join


def run_worker(join: str, token: str, cache_dir: str | None = None, timeout: float = 60.0,
               mem_limit: int | None = None, stay: bool = False) -> int:
    """One session with the master; with `stay`, one after another: when the master ends the
    session, stops or is lost, the worker joins it again (a restarted master too) until stopped.
    A refusal (wrong token or version) ends it either way."""
    while True:
        worker = Worker(join, token, cache_dir, timeout, mem_limit)
        try:
            worker.join(forever=stay)
            worker.serve()
        except Refused:
            raise
        except EdgeInferError as e:
            if not stay:
                raise
            log(f"{e}; joining again")
        finally:
            worker.close()
        if not stay:
            return 0
        time.sleep(REJOIN_AFTER)

