"""The kernels on aarch64, under qemu user-mode emulation: scripts/aarch64.sh sets everything up from
nothing (root on Debian: qemu-user-static, an arm64 userland, aarch64 wheels; a few minutes once).
One emulated CPU per ARM path: Neoverse N2 (usdot, i8mm), Neoverse N1 (sdot, dotprod) and Cortex-A72
(ARMv8.0: plain NEON), and an unnamed one. On each, a cluster shard's fixed-point partials are x86's
bit for bit; on N2 and A72 every kernel test passes against the same numpy references as on x86
and a 4-bit model's greedy tokens equal x86's; on N1 the tests of the byte dot product's two forms
(nibbles and bytes) pass. Two CPUs are emulated at a time (one per core), beside the x86 tests
(tests/arm_runs.py: what runs where, and why beside). Deselect with -m "not aarch64"."""

from __future__ import annotations

import json
import re

import pytest

from aarch64_probe import probe
from arm_runs import CPUS

pytestmark = pytest.mark.aarch64

def probed(arm_runs, arm_shared, cpu: str) -> dict:
    found = arm_runs[cpu][1].result()[1]
    assert found.returncode == 0, found.stdout[-2000:] + found.stderr[-4000:]
    result = json.loads((arm_shared / f"{cpu}.json").read_text())
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
def test_shard_partial_sums_equal_x86_bit_for_bit(cpu, arm_runs, arm_shared):
    """What a cluster node adds: the fixed-point partials of a column shard, for q4 (with and without
    minima, and IQ4_NL's lookup), q6 (Q6_K) and q8 (Q8_0): an ARM worker and an x86 master agree
    exactly."""
    assert probed(arm_runs, arm_shared, cpu)["partials"] == probe()["partials"]


@pytest.mark.parametrize("cpu", [cpu for cpu, (_, _, with_model) in CPUS.items() if with_model])
def test_greedy_tokens_equal_x86(cpu, arm_runs, arm_shared, arm_tiny_q4):
    on_x86, on_arm = probe(str(arm_tiny_q4)), probed(arm_runs, arm_shared, cpu)
    assert on_arm["tokens"] == on_x86["tokens"]
    worst = max(abs(a - b) for a, b in zip(on_arm["top_logits"], on_x86["top_logits"]))
    print(f"{cpu}: {len(on_arm['tokens'])} greedy tokens equal x86's; top logits within {worst:.2e}")
