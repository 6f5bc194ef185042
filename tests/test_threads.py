"""The kernels' thread count, re-chosen between steps (edgeinfer/threads.py): fewer threads while
other programs keep cores busy, the ceiling again when they stop, and the same bits either way."""

from __future__ import annotations

import subprocess
import sys
import time

import numba
import numpy as np
import pytest

from edgeinfer.threads import Sample, Threads, cpu_quota, cpu_sample


def busy_programs(count: int) -> list[subprocess.Popen]:
    """Busy loops, each in a session of its own, as programs started from other terminals are."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(count)]


def test_busy_programs_elsewhere_leave_one_thread():
    """As many busy programs as this process may use CPUs, each in a session of its own: the next
    choice is one thread, applied to the calling thread's Numba count."""
    threads = Threads(interval=0.3)
    assert cpu_sample(threads.cpus) is not None  # Linux: the look works here
    hogs = busy_programs(len(threads.cpus))
    try:
        time.sleep(0.4)
        threads.adapt()  # a look over a window that began before the busy programs
        time.sleep(0.6)
        assert threads.adapt() == 1 and numba.get_num_threads() == 1
        assert threads.others > len(threads.cpus) - 0.5
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_a_benchmark_beside_busy_programs_says_so(tiny_gguf):
    """`bench` keeps the thread counts it is given, and says when other programs took cores while it
    ran (one thread here, so that the run itself is not stalled)."""
    from conftest import edgeinfer_cli

    hogs = busy_programs(len(Threads().cpus))
    try:
        r = edgeinfer_cli("bench", str(tiny_gguf), "-p", "8", "-n", "4", "-r", "1", "-t", "1", "-o", "json")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert r.returncode == 0, r.stderr
    assert "| tg4 |" not in r.stdout and '"tg4"' in r.stdout  # the JSON rows, as ever
    note = [line for line in r.stderr.splitlines() if "other programs used" in line]
    assert len(note) == 1 and note[0].startswith("edgeinfer: note: other programs used ")
    assert note[0].endswith("cores during the benchmark: its figures are not this machine's alone")


class Script:
    """CPU samples whose 'other programs' use `others` cores from one look to the next."""

    def __init__(self):
        self.at, self.busy, self.ours, self.looks = 100.0, 0.0, 0.0, 0

    def step(self, seconds: float, others: float, ours: float) -> None:
        self.at += seconds
        self.busy += (others + ours) * seconds
        self.ours += ours * seconds

    def __call__(self, cpus) -> Sample:
        self.looks += 1
        return Sample(self.at, self.busy, self.ours)


@pytest.mark.parametrize("others, expected", [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (2.0, 1)])
def test_the_choice_is_the_cores_left_rounded(monkeypatch, others, expected):
    """Two CPUs (whatever this machine has): this process busy on both, others using `others` cores."""
    script = Script()
    monkeypatch.setattr("edgeinfer.threads.affinity", lambda: frozenset({0, 1}))
    threads = Threads(ceiling=2, interval=0.5, sample=script, clock=lambda: script.at)
    applied = []
    threads._apply = applied.append
    script.step(0.6, others, 2.0 - min(others, 1.0))
    assert threads.adapt() == expected and applied == [expected]
    assert threads.others == pytest.approx(others)


def test_it_looks_at_most_every_interval_and_comes_back_to_the_ceiling(monkeypatch):
    script = Script()
    monkeypatch.setattr("edgeinfer.threads.affinity", lambda: frozenset(range(8)))
    threads = Threads(ceiling=6, interval=0.5, sample=script, clock=lambda: script.at)
    threads._apply = lambda n: None  # 8 CPUs need not exist here: only the choice is checked
    looks = script.looks
    script.step(0.05, 3.0, 5.0)
    assert threads.adapt() == 6 and script.looks == looks  # the first look waits for FIRST_WINDOW
    script.step(0.1, 3.0, 5.0)
    assert threads.adapt() == 5 and script.looks == looks + 1  # 8 - 3 cores left
    script.step(0.2, 0.0, 6.0)
    assert threads.adapt() == 5 and script.looks == looks + 1  # within the interval: no look
    script.step(0.4, 0.0, 6.0)
    assert threads.adapt() == 6 and script.looks == looks + 2  # others gone: the ceiling again
    script.step(0.6, 7.6, 0.4)
    assert threads.adapt() == 1  # at least one


@pytest.mark.real_model
def test_any_thread_count_gives_the_same_bits(smollm2_single):
    """The choice may change between any two steps: prefill chunks, single decode steps and batched
    steps give the same logits on 1 thread as on the ceiling, the real model on its 4-bit path."""
    from edgeinfer.session import open_engine

    model = open_engine(str(smollm2_single), 512).model
    prompt = np.arange(5, 150) % 4000 + 17

    def logits(counts):
        cache, caches, out = model.new_cache(512), model.new_caches(512, 2), []
        for slot in (0, 1):
            numba.set_num_threads(counts[0])
            out.append(np.array(model.prefill(prompt[:100 + slot], caches.slot(slot))))
        numba.set_num_threads(counts[1 % len(counts)])
        out.append(np.array(model.prefill(prompt[:120], cache)))
        for i, token in enumerate(prompt[120:140]):
            numba.set_num_threads(counts[i % len(counts)])
            out.append(np.array(model.forward(np.asarray([token]), cache)))
            out.extend(np.array(row) for row in model.decode_batch(np.asarray([token, token + 1]), caches, [0, 1]))
        return out

    ceiling = numba.config.NUMBA_NUM_THREADS
    try:
        fixed, varying = logits([ceiling]), logits([1, ceiling, 1])
    finally:
        numba.set_num_threads(ceiling)
    assert len(fixed) == len(varying) == 63
    assert all(np.array_equal(a, b) for a, b in zip(fixed, varying))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cgroup_quota_bounds_the_count(tmp_path, monkeypatch, version):
    """A container's CPU quota (--cpus): the smallest on the way up from this process's cgroup to
    its mount, as /proc/self/cgroup and /proc/self/mounts name them; none where every level says
    max (v2) or -1 (v1). Here a parent's 1.5 CPUs under a child's none."""
    proc, top = tmp_path / "proc", tmp_path / "sys" / ("cpu,cpuacct" if version == "v1" else "unified")
    if version == "v1":
        write(proc / "cgroup", "5:memory:/box/job\n3:cpu,cpuacct:/box/job\n0::/\n")
        write(proc / "mounts", f"cgroup {top} cgroup rw,relatime,cpu,cpuacct 0 0\n")
        for folder, quota in ((top, "-1"), (top / "box", "150000"), (top / "box" / "job", "-1")):
            write(folder / "cpu.cfs_quota_us", quota + "\n")
            write(folder / "cpu.cfs_period_us", "100000\n")
    else:
        write(proc / "cgroup", "0::/box/job\n")
        write(proc / "mounts", f"cgroup2 {top} cgroup2 rw,nosuid 0 0\n")
        for folder, limit in ((top, "max 100000"), (top / "box", "150000 100000"), (top / "box" / "job", "max 100000")):
            write(folder / "cpu.max", limit + "\n")
    assert cpu_quota(proc) == 1.5
    box = top / "box"
    write(box / ("cpu.cfs_quota_us" if version == "v1" else "cpu.max"), "-1\n" if version == "v1" else "max 100000\n")
    assert cpu_quota(proc) is None

    script = Script()
    monkeypatch.setattr("edgeinfer.threads.affinity", lambda: frozenset(range(4)))
    monkeypatch.setattr("edgeinfer.threads.cpu_quota", lambda: 1.5)
    threads = Threads(ceiling=4, interval=0.5, sample=script, clock=lambda: script.at)
    threads._apply = lambda n: None
    script.step(0.6, 0.0, 1.5)
    assert threads.adapt() == 2  # 1.5 CPUs' worth, rounded; nothing else running
    script.step(0.6, 3.0, 1.0)
    assert threads.adapt() == 1  # others leave 1 of the 4
