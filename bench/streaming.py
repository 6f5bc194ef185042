"""Models larger than memory: decode time per token when layers stream under --mem-limit, against
the I/O bound measured in the same run, and the peak RSS.

For each shape a random-weight 4-bit model is written once (`edgeinfer synth`, into --dir). Then:
- the file's sequential read bandwidth: O_DIRECT reads of 128 MB (no page cache), over the whole file;
- `edgeinfer run FILE --mem-limit LIMIT -c CTX -n N -v` under `/usr/bin/time -v`: decode tok/s,
  bytes read per forward pass, the compute's wait for reads, peak RSS;
- optionally the same fully resident (--resident), when the machine holds it.
The I/O bound per token is bytes per pass / read bandwidth; the ratio is time per token / that bound.
Prints JSON and a one-line summary per shape. Random weights: speed and memory only, never quality.

    python bench/streaming.py --shape llama2-7b --mem-limit 1G [--resident]
    python bench/streaming.py --shape llama2-70b --mem-limit 2G --tokens 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

CHUNK = 128 << 20


def read_bandwidth(path: str) -> float:
    """MB/s of O_DIRECT sequential reads of the whole file in 128 MB requests."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    raw = np.empty(CHUNK + 4096, np.uint8)
    buf = memoryview(raw[-raw.ctypes.data % 4096:][:CHUNK])
    total, start, offset = 0, time.perf_counter(), 0
    try:
        while n := os.preadv(fd, [buf], offset):
            total += n
            offset += n
    finally:
        os.close(fd)
    return total / (time.perf_counter() - start) / 1e6


def run(path: str, tokens: int, ctx: int, limit: str | None) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "edgeinfer.cli", "run", path, "-p", "hello", "--raw",
           "--temp", "0", "-n", str(tokens), "-c", str(ctx), "-v"] + (["--mem-limit", limit] if limit else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed: {r.stderr.strip().splitlines()[-3:]}")
    err = r.stderr
    decode = float(re.search(r"decode: \d+ tok, ([\d.]+) tok/s", err).group(1))
    stream = re.search(r"stream: (\d+) MB read per forward pass at (\d+) MB/s \((\d+) MB pinned\); the compute waited "
                       r"for reads (\d+)%", err)
    plan = re.search(r"plan: ([^\n]*)", err)
    return {"mem_limit": limit, "decode_tok_s": decode, "s_per_token": 1 / decode if decode else None,
            "peak_rss_mb": int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1024,
            "mb_per_pass": int(stream.group(1)) if stream else None,
            "stream_read_mb_s": int(stream.group(2)) if stream else None,
            "pinned_mb": int(stream.group(3)) if stream else None,
            "waited_for_io": int(stream.group(4)) / 100 if stream else None,
            "plan": plan.group(1) if plan else "fully resident"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--mem-limit", default="1G")
    p.add_argument("--tokens", type=int, default=6, help="generated tokens (the first comes from the prefill)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--dir", default="/tmp/edgeinfer-synth")
    p.add_argument("--resident", action="store_true", help="also run it fully resident")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"{args.shape}-q4.safetensors")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "edgeinfer.cli", "synth", "--shape", args.shape, "--bits", "4",
                        "-o", path], check=True)
    before = read_bandwidth(path)
    streamed = run(path, args.tokens, args.ctx, args.mem_limit)
    after = read_bandwidth(path)
    bandwidth = max(before, after)  # the disk's speed drifts: the faster read gives the stricter bound
    result = {"shape": args.shape, "file_mb": os.path.getsize(path) / 1e6, "read_mb_s": round(bandwidth),
              "read_mb_s_before_after": [round(before), round(after)], "streamed": streamed}
    bound = streamed["mb_per_pass"] / bandwidth if streamed["mb_per_pass"] else None
    result["io_bound_s_per_token"] = bound
    result["ratio_to_io_bound"] = streamed["s_per_token"] / bound if bound else None
    if args.resident:
        result["resident"] = run(path, args.tokens, args.ctx, None)
    print(json.dumps(result, indent=1))
    line = (f"{args.shape} ({result['file_mb'] / 1e3:.1f} GB) --mem-limit {args.mem_limit}: "
            f"{streamed['s_per_token']:.2f} s/token, peak RSS {streamed['peak_rss_mb']:.0f} MB, "
            f"I/O bound {bound:.2f} s/token (file read {bandwidth:.0f} MB/s) -> x{result['ratio_to_io_bound']:.2f}")
    if args.resident:
        r = result["resident"]
        line += f"; resident {r['s_per_token']:.3f} s/token, peak RSS {r['peak_rss_mb']:.0f} MB"
    print(line)


if __name__ == "__main__":
    main()
