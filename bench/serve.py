"""Serving under concurrency: `edgeinfer serve` (continuous batching) against llama-cpp-python's
OpenAI server (`llama_cpp.server`, in the peer venv) on the same GGUF, 2 threads each, in one run.

For 1, 2, 4 and 8 concurrent streaming clients (each a different prompt, greedy, max_tokens 64):
aggregate generated tok/s (all clients' tokens over the wall time from the first request to the last
token) and the median time to first token; every edgeinfer client's text must equal its prompt's text
when served alone. Servers run one after the other, alternating rounds. Then a bounded soak of
edgeinfer alone: 200 requests from 16 clients, 20 of which disconnect at a random point; every
finished request must equal its prompt's text, none may hang, and the server's RSS after the soak
must be within 10 MB of before.

    python bench/serve.py [--model smollm2-135m] [--threads 2] [--rounds 2] [--soak 200]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))

from peer import peer_python  # noqa: E402

PROMPTS = ["Write a long story about a dragon.", "Explain how a rainbow forms, in detail.",
           "Describe a busy market in the morning.", "Write a letter to a friend about a trip to the sea.",
           "Tell me the history of bread.", "Describe your perfect garden.", "Explain how trains work.",
           "Write a story about a lost cat finding its way home."]
MAX_TOKENS = 64
CLIENTS = (1, 2, 4, 8)
PEER_SERVER_PACKAGES = ["fastapi>=0.100", "uvicorn>=0.22", "sse-starlette>=1.6.1", "starlette-context>=0.3.6",
                        "pydantic-settings>=2.0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, command: list[str], port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a server that logs every request would fill it
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200 and self.healthy():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def healthy(self) -> bool:
        r = httpx.get(self.url + "/health", timeout=5)
        return r.status_code in (200, 404)  # llama_cpp.server has no /health

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def edgeinfer_server(model: str, threads: int, parallel: int) -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "edgeinfer.cli", "serve", model, "--port", str(port), "-t", str(threads),
                   "--parallel", str(parallel)], port)


def peer_server(gguf: str, threads: int) -> Server:
    python = peer_python()
    check = subprocess.run([str(python), "-c", "import llama_cpp.server.app"], capture_output=True)
    if check.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_SERVER_PACKAGES], check=True)
    port = free_port()
    return Server([str(python), "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
                   "--n_ctx", "2048", "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--interrupt_requests", "False"], port)  # queue requests, as a client expects


def stream_chat(url: str, prompt: str, max_tokens: int = MAX_TOKENS, drop_after: int | None = None,
                timeout: float = 120) -> dict:
    """One streamed greedy chat request: its text, token count (chunks with content), time to first
    token and end time; `drop_after`: close the connection after that many chunks."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0, first, text, chunks, finish = time.perf_counter(), None, "", 0, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                first = first or time.perf_counter()
                text += piece
                chunks += 1
            finish = choice.get("finish_reason") or finish
            if drop_after is not None and chunks >= drop_after:
                return {"dropped": True}
    first = first or time.perf_counter()
    return {"text": text, "chunks": chunks, "ttft": first - t0, "first": first, "end": time.perf_counter(),
            "start": t0, "finish": finish}


def usage_tokens(url: str, prompt: str) -> tuple[str, int]:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    return r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]


def concurrent(url: str, n: int, tokens: dict[str, int]) -> dict:
    """n clients at once, prompts 0..n-1: aggregate tok/s, median time to first token, texts."""
    results: list = [None] * n

    def client(i):
        results[i] = stream_chat(url, PROMPTS[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r["finish"] is None for r in results):
        raise RuntimeError(f"a request ended without a finish reason at {n} clients")
    wall = max(r["end"] for r in results) - t0
    total = sum(tokens[PROMPTS[i]] for i in range(n))
    decode_window = max(r["end"] for r in results) - min(r["first"] for r in results)
    return {"clients": n, "aggregate_tok_s": total / wall, "decode_tok_s": (total - n) / decode_window,
            "ttft_median_s": statistics.median(r["ttft"] for r in results),
            "texts": [r["text"] for r in results], "tokens": total, "wall_s": wall}


def soak(server: Server, refs: dict[str, str], requests: int, clients: int, drops: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    plan = [(PROMPTS[rng.randrange(len(PROMPTS))], None) for _ in range(requests)]
    for k in rng.sample(range(requests), drops):
        plan[k] = (plan[k][0], rng.randrange(1, 40))
    rss_before = server.rss_mb()
    lock, nxt, outcome = threading.Lock(), [0], {"ok": 0, "wrong": 0, "dropped": 0, "errors": []}

    def client():
        while True:
            with lock:
                if nxt[0] >= len(plan):
                    return
                prompt, drop = plan[nxt[0]]
                nxt[0] += 1
            try:
                r = stream_chat(server.url, prompt, drop_after=drop, timeout=180)
            except Exception as exc:  # noqa: BLE001 — counted: a hung or failed request
                with lock:
                    outcome["errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                key = "dropped" if r.get("dropped") else "ok" if r["text"] == refs[prompt] else "wrong"
                outcome[key] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(1.0)  # the dropped requests' slots free at the next step
    metrics = httpx.get(server.url + "/metrics").text
    running = next(float(x.split()[1]) for x in metrics.splitlines() if x.startswith("edgeinfer_requests_running "))
    return {**outcome, "requests": requests, "clients": clients, "seconds": time.perf_counter() - t0,
            "rss_before_mb": rss_before, "rss_after_mb": server.rss_mb(), "running_after": running}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m", help="a catalog name or a GGUF file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--soak", type=int, default=200, help="soak requests (0 skips the soak)")
    args = p.parse_args()
    from edgeinfer.storage.fetch import fetch_gguf

    gguf = args.model if os.path.exists(args.model) else str(fetch_gguf(args.model))
    ours: dict[int, list] = {n: [] for n in CLIENTS}
    peers: dict[int, list] = {n: [] for n in CLIENTS}
    refs, equal = {}, True
    for round_ in range(args.rounds):
        server = edgeinfer_server(args.model, args.threads, max(CLIENTS))
        try:
            if not refs:  # each prompt alone, one at a time: the texts every batched client must give
                for prompt in PROMPTS:
                    refs[prompt] = usage_tokens(server.url, prompt)
            tokens = {k: v[1] for k, v in refs.items()}
            for n in CLIENTS:
                r = concurrent(server.url, n, tokens)
                equal &= r.pop("texts") == [refs[PROMPTS[i]][0] for i in range(n)]
                ours[n].append(r)
            if round_ == args.rounds - 1 and args.soak:
                soak_result = soak(server, {k: v[0] for k, v in refs.items()}, args.soak, 16, max(1, args.soak // 10))
        finally:
            server.stop()
        server = peer_server(gguf, args.threads)
        try:
            peer_tokens = {prompt: usage_tokens(server.url, prompt)[1] for prompt in PROMPTS}
            for n in CLIENTS:
                r = concurrent(server.url, n, peer_tokens)
                r.pop("texts")
                peers[n].append(r)
        finally:
            server.stop()
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    table = {n: {"edgeinfer_tok_s": med(ours[n], "aggregate_tok_s"),
                 "llama_cpp_server_tok_s": med(peers[n], "aggregate_tok_s"),
                 "edgeinfer_decode_tok_s": med(ours[n], "decode_tok_s"),
                 "llama_cpp_server_decode_tok_s": med(peers[n], "decode_tok_s"),
                 "edgeinfer_ttft_s": med(ours[n], "ttft_median_s"),
                 "llama_cpp_server_ttft_s": med(peers[n], "ttft_median_s")} for n in CLIENTS}
    for n in CLIENTS:
        table[n]["ratio"] = table[n]["edgeinfer_tok_s"] / table[n]["llama_cpp_server_tok_s"]
        # against one client in the same round (rounds drift on a shared machine), median over rounds
        for key, name in (("aggregate_tok_s", "edgeinfer_scaling"), ("decode_tok_s", "edgeinfer_decode_scaling")):
            table[n][name] = statistics.median(a[key] / b[key] for a, b in zip(ours[n], ours[1]))
    out = {"model": gguf, "threads": args.threads, "rounds": args.rounds, "max_tokens": MAX_TOKENS,
           "texts_equal_alone": equal, "by_clients": table, "runs": {"edgeinfer": ours, "llama_cpp_server": peers}}
    if args.soak:
        out["soak"] = soak_result
    print(json.dumps(out, indent=1))
    line = " | ".join(f"{n}: {t['edgeinfer_tok_s']:.0f} vs {t['llama_cpp_server_tok_s']:.0f} tok/s (x{t['ratio']:.2f}; "
                      f"ours x{t['edgeinfer_scaling']:.2f} of 1 client, decode-only x{t['edgeinfer_decode_scaling']:.2f}; "
                      f"TTFT {t['edgeinfer_ttft_s'] * 1e3:.0f} vs {t['llama_cpp_server_ttft_s'] * 1e3:.0f} ms)"
                      for n, t in table.items())
    print(f"serve, {args.threads} threads, aggregate (edgeinfer vs llama_cpp.server): {line}; texts equal alone: {equal}",
          file=sys.stderr)
    if args.soak:
        s = soak_result
        print(f"soak: {s['ok']} ok, {s['wrong']} wrong, {s['dropped']} dropped, {len(s['errors'])} failed; RSS "
              f"{s['rss_before_mb']:.1f} -> {s['rss_after_mb']:.1f} MB; running after: {s['running_after']:.0f}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
