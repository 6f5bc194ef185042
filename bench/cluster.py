"""The home cluster on one machine: decode speed per node count and link latency, where each
token's time goes, and star vs ring all-reduce latency.

Links: every worker reaches the master through a delay proxy (a TCP relay in this process that
holds each chunk for half the RTT in each direction, and paces to --mbit). The kernel here has no
`sch_netem` ("Specified qdisc kind is unknown"), so `tc netem` is not available; the proxy delays
the same bytes at the same place (between the two sockets), in user space.

For N = 1..--nodes: `edgeinfer run MODEL -p ... --listen` plus N-1 `edgeinfer worker`, one thread
each (they share this machine's cores: wall time is not what N devices would give; the per-node
compute time is reported beside it). From the logs: decode tok/s, the master's time waiting in
all-reduces per token and the rest (its compute), each worker's compute and wait per decoded token,
memory (the master's peak RSS, each worker's RSS once loaded); the greedy text is compared to one
node's. Then the all-reduce alone (hidden-size vectors, N processes): star (gather at node 0, sum,
broadcast) against ring (reduce-scatter + all-gather), median per call.

    python bench/cluster.py --rtt 0,2,10 --nodes 4 [--model PATH] [--exact]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

PROMPT = "Write a short story about a robot."
TOKEN = "bench-cluster-token"


def free_port() -> int:
    """A free port whose next one is free too (a master listens on both: its links are on the
    second, edgeinfer/cluster/link.py)."""
    while True:
        with socket.socket() as s, socket.socket() as s2:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


class DelayProxy:
    """127.0.0.1:port -> 127.0.0.1:target, each chunk delivered rtt/2 after it arrived, in order,
    at no more than `mbit` Mbit/s per direction (0: no cap)."""

    def __init__(self, target: int, rtt_ms: float, mbit: float = 0.0, port: int | None = None):
        self.target, self.delay, self.rate = target, rtt_ms / 2000, mbit * 1e6 / 8
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_until_complete(server.serve_forever())

    async def _client(self, reader, writer) -> None:
        for _ in range(600):  # the master may not listen yet
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            free_at = 0.0
            while (item := await queue.get()) is not None:
                due, data = item
                now = time.monotonic()
                start = max(due, free_at)
                if start > now:
                    await asyncio.sleep(start - now)
                writer.write(data)
                free_at = max(start, time.monotonic()) + (len(data) / self.rate if self.rate else 0)
                await writer.drain()
            writer.close()

        task = asyncio.ensure_future(deliver())
        while data := await reader.read(1 << 16):
            queue.put_nowait((time.monotonic() + self.delay, data))
        queue.put_nowait(None)
        await task


def delayed_pair(target: int, rtt_ms: float, mbit: float) -> int:
    """Relays to `target` and `target` + 1 on a port and the next: what a worker joins."""
    relay = DelayProxy(target, rtt_ms, mbit)
    DelayProxy(target + 1, rtt_ms, mbit, relay.port + 1)
    return relay.port


def held_model_dir(model: str) -> str:
    """A worker cache dir holding the model (a link named by its fingerprint): on one machine the
    workers need not pull what is already on its disk."""
    from edgeinfer.cluster.node import fingerprint

    folder = os.path.join(tempfile.gettempdir(), "edgeinfer-bench-cluster")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, f"{fingerprint(model)}.safetensors")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(model), link)
    return folder


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeinfer.cli", *args]


def generation(model: str, nodes: int, rtt_ms: float, mbit: float, tokens: int, exact: bool,
               worker_limit: str | None = None, ctx: int | None = None, threads: int = 1) -> dict:
    port = free_port()
    common = ["-t", str(threads)] + (["--exact"] if exact else []) + (["-c", str(ctx)] if ctx else [])
    master = subprocess.Popen(cli("run", model, "-p", PROMPT, "-n", str(tokens), "--temp", "0", *common,
                                  "--listen", str(port), "--token", TOKEN, "--workers", str(nodes - 1),
                                  "--wait", "300", "--timeout", "120"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    # plain loopback when the link has no delay and no cap, else through a delay relay each (one for
    # the master's port, one for its links on the next)
    ports = [port] * (nodes - 1) if not rtt_ms and not mbit else \
        [delayed_pair(port, rtt_ms, mbit) for _ in range(nodes - 1)]
    workers = [subprocess.Popen(cli("worker", "--join", f"127.0.0.1:{p}", "--token", TOKEN, "-t", "1",
                                    "--timeout", "300", "--cache-dir", held_model_dir(model),
                                    *(["--mem-limit", worker_limit] if worker_limit else [])),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for p in ports]
    out, err = master.communicate(timeout=1800)
    werrs = [w.communicate(timeout=120)[1] for w in workers]
    if master.returncode != 0:
        raise SystemExit(f"master failed: {err.strip().splitlines()[-3:]}")
    decode = re.search(r"decode: (\d+) tok, ([\d.]+) tok/s", err)
    n_decode, tok_s = int(decode.group(1)), float(decode.group(2))
    reduces = re.search(r"decode: (\d+) all-reduces: ([\d.]+) s waiting in them \(([\d.]+) ms each\), (\d+) KB", err)
    row = {"nodes": nodes, "threads": threads, "rtt_ms": rtt_ms, "mbit": mbit or None, "decode_tok_s": tok_s, "text": out,
           "ms_per_token": 1e3 / tok_s if tok_s else None}
    floors = re.findall(r"floor: a \d+-byte round trip to worker \d+ on its link takes ([\d.]+) ms "
                        r"\(median of \d+\); on its ZeroMQ socket ([\d.]+) ms", err)
    if floors:  # measured after the generation, between the same processes' sockets
        row["floor_ms"] = min(float(f[0]) for f in floors)
        row["zmq_floor_ms"] = min(float(f[1]) for f in floors)
    if reduces:
        row["allreduce_ms"] = float(reduces.group(3))
        row["master_wait_ms_per_token"] = row["allreduce_ms"] * 2 * _layers(model)  # two per layer
        row["master_compute_ms_per_token"] = row["ms_per_token"] - row["master_wait_ms_per_token"]
    per_worker = []
    for werr in werrs:
        m = re.search(r"served (\d+) decode steps: ([\d.]+) s computing, ([\d.]+) s waiting", werr)
        if m:
            steps = int(m.group(1))
            per_worker.append({"steps": steps, "compute_ms_per_step": float(m.group(2)) * 1e3 / steps,
                               "wait_ms_per_step": float(m.group(3)) * 1e3 / steps})
    row["workers"] = per_worker
    row["dropped"] = re.findall(r"dropped (worker \d+: [^\n]*)", err)  # a re-plan would change what N means
    row["worker_plans"] = [m.group(1) for werr in werrs if (m := re.search(r"plan: ([^\n]*)", werr))]
    row["worker_rss_mb"] = [int(x) for x in re.findall(r"worker \d+ ready, (\d+) MB resident", err)][-(nodes - 1):] \
        if nodes > 1 else []
    row["master_peak_rss_mb"] = float(re.search(r"peak RSS: (\d+) MB", err).group(1))
    row["decode_tokens"] = n_decode
    return row


def _layers(model: str) -> int:
    from edgeinfer.storage import open_model

    return open_model(model).config.num_layers


# --- the all-reduce alone ------------------------------------------------------------------------

def _star_node(rank: int, nodes: int, ports: list[int], size: int, rounds: int, out) -> None:
    import zmq

    ctx = zmq.Context()
    x = np.full(size, rank + 1, np.float32)
    times = []
    if rank == 0:
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(f"tcp://127.0.0.1:{ports[0]}")
        peers = [sock.recv_multipart()[0] for _ in range(nodes - 1)]  # hellos
        for p in peers:
            sock.send_multipart([p, b"go"])
        for _ in range(rounds):
            t = time.perf_counter()
            total = x.copy()
            for _ in range(nodes - 1):
                total += np.frombuffer(sock.recv_multipart()[1], np.float32)
            for p in peers:
                sock.send_multipart([p, total.tobytes()])
            times.append(time.perf_counter() - t)
        out.put(float(np.median(times)))
    else:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(f"tcp://127.0.0.1:{ports[rank]}")  # through this worker's proxy
        sock.send(b"hello")
        sock.recv()
        for _ in range(rounds):
            sock.send(x.tobytes())
            sock.recv()
    ctx.destroy(linger=0)


def ring_allreduce(x: np.ndarray, rank: int, nodes: int, send, recv) -> np.ndarray:
    """The ring all-reduce, to compare with edgeinfer's star (cluster/allreduce.py): reduce-scatter
    then all-gather of N chunks, each node sending to the next (`send(bytes)`) and receiving from
    the previous (`recv() -> bytes`): 2(N-1) hops in sequence, where the star needs 2."""
    chunks = [c.copy() for c in np.array_split(np.asarray(x, np.float32), nodes)]
    for step in range(nodes - 1):  # reduce-scatter: chunk (rank + 1) ends up summed here
        send(chunks[(rank - step) % nodes].tobytes())
        i = (rank - step - 1) % nodes
        chunks[i] += np.frombuffer(recv(), np.float32)
    for step in range(nodes - 1):  # all-gather
        send(chunks[(rank + 1 - step) % nodes].tobytes())
        i = (rank - step) % nodes
        chunks[i] = np.frombuffer(recv(), np.float32).copy()
    return np.concatenate(chunks)


def _ring_node(rank: int, nodes: int, ports: list[int], size: int, rounds: int, out) -> None:
    import zmq

    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(f"tcp://127.0.0.1:{ports[2 * rank]}")
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(f"tcp://127.0.0.1:{ports[2 * ((rank + 1) % nodes) + 1]}")  # the next node's proxy
    x = np.full(size, rank + 1, np.float32)
    for _ in range(2):  # connect: a token around the ring twice
        if rank == 0:
            outbox.send(b"t")
            inbox.recv()
        else:
            inbox.recv()
            outbox.send(b"t")
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        ring_allreduce(x, rank, nodes, outbox.send, inbox.recv)
        times.append(time.perf_counter() - t)
    if rank == 0:
        out.put(float(np.median(times)))
    ctx.destroy(linger=0)


def allreduce_latency(kind: str, nodes: int, size: int, rtt_ms: float, rounds: int) -> float:
    """Median seconds per all-reduce of `size` floats over `nodes` processes, each link delayed."""
    out = mp.Queue()
    if kind == "star":
        master = free_port()
        proxies = [DelayProxy(master, rtt_ms) for _ in range(nodes - 1)]
        ports = [master] + [p.port for p in proxies]
        target = _star_node
    else:  # node r listens on ports[2r]; its proxy (ports[2r+1]) is what node r-1 connects to
        inboxes = [free_port() for _ in range(nodes)]
        proxies = [DelayProxy(p, rtt_ms) for p in inboxes]
        ports = [p for pair in zip(inboxes, [q.port for q in proxies]) for p in pair]
        target = _ring_node
    procs = [mp.Process(target=target, args=(r, nodes, ports, size, rounds, out)) for r in range(nodes)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join(60)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="default: the catalog's SmolLM2 (4-bit)")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rtt", default="0,2,10", help="link RTTs in ms, comma-separated")
    ap.add_argument("--mbit", type=float, default=100.0, help="bandwidth cap per link direction (0: none)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--exact", action="store_true", help="the float32 path")
    ap.add_argument("--rounds", type=int, default=200, help="all-reduces per latency measurement")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--worker-mem-limit", metavar="SIZE", help="workers stream their shard within SIZE")
    ap.add_argument("--min-nodes", type=int, default=1)
    ap.add_argument("-c", "--ctx", type=int, help="context (KV cache) size; a small one lets a limit hold layers")
    ap.add_argument("--alone-threads", type=int, default=0, help="also run one node with this many threads")
    args = ap.parse_args()
    if args.model is None:
        from edgeinfer.storage.fetch import pull

        args.model = str(pull("smollm2-135m"))
    rtts = [float(r) for r in args.rtt.split(",")]
    rows, latency = [], []
    if not args.skip_generation:
        if args.alone_threads:
            rows.append(generation(args.model, 1, 0.0, args.mbit, args.tokens, args.exact, None, args.ctx,
                                   args.alone_threads))
        for rtt in rtts:
            for n in range(args.min_nodes, args.nodes + 1):
                row = generation(args.model, n, rtt, args.mbit, args.tokens, args.exact, args.worker_mem_limit,
                                 args.ctx)
                rows.append(row)
                print(f"# {n} node(s), RTT {rtt:g} ms: {row['decode_tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
        alone = next((r["text"] for r in rows if r["nodes"] == 1), None)
        base = next((r for r in rows if r["nodes"] == 1 and r["threads"] == args.alone_threads), None)
        for r in rows:
            r["same_text_as_one_node"] = r.pop("text") == alone if alone is not None else None
            if base is not None and r["nodes"] > 1:  # the measure: N nodes against one with all the cores
                r["of_one_node"] = r["decode_tok_s"] / base["decode_tok_s"]
    hidden = _hidden(args.model)
    for rtt in rtts:
        for n in range(2, args.nodes + 1):
            star = allreduce_latency("star", n, hidden, rtt, args.rounds)
            ring = allreduce_latency("ring", n, hidden, rtt, args.rounds)
            latency.append({"nodes": n, "rtt_ms": rtt, "floats": hidden, "star_ms": star * 1e3, "ring_ms": ring * 1e3,
                            "ring_over_star": ring / star})
    print(json.dumps({"model": args.model, "exact": args.exact, "cores": os.cpu_count(), "generation": rows,
                      "allreduce": latency}, indent=1))
    for r in rows:
        w = "; ".join(f"worker compute {x['compute_ms_per_step']:.1f} ms/token, wait {x['wait_ms_per_step']:.1f}"
                      for x in r["workers"])
        split = f"master compute {r['master_compute_ms_per_token']:.1f} ms/token, waiting in all-reduces " \
            f"{r['master_wait_ms_per_token']:.1f} ({r['allreduce_ms']:.3f} ms each, a plain round trip on the same " \
            f"link {r.get('floor_ms', float('nan')):.3f}, on ZeroMQ {r.get('zmq_floor_ms', float('nan')):.3f}); " if "allreduce_ms" in r else ""
        print(f"summary: {r['nodes']} nodes x {r['threads']} threads, RTT {r['rtt_ms']:g} ms: "
              f"{r['decode_tok_s']:.2f} tok/s"
              + (f" ({r['of_one_node']:.1%} of one node x {args.alone_threads} threads)" if "of_one_node" in r else "")
              + f", same text {r['same_text_as_one_node']}, master peak RSS {r['master_peak_rss_mb']:.0f} MB"
              + (f", workers {r['worker_rss_mb']} MB" if r["worker_rss_mb"] else "")
              + (f" ({split}{w})" if split or w else "") + (f" DROPPED: {r['dropped']}" if r["dropped"] else ""))
    for x in latency:
        print(f"summary: all-reduce of {x['floats']} floats, {x['nodes']} nodes, RTT {x['rtt_ms']:g} ms: star "
              f"{x['star_ms']:.2f} ms, ring {x['ring_ms']:.2f} ms (ring/star x{x['ring_over_star']:.2f})")


def _hidden(model: str) -> int:
    from edgeinfer.storage import open_model

    return open_model(model).config.hidden_size


if __name__ == "__main__":
    main()
