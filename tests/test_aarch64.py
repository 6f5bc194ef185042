"""The kernels on aarch64, under qemu user-mode emulation: scripts/aarch64.sh sets everything up from
nothing (root on Debian: qemu-user-static, an arm64 userland, aarch64 wheels; a few minutes once).
One emulated CPU per ARM path: Neoverse N2 (usdot, i8mm), Neoverse N1 (sdot, dotprod) and Cortex-A72
(ARMv8.0: plain NEON), and an unnamed one. On each, a cluster shard's fixed-point partials are x86's
bit for bit; on N2 and A72 every kernel test passes against the same numpy references as on x86
and a 4-bit model's greedy tokens equal x86's; on N1 the tests of the byte dot product's two forms
(nibbles and bytes) pass. Two CPUs are emulated at a time (one per core). Deselect with
-m "not aarch64"."""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from aarch64_probe import probe

pytestmark = pytest.mark.aarch64

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


def emulated(cpu: str, *command: str, share: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, cpu, *command], capture_output=True, text=True, timeout=3000,
                          env={**os.environ, "EDGEINFER_AARCH64_SHARE": str(share)})


def kernel_tests(cpu: str, files: list[str], share: Path) -> subprocess.CompletedProcess:
    return emulated(cpu, "python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5",
                    "-m", "not model and not oracle and not real_model", *files, share=share)


def probe_on(cpu: str, share: Path, model: Path) -> subprocess.CompletedProcess:
    """tests/aarch64_probe.py into share/CPU.json."""
    return emulated(cpu, "python3", "tests/aarch64_probe.py", str(share / f"{cpu}.json"),
                    *([str(model)] if CPUS[cpu][2] else []), share=share)


# Emulation is slow (a cold run is most of the suite's time), so the work goes in processes two at
# a time (one per core), longest first, and a CPU's kernel tests in two: test_gguf_quants.py (every
# GGUF layout's kernels compile: about half a CPU's kernel tests) beside the rest, whose process then
# runs the probe on the kernels they compiled (a CPU's processes share its kernel cache). Measured
# on emulated Neoverse N2 / Cortex-A72, cold (bench/RESULTS.md, twentieth session): test_gguf_quants.py
# 1080 / 1260 s, the other five files 780 / 900 s, a probe 300-600 s.
SPLIT = "tests/test_gguf_quants.py"


def rest_then_probe(cpu: str, files: list[str], share: Path, model: Path):
    return (kernel_tests(cpu, files, share) if files else None), probe_on(cpu, share, model)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A directory both sides see (scripts/aarch64.sh mounts it at the same path)."""
    return tmp_path_factory.mktemp("aarch64")


@pytest.fixture(scope="module")
def tiny_q4(shared, tiny_hf) -> Path:
    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    convert(open_model(str(tiny_hf)), str(shared / "tiny-q4.safetensors"), bits=4)
    return shared / "tiny-q4.safetensors"


@pytest.fixture(scope="module")
def arm_runs(shared, tiny_q4) -> dict[str, tuple[list[Future], Future]]:
    """Per CPU: (its kernel test processes, the process running its probe)."""
    setup = emulated("cortex-a72", "true", share=shared)  # the userland and wheels, once, before runs side by side
    assert setup.returncode == 0, setup.stderr[-3000:]
    with ThreadPoolExecutor(max_workers=2) as pool:
        split = {cpu: pool.submit(kernel_tests, cpu, [SPLIT], shared) for cpu, (_, tests, _) in CPUS.items() if SPLIT in tests}
        rest = {cpu: pool.submit(rest_then_probe, cpu, [f for f in tests if f != SPLIT], shared, tiny_q4)
                for cpu, (_, tests, _) in CPUS.items()}
        yield {cpu: ([*([split[cpu]] if cpu in split else []), rest[cpu]], rest[cpu]) for cpu in CPUS}


def probed(arm_runs, shared, cpu: str) -> dict:
    found = arm_runs[cpu][1].result()[1]
    assert found.returncode == 0, found.stdout[-2000:] + found.stderr[-4000:]
    result = json.loads((shared / f"{cpu}.json").read_text())
    assert result["kernel_path"] == CPUS[cpu][0]
    return result


@pytest.mark.parametrize("cpu", [cpu for cpu, (_, tests, _) in CPUS.items() if tests])
def test_kernel_tests_pass_on_aarch64(cpu, arm_runs):
    for run in arm_runs[cpu][0]:
        result = run.result()
        kernels = result[0] if isinstance(result, tuple) else result
        summary = kernels.stdout.strip().splitlines()[-1] if kernels.stdout.strip() else ""
        print(f"{cpu}: {summary}")
        assert kernels.returncode == 0, kernels.stdout[-4000:] + kernels.stderr[-2000:]
        assert re.fullmatch(r"=*\s*\d+ passed(, \d+ deselected)? in [^=]*=*", summary), summary


@pytest.mark.parametrize("cpu", CPUS)
def test_shard_partial_sums_equal_x86_bit_for_bit(cpu, arm_runs, shared):
    """What a cluster node adds: the fixed-point partials of a column shard, for q4 (with and without
    minima, and IQ4_NL's lookup), q6 (Q6_K) and q8 (Q8_0): an ARM worker and an x86 master agree
    exactly."""
    assert probed(arm_runs, shared, cpu)["partials"] == probe()["partials"]


@pytest.mark.parametrize("cpu", [cpu for cpu, (_, _, with_model) in CPUS.items() if with_model])
def test_greedy_tokens_equal_x86(cpu, arm_runs, shared, tiny_q4):
    on_x86, on_arm = probe(str(tiny_q4)), probed(arm_runs, shared, cpu)
    assert on_arm["tokens"] == on_x86["tokens"]
    worst = max(abs(a - b) for a, b in zip(on_arm["top_logits"], on_x86["top_logits"]))
    print(f"{cpu}: {len(on_arm['tokens'])} greedy tokens equal x86's; top logits within {worst:.2e}")
