"""A warm start: the kernels come from Numba's cache without its compiler's registries; a second run of
the same file and options loads them before the weights, from the list the first left; LLVM's pages
are let go once the kernels are loaded."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from numba import njit

from conftest import edgeinfer_cli, mappings
from edgeinfer import jit_cache
from edgeinfer.kernels import ops
from edgeinfer.storage.memory_plan import FIRST_CALLS_ALLOWANCE, KERNELS_ALLOWANCE


def plan_runtime(stderr: str) -> int:
    found = re.search(r"runtime (\d+) MB", stderr)
    assert found, stderr
    return int(found.group(1))


def test_a_second_start_loads_its_kernels_before_the_weights(tiny_single, tmp_path):
    model = tmp_path / "model.safetensors"  # a file no other test ran: no list of its kernels yet
    shutil.copy(tiny_single, model)
    # The first run loads its kernels after the weights and keeps their list, unless it compiled any
    # (a cold cache): then the second keeps it. The third loads them before the weights.
    runs = [edgeinfer_cli("run", str(model), "-p", "hello", "-n", "8", "--temp", "0", "-v") for _ in range(3)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout and runs[0].stdout.strip()
    # The third plan counts its kernels as in the process already (not the allowance for loading
    # them) and the process without LLVM's pages: at least the allowances' difference less.
    after_weights, before_weights = plan_runtime(runs[0].stderr), plan_runtime(runs[2].stderr)
    least = (KERNELS_ALLOWANCE - FIRST_CALLS_ALLOWANCE) >> 20
    assert before_weights <= after_weights - least, (after_weights, before_weights)


def test_a_list_that_names_what_the_sources_lack_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    key = "a model file and its options"
    assert not jit_cache.preload(key)  # no list
    listed = jit_cache._preload_file(key)
    listed.parent.mkdir(parents=True)
    listed.write_bytes(pickle.dumps([("edgeinfer.kernels.ops", "no_such_kernel", ())]))
    assert not jit_cache.preload(key)
    listed.write_bytes(b"not a list")
    assert not jit_cache.preload(key)


def llvm_resident_kb() -> int:
    """Resident KB of LLVM's library in the mappings this process never wrote (its code and constants,
    not the relocated ones)."""
    return sum(int(stats["Rss:"]) for path, perms, stats in mappings()
               if path.endswith("libllvmlite.so") and "w" not in perms and stats["Anonymous:"] == "0")


def test_llvm_pages_are_let_go_and_a_compile_after_still_works():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ops.rmsnorm_into(x[0], np.ones(4, np.float32), 1e-6, np.empty(4, np.float32))  # LLVM has run
    assert llvm_resident_kb() > 4096
    jit_cache.release_compiler_pages()
    assert llvm_resident_kb() < 512

    @njit(cache=False)
    def scaled_sum(a, k):
        return (a * k).sum()

    assert scaled_sum(x, np.float32(2)) == np.float32(132)  # LLVM maps its pages back and compiles
    assert llvm_resident_kb() > 4096


CACHED_MODULE = '''
import numpy as np
from numba import njit

@njit(cache=True)
def total(a):
    return a.sum() * 2.0
'''

LOAD_THEN_LINK = '''
import sys
import numpy as np
from llvmlite import binding
from numba import njit
import edgeinfer.kernels  # Numba's cache as edgeinfer loads it
import cached_module

assert cached_module.total(np.arange(4.0)) == 12.0
library = cached_module.total.overloads[cached_module.total.signatures[0]].library
loaded = cached_module.total.stats.cache_hits.total() > 0
from numba.core.runtime import rtsys
from edgeinfer.jit_cache import library_bitcode
for lib in (library, rtsys.library):  # (Numba's runtime came from the cache too)
    assert "_edgeinfer_bitcode" not in lib.__dict__  # no bitcode held in memory
    assert (library_bitcode(lib) is not None) == loaded and (lib._shared_module is None or not loaded)
if loaded:  # its symbols came from the machine code; its bitcode, read again from the cache, is not parsed yet
    module = binding.parse_bitcode(library_bitcode(library))
    numba_s = {v.name for vs in (module.functions, module.global_variables) for v in vs if not v.is_declaration}
    assert numba_s and numba_s <= library.codegen._engine._defined_symbols, numba_s

@njit
def calls_it(a):  # a compile that links the loaded library in
    return cached_module.total(a) + 1.0

assert calls_it(np.arange(4.0)) == 13.0
assert all(library_bitcode(lib) is None and lib._shared_module is not None for lib in (library, rtsys.library))
print("loaded" if loaded else "compiled")
'''


def test_a_cached_kernel_and_numba_s_runtime_load_without_bitcode_and_link_into_a_compile(tmp_path):
    (tmp_path / "cached_module.py").write_text(CACHED_MODULE)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", LOAD_THEN_LINK], env=env, capture_output=True, text=True)
            for _ in range(2)]
    assert [r.stdout.strip() for r in runs] == ["compiled", "loaded"], [r.stderr[-2000:] for r in runs]


def test_the_symbols_an_elf_object_defines():
    @njit(cache=False)
    def halves(a):
        out = np.empty_like(a)
        for i in range(a.size):
            out[i] = a[i] / 2
        return out

    assert halves(np.arange(4.0))[3] == 1.5
    library = halves.overloads[halves.signatures[0]].library
    module = library._final_module  # compiled here: what Numba's cache would keep as bitcode
    names = {v.name for vs in (module.functions, module.global_variables) for v in vs if not v.is_declaration}
    assert len(names) > 3
    assert jit_cache.elf_defined_symbols(library.codegen._tm.emit_object(module)) == names
    assert jit_cache.elf_defined_symbols(b"\xcf\xfa\xed\xfe" + bytes(60)) is None  # Mach-O: Numba's own way


FIXED_POINT_GEMM = '''
import sys
import numpy as np
from edgeinfer.kernels import q4
from edgeinfer.kernels.activations import Q8Activations
from edgeinfer.kernels.simd import FIXED_SCALE
from edgeinfer.storage.quantize import quantize_q4_1

rng = np.random.default_rng(0)
x = Q8Activations.empty(128, 37)  # filled here, not by the quantising kernel: the GEMM is all a run compiles
x.flat[:] = rng.integers(-127, 128, x.flat.shape)
x.scales[:] = rng.random(x.scales.shape) / 100
groups = x.flat.reshape(37, -1, 2, 16).astype(np.int32)
x.sums[:], x.starts[:] = x.scales * groups.sum(axis=(2, 3)), -8 * groups.sum(axis=(2, 3))
x.halves[:] = (np.repeat(x.scales, 2, axis=1) * groups.sum(axis=3).reshape(37, -1))
matrices = {"q4_0": q4.Q4Matrix.from_rows(rng.integers(0, 256, (64, 64), dtype=np.uint8),  # fp16 scales, as Q4_1's
                                          (rng.random((64, 4)) / 50).astype(np.float16).astype(np.float32)),
            "q4": quantize_q4_1(rng.standard_normal((64, 128)).astype(np.float32))}
for name in sys.argv[1:]:  # each one's sums into fixed point, against numpy over the same integers
    m = matrices[name]
    sums = m.matmul(x, np.empty((37, 64), np.int64)) * FIXED_SCALE
    expected = (x.flat * np.repeat(x.scales, 32, axis=-1)) @ m.dequantize().T
    assert np.abs(sums - expected).max() < 1e-4 * np.abs(expected).max(), (name, np.abs(sums - expected).max())
print(q4._gemm.stats.cache_hits.total(), q4._gemm.stats.cache_misses.total())
'''


def function_symbols(cache: Path, qualname: str) -> list[set[str]]:
    """Per cached specialisation of `qualname` (module.function) under `cache`: the functions its
    machine code defines (not its constants or Numba's runtime)."""
    found = []
    for index in cache.rglob(f"{qualname}-*.nbi"):
        for data in index.parent.glob(index.name.removesuffix(".nbi") + ".*.nbc"):
            state, stack = [pickle.loads(data.read_bytes())], []
            while state:
                o = state.pop()
                if isinstance(o, bytes) and o[:4] == b"\x7fELF":
                    stack.append(o)
                elif isinstance(o, (tuple, list)):
                    state.extend(o)
            found.append({s for code in stack for s in jit_cache.elf_defined_symbols(code) if s.startswith("_ZN")})
    return found


def test_kernels_compiled_in_two_processes_name_no_function_alike(tmp_path):
    """A Q4_0 and a Q4_1 GEMM into fixed point, compiled in two processes: the functions each carries
    (its kind's loop among them, a closure of one factory for both) have names of their own
    (jit_cache.unique_function_ids), and a process loading both gets each one's own sums."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = lambda *kinds: subprocess.run([sys.executable, "-c", FIXED_POINT_GEMM, *kinds], env=env,  # noqa: E731
                                        capture_output=True, text=True)
    for kind in ("q4_0", "q4"):
        r = run(kind)
        assert r.returncode == 0 and r.stdout.split() == ["0", "1"], r.stderr[-2000:]  # compiled
    first, second = function_symbols(tmp_path, "q4._gemm")
    assert first and second and not first & second
    r = run("q4_0", "q4")
    assert r.returncode == 0 and r.stdout.split() == ["2", "0"], r.stderr[-2000:]  # both loaded
