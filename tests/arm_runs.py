"""The emulated ARM runs that tests/test_aarch64.py checks: which CPUs run what, and the processes,
started with the session (conftest.py) so that they run beside the x86 tests.

Emulation is most of a cold suite's time, nearly all of it Numba compiling under qemu, one process a
core. The x86 tests compile one kernel at a time too, which leaves the second core idle for most of
their part. So the emulated processes start when the session does, at the lowest priority (nice 19:
they take what the x86 tests leave, and do not slow those, several of which wait on processes with
timeouts), and the aarch64 tests run last (conftest.py orders them so) and take the results."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "aarch64.sh")
KERNEL_TESTS = ["tests/test_ops.py", "tests/test_q4.py", "tests/test_q8.py", "tests/test_lut_attention.py",
                "tests/test_gguf_quants.py", "tests/test_quantize.py"]
# N1 differs from N2 only in the byte dot product (sdot for usdot): its two forms, on nibbles and on
# bytes, are what test_q4.py and test_q8.py check against numpy. Every other loop is the same code
# around it (test_gguf_quants.py's layouts, 960 s of emulation cold), and N1's probe checks a shard of
# each kernel family (q4, its IQ4 lookup, q6, q8) against x86 bit for bit.
DOT_TESTS = ["tests/test_q4.py", "tests/test_q8.py"]
# cpu: (the path it must take, its kernel tests, whether it runs the model too). "generic" is what
# LLVM sees under qemu when no CPU is named (Numba's own default there): the ARMv8.0 path, compiled
# for no CPU in particular.
CPUS = {"neoverse-n2": ("neon-i8mm", KERNEL_TESTS, True), "cortex-a72": ("neon", KERNEL_TESTS, True),
        "neoverse-n1": ("neon-dotprod", DOT_TESTS, False), "generic": ("neon", [], False)}


_running: set[subprocess.Popen] = set()  # what the session's end stops (arm_runs)
_ended = False
_lock = threading.Lock()  # a process starts before the end, and is stopped, or not at all


def emulated(cpu: str, *command: str, share: Path) -> subprocess.CompletedProcess:
    """`command` on an emulated `cpu`, at the lowest priority; stopped if the session ends first (a
    run stopped early, by -x or Ctrl+C, does not wait an hour for emulation nobody will read).

    Its own process group (to stop it whole), but the session's own session: Linux schedules each
    session as one group (sched_autogroup), and nice counts only inside a group. In a new session,
    two emulated CPUs at nice 19 took two thirds of the cores from the x86 tests, and a server's two
    OpenMP threads, each waiting at every barrier for the other to be scheduled, decoded 25x slower
    (a test's 400 tokens timed out in CI)."""
    with _lock:
        if _ended:
            raise RuntimeError("the test session ended before this emulated run started")
        run = subprocess.Popen(["nice", "-n", "19", SCRIPT, cpu, *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, process_group=0,
                               env={**os.environ, "EDGEINFER_AARCH64_SHARE": str(share)})
        _running.add(run)
    with run:
        try:
            out, err = run.communicate(timeout=3000)
        except subprocess.TimeoutExpired:
            _stop(run)
            raise
        finally:
            with _lock:
                _running.discard(run)
    return subprocess.CompletedProcess(run.args, run.returncode, out, err)


def _stop(run: subprocess.Popen) -> None:
    try:
        os.killpg(run.pid, signal.SIGKILL)  # its own group: the script execs its way to qemu
    except ProcessLookupError:
        pass


def kernel_tests(cpu: str, files: list[str], share: Path) -> subprocess.CompletedProcess:
    return emulated(cpu, "python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5",
                    "-m", "not model and not oracle and not real_model", *files, share=share)


def probe_on(cpu: str, share: Path, model: Path) -> subprocess.CompletedProcess:
    """tests/aarch64_probe.py into share/CPU.json."""
    return emulated(cpu, "python3", "tests/aarch64_probe.py", str(share / f"{cpu}.json"),
                    *([str(model)] if CPUS[cpu][2] else []), share=share)


# The work goes in processes two at a time (one per core), longest first, and a CPU's kernel tests in
# two: test_gguf_quants.py (every GGUF layout's kernels compile: about half a CPU's kernel tests)
# beside the rest, whose process then runs the probe on the kernels they compiled (a CPU's processes
# share its kernel cache). Measured on emulated Neoverse N2 / Cortex-A72, cold (bench/RESULTS.md,
# twentieth session): test_gguf_quants.py 1080 / 1260 s, the other five files 780 / 900 s, a probe
# 300-600 s.
SPLIT = "tests/test_gguf_quants.py"


def rest_then_probe(cpu: str, files: list[str], share: Path, model: Path):
    return (kernel_tests(cpu, files, share) if files else None), probe_on(cpu, share, model)


@pytest.fixture(scope="session")
def arm_shared(tmp_path_factory) -> Path:
    """A directory both sides see (scripts/aarch64.sh mounts it at the same path)."""
    return tmp_path_factory.mktemp("aarch64")


@pytest.fixture(scope="session")
def arm_tiny_q4(arm_shared, tiny_hf) -> Path:
    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    convert(open_model(str(tiny_hf)), str(arm_shared / "tiny-q4.safetensors"), bits=4)
    return arm_shared / "tiny-q4.safetensors"


@pytest.fixture(scope="session")
def arm_runs(arm_shared, arm_tiny_q4) -> dict[str, tuple[list[Future], Future]]:
    """Per CPU: (its kernel test processes, the process running its probe), running."""
    global _ended
    with ThreadPoolExecutor(max_workers=1) as setting_up, ThreadPoolExecutor(max_workers=2) as pool:
        # the userland and wheels, once, before runs side by side
        setup = setting_up.submit(emulated, "cortex-a72", "true", share=arm_shared)

        def once_set_up(run, *args):
            done = setup.result()
            if done.returncode:
                raise RuntimeError(f"scripts/aarch64.sh could not set up: {done.stderr[-3000:]}")
            return run(*args)

        split = {cpu: pool.submit(once_set_up, kernel_tests, cpu, [SPLIT], arm_shared)
                 for cpu, (_, tests, _) in CPUS.items() if SPLIT in tests}
        rest = {cpu: pool.submit(once_set_up, rest_then_probe, cpu, [f for f in tests if f != SPLIT], arm_shared,
                                 arm_tiny_q4) for cpu, (_, tests, _) in CPUS.items()}
        try:
            yield {cpu: ([*([split[cpu]] if cpu in split else []), rest[cpu]], rest[cpu]) for cpu in CPUS}
        finally:  # all done when the aarch64 tests ran; else nothing waits for these
            pool.shutdown(wait=False, cancel_futures=True)
            with _lock:
                _ended = True
                for run in _running:
                    _stop(run)
