"""What a node knows about itself and its files: cores, free memory, measured GEMV speed, and the
sha256 fingerprint of a model file (remembered by path, size and mtime, since hashing gigabytes
takes seconds)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from ..kernels.activations import quantize_activations
from ..kernels.q4 import Q4Matrix, gemv
from ..kernels.simd import has_kernels
from ..paths import home
from ..storage.direct_io import aligned_buffer, open_direct
from ..storage.safetensors import PAGE

READ_BLOCK = 8 << 20


logger = logging.getLogger("edgeinfer.cluster")  # the command line prints it on stderr, the chat app as notices


def log(message: str) -> None:
    """One line per cluster event."""
    logger.info(message)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def gemv_speed(rows: int = 2048, cols: int = 2048, repeats: int = 20) -> float:
    """GB/s of 4-bit weights this node's GEMV streams (a 2 MB matrix), the speed its share follows."""
    if not has_kernels():
        return 1.0  # the float path: no kernel to measure, equal shares
    rng = np.random.default_rng(0)
    m = Q4Matrix.from_rows(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                           np.full((rows, cols // 32), 0.01, np.float32))
    x, out = quantize_activations(rng.standard_normal(cols).astype(np.float32)), np.empty(rows, np.float32)
    gemv(m, x, out, parallel=True)  # as the fused decode layer runs every matrix
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        gemv(m, x, out, parallel=True)
        times.append(time.perf_counter() - t)
    return m.nbytes / float(np.median(times)) / 1e9


def disk_speed(folder: Path, nbytes: int = 64 << 20) -> float:
    """MB/s of reading (O_DIRECT where the filesystem allows) the first `nbytes` of the largest
    model file in `folder`: how fast this node could stream its share; 0 when it holds none."""
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size) if folder.is_dir() else []
    if not files:
        return 0.0
    fd, _ = open_direct(str(files[-1]))
    buf = aligned_buffer(min(nbytes, files[-1].stat().st_size) // PAGE * PAGE or PAGE)
    try:
        t = time.perf_counter()
        n = os.preadv(fd, [memoryview(buf)], 0)
        return n / (time.perf_counter() - t) / 1e6
    except OSError:
        return 0.0
    finally:
        os.close(fd)


def fingerprint(path: str) -> str:
    """sha256 of the file's bytes."""
    st = os.stat(path)
    memo_path = home() / "fingerprints.json"
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    digest = sha256_file(path)
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = digest
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:
        pass  # only a memo: the next start hashes again
    return digest


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
    return h.hexdigest()
