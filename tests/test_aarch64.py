"""The kernels on aarch64, under qemu user-mode emulation: scripts/aarch64.sh sets everything up from
nothing (root on Debian: qemu-user-static, an arm64 userland, aarch64 wheels; a few minutes once).
Three emulated CPUs, one per ARM path: Neoverse N2 (usdot, i8mm), Neoverse N1 (sdot, dotprod) and
Cortex-A72 (ARMv8.0: plain NEON). On each, the kernel tests pass against the same numpy references
as on x86, a 4-bit model's greedy tokens equal x86's, and a cluster shard's fixed-point partials
are x86's bit for bit. Deselect with -m "not aarch64"."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from aarch64_probe import probe

pytestmark = pytest.mark.aarch64

ROOT = Path(__file__).resolve().parent.parent
CPUS = {"neoverse-n2": "neon-i8mm", "neoverse-n1": "neon-dotprod", "cortex-a72": "neon"}
KERNEL_TESTS = ["tests/test_ops.py", "tests/test_q4.py", "tests/test_q8.py", "tests/test_lut_attention.py",
                "tests/test_gguf_quants.py", "tests/test_quantize.py"]


def emulated(cpu: str, *command: str, share: Path | None = None) -> subprocess.CompletedProcess:
    env = {"EDGEINFER_AARCH64_SHARE": str(share)} if share else {}
    return subprocess.run([str(ROOT / "scripts" / "aarch64.sh"), cpu, *command], capture_output=True, text=True,
                          timeout=2400, env={**os.environ, **env})


@pytest.mark.parametrize("cpu", CPUS)
def test_kernel_tests_pass_on_aarch64(cpu):
    r = emulated(cpu, "python3", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "-m", "not model and not oracle and not real_model", *KERNEL_TESTS)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    print(f"{cpu}: {summary}")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert re.fullmatch(r"\d+ passed, \d+ deselected in .*", summary), summary


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


def probe_on(cpu: str, shared: Path, *model: Path) -> dict:
    out = shared / f"{cpu}.json"
    r = emulated(cpu, "python3", "tests/aarch64_probe.py", str(out), *map(str, model), share=shared)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    found = json.loads(out.read_text())
    assert found["kernel_path"] == CPUS[cpu]
    return found


@pytest.mark.parametrize("cpu", CPUS)
def test_shard_partial_sums_equal_x86_bit_for_bit(cpu, shared):
    """What a cluster node adds: the fixed-point partials of a column shard, for q4 (with and without
    minima, and IQ4_NL's lookup), q8 (Q8_0, Q6_K): an ARM worker and an x86 master agree exactly."""
    assert probe_on(cpu, shared)["partials"] == probe()["partials"]


@pytest.mark.parametrize("cpu", ["neoverse-n2", "cortex-a72"])  # N1 differs from N2 only in the byte dot product
def test_greedy_tokens_equal_x86(cpu, shared, tiny_q4):
    on_x86, on_arm = probe(str(tiny_q4)), probe_on(cpu, shared, tiny_q4)
    assert on_arm["tokens"] == on_x86["tokens"]
    worst = max(abs(a - b) for a, b in zip(on_arm["top_logits"], on_x86["top_logits"]))
    print(f"{cpu}: {len(on_arm['tokens'])} greedy tokens equal x86's; top logits within {worst:.2e}")
