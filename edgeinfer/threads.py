"""How many threads the kernels run on: the cores asked for (-t, default all), less those other
programs are keeping busy.

Numba's OpenMP threads meet at a barrier several times a layer. When another program holds a core,
the thread that runs there waits for the scheduler at every barrier, and its partner spins for it:
measured here (2 cores, one other busy program in another session), SmolLM2 decoded at 0.65 tok/s on
2 threads against 204 on 1, and llama.cpp fell the same way (0.42 tok/s on 2 threads, 128 on 1).
`nice` does not save it: Linux weighs each session (sched_autogroup) or cgroup as one, so a niced
program in another terminal competes as an equal.

So the engine looks, at most every `interval` seconds, between steps, at how busy its CPUs were
since the last look (/proc/stat, all but idle and iowait), less this process's own CPU time: the
cores other programs used; a cgroup's CPU quota (a container's --cpus) bounds it too. The first look covers the time since this module was imported, so the
first prompt already runs on the right count. The kernels run on the cores the others left, rounded
to the nearest, at least one and at most the ceiling. The kernels' results do not depend on the thread count (every output row is one
thread's), so a change keeps the bits. Without /proc/stat (not Linux), the ceiling, always.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numba


class Sample(NamedTuple):
    at: float  # time.monotonic()
    busy: float  # seconds our CPUs have been busy, for every program
    ours: float  # seconds of CPU this process has used


def cpu_sample(cpus: frozenset[int]) -> Sample | None:
    """The CPUs in `cpus`' busy seconds since boot and this process's CPU seconds, now; None without
    /proc/stat."""
    busy = 0
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if not line.startswith(b"cpu"):
                    break
                name, *ticks = line.split()
                if name == b"cpu" or int(name[3:]) not in cpus:
                    continue
                # user nice system idle iowait irq softirq steal (guest time is inside user)
                busy += sum(int(t) for t in ticks[:8]) - int(ticks[3]) - int(ticks[4])
    except (OSError, ValueError, IndexError):
        return None
    return Sample(time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time())


def others_between(a: Sample, b: Sample) -> float:
    """The cores other programs used, on average, from sample a to sample b."""
    return max(0.0, (b.busy - a.busy) - (b.ours - a.ours)) / (b.at - a.at)


def affinity() -> frozenset[int]:
    """The CPUs this process may run on."""
    return frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


def cpu_quota(proc: Path = Path("/proc/self")) -> float | None:
    """The CPUs' worth of time this process's cgroup and its parents may use (a container's --cpus):
    the smallest quota / period on the way up, cgroup v2 (cpu.max) or v1 (cpu.cfs_quota_us); None
    without one. Threads beyond it are throttled: on 2 CPUs under a quota of 1, SmolLM2 decoded at
    148 tok/s on 2 threads against 192 on 1."""
    try:
        groups = (proc / "cgroup").read_text().splitlines()
        mounts = [line.split() for line in (proc / "mounts").read_text().splitlines()]
        quotas = [q for q in _quotas(groups, mounts) if q is not None]
    except (OSError, ValueError):  # no /proc, a format not known here, a folder not to be read
        return None
    return min(quotas) if quotas else None


def _quotas(groups: list[str], mounts: list[list[str]]):
    """Each level's quota (None: none), from each cgroup that holds the cpu controller up to its mount."""
    for line in groups:
        _, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "cpu" not in controllers.split(","):
            continue
        for mount in mounts:
            if len(mount) < 4 or mount[2] != ("cgroup2" if v2 else "cgroup") or \
                    (not v2 and "cpu" not in mount[3].split(",")):
                continue
            top = Path(mount[1])
            here = top / path.lstrip("/")
            here = here if here.is_dir() else top  # a cgroup namespace shows its root as the mount's
            for folder in (here, *[p for p in here.parents if p.is_relative_to(top)]):
                yield _quota(folder, v2)
                if folder == top:
                    break


def _quota(folder: Path, v2: bool) -> float | None:
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()
        else:
            quota, period = ((folder / f"cpu.cfs_{name}_us").read_text().strip() for name in ("quota", "period"))
        return int(quota) / int(period) if quota not in ("max", "-1") and int(period) > 0 else None
    except (OSError, ValueError):
        return None


_IMPORTED = cpu_sample(affinity())
FIRST_WINDOW = 0.1  # seconds: the shortest look the first choice takes (10 ms ticks: within 0.1 core on 2 CPUs)


class Threads:
    """The thread count for the kernels called from the thread that calls adapt(), re-chosen at
    most every `interval` seconds."""

    def __init__(self, ceiling: int | None = None, interval: float = 0.5,
                 sample: Callable[[frozenset[int]], Sample | None] = cpu_sample,
                 clock: Callable[[], float] = time.monotonic):
        """`sample` and `clock` (the one samples are taken by) are for tests."""
        self.ceiling = ceiling or numba.config.NUMBA_NUM_THREADS
        self.cpus, self.quota = affinity(), cpu_quota() or math.inf  # the quota in CPUs' worth
        self.interval, self._sample, self._clock = interval, sample, clock
        self.others = 0.0  # cores other programs used over the last interval
        self.current = self._choose()  # before the first look: as if nothing else ran
        self._last = _IMPORTED if sample is cpu_sample and _IMPORTED is not None else sample(self.cpus)
        self._chosen = False

    def adapt(self) -> int:
        """The thread count for the next step, applied (numba.set_num_threads, which holds for the
        calling thread)."""
        if self._last is not None and self._clock() - self._last.at >= (
                self.interval if self._chosen else FIRST_WINDOW):
            now = self._sample(self.cpus)
            if now is not None and now.at > self._last.at:
                self.others = others_between(self._last, now)
                self.current, self._chosen = self._choose(), True
            self._last = now
        self._apply(self.current)
        return self.current

    def _choose(self) -> int:
        """The cores the others leave, within the quota, rounded; at least 1, at most the ceiling."""
        left = min(len(self.cpus) - self.others, self.quota)
        return max(1, min(self.ceiling, math.floor(left + 0.5)))

    def _apply(self, count: int) -> None:
        if numba.get_num_threads() != count:
            numba.set_num_threads(count)
