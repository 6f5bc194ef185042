"""Where Numba keeps the compiled kernels: one directory per version of the kernels' sources.

Numba checks a cached function against its own file only; a kernel inlined from another file
(decode_layer.py calls q4.py) would keep running the old code after that file changed, and can crash the
process. Keying the cache directory on a hash of every kernel source makes any change compile anew.
Imported by edgeinfer/__init__.py, before Numba reads its configuration.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import itertools
import mmap
import os
import pickle
import struct
import sys
import threading
from pathlib import Path

from .paths import home

KERNELS = Path(__file__).parent / "kernels"
# How compiled functions are named (unique_function_ids): a cache written under another scheme may
# hold names that collide, and is not read.
NAMING = b"function ids unique across processes"


def kernel_cache_dir() -> Path:
    digest = hashlib.sha256(NAMING)
    for path in sorted(KERNELS.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return home() / "kernels" / digest.hexdigest()[:16]


def configure() -> None:
    """Point Numba at this version's cache, unless the user chose a directory."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return
    os.environ["NUMBA_CACHE_DIR"] = str(kernel_cache_dir())
    if "numba" in sys.modules:  # imported before us: make it read the variable again
        from numba.core import config

        config.reload_config()


def first_run() -> bool:
    """Whether nothing is compiled yet: the kernels will take a while, once."""
    folder = _cache_folder()
    return not folder.is_dir() or not any(folder.rglob("*.nbi"))


def import_numba_without_blas_probe() -> None:
    """Import Numba's numpy support with its BLAS probe skipped. numba.np.arraymath imports
    scipy.linalg at import, only to call BLAS from np.dot/np.vdot on float vectors; no kernel here
    calls those, and the probe cost 0.25 s and 11 MB of every start (measured). np.dot in a kernel
    would still work, through Numba's own loop. Scoped to that one import: scipy stays importable."""
    if "numba.np.arraymath" in sys.modules:
        return
    probe = "scipy.linalg.cython_blas"
    blocked = probe not in sys.modules
    if blocked:
        sys.modules[probe] = None  # an import of it raises ImportError: "no BLAS"
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if blocked:
            del sys.modules[probe]


def unique_function_ids() -> None:
    """Number the functions Numba compiles from a random start in each process, not from 1.

    A compiled function's symbol is its qualified name, its argument types and that number, and a
    cached kernel carries the functions it calls, compiled in whatever process compiled it. Two
    closures from one factory (q4.py's per-kind loops, simd.py's per-slot helpers) share a qualified
    name and can share argument types; numbered from 1 in two processes they could get one symbol
    for two bodies, and a process that loaded both kernels ran the first one's body in the second:
    a Q4_1 GEMM into fixed point loaded after a Q4_0 one computed with Q4_0's loop (found by a test
    order; reproduced by numbering two compiles alike). From a random 40-bit start, two processes'
    numbers do not meet (tests/test_start.py). Idempotent."""
    from numba.core import bytecode

    if not isinstance(bytecode.FunctionIdentity._unique_ids, _RandomStart):
        bytecode.FunctionIdentity._unique_ids = _RandomStart()


class _RandomStart:
    """Ids counted up from a random 40-bit start."""

    def __init__(self):
        self._ids = itertools.count(int.from_bytes(os.urandom(5), "little") << 16)

    def __next__(self) -> int:
        return next(self._ids)


def load_cached_kernels_without_registries() -> None:
    """Load a cached kernel with only what running it needs, and note it. The one place that patches
    Numba's cache. Idempotent.

    - No compiler registries: Numba's cache refreshes the target context before every load, which
      imports some sixty modules of typing and lowering rules (numpy, random, typed containers, ...)
      and installs them, 0.1-0.35 s of a warm start (measured). A cached kernel is machine code:
      loading it needs Numba's runtime (NRT), which is initialised here, and not the rules, which
      only a compile reads. Numba's compiler refreshes the contexts itself before a compile.
    - No LLVM module parsed, no bitcode held: a cached library holds its machine code and its
      functions as bitcode, and Numba parses that bitcode at load (a third of a warm load,
      measured) only to list the symbols the library defines and to have it ready should a later
      compile link it in. The symbols are read from the machine code's ELF symbol table instead
      (the same names, checked on every kernel); the bitcode is read again from the cache file
      and parsed when a compile first links the library. Held, it was 2.4 MiB of a SmolLM2 Q4_1
      run and 4.5 of a Q3_K_M one, with two decode layers (measured).
    - Numba's runtime (NRT) from a cache too: Numba compiles its LLVM functions at every start
      (20-30 ms, measured); they are kept beside the kernels, as a kernel is (`_cached_nrt`).
    Each kernel loaded, or missed and so compiled, is noted for `save_preload`."""
    from numba.core import caching, codegen
    from numba.core.runtime import nrtdynmod, rtsys

    if getattr(caching.Cache.load_overload, "edgeinfer", False):
        return

    load_data = caching.IndexDataCacheFile._load_data

    def _load_data(self, name):
        _reading.source = (self._data_path(name), 0)  # the library's data: the first of the file's fields
        return load_data(self, name)

    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)
        try:
            with self._guard_against_spurious_io_errors():
                data = self._load_overload(sig, target_context)
        finally:
            _reading.source = None
        _loaded.append((self._py_func.__module__, self._py_func.__qualname__, sig, data is not None))
        return data

    library = codegen.CPUCodeLibrary
    unserialize = library._unserialize.__func__
    module_for_linking = library._get_module_for_linking

    def _unserialize(cls, target_codegen, state):
        name, kind, data = state
        symbols = elf_defined_symbols(data[0]) if kind == "object" else None
        source, _reading.source = getattr(_reading, "source", None), None
        if symbols is None:  # not an ELF object (or bitcode): as Numba does it
            return unserialize(cls, target_codegen, state)
        self = target_codegen.create_library(name)
        self.enable_object_caching()
        self._set_compiled_object(data[0])
        if source is None:  # (not read from a file: held, as before)
            self._edgeinfer_bitcode = data[1]
        else:
            self._edgeinfer_bitcode_source = source
        self._finalize_final_module()
        target_codegen._engine._defined_symbols |= symbols
        return self

    def _get_module_for_linking(self):
        bitcode = library_bitcode(self)
        self.__dict__.pop("_edgeinfer_bitcode", None)
        self.__dict__.pop("_edgeinfer_bitcode_source", None)
        if bitcode is not None:
            from llvmlite import binding

            self._shared_module = binding.parse_bitcode(bitcode)
        return module_for_linking(self)

    load_overload.edgeinfer = True
    caching.Cache.load_overload = load_overload
    caching.IndexDataCacheFile._load_data = _load_data
    nrtdynmod.compile_nrt_functions = _cached_nrt(nrtdynmod.create_nrt_module)
    library._unserialize = classmethod(_unserialize)
    library._get_module_for_linking = _get_module_for_linking


def _cached_nrt(create_nrt_module):
    """Numba's `compile_nrt_functions`, its library kept in the kernels' cache directory under the
    Numba and llvmlite versions and the machine code's target (Numba's own key for a cached kernel)."""

    def compile_nrt_functions(ctx):
        import llvmlite
        import numba

        target_codegen = ctx.codegen()
        key = repr((numba.__version__, llvmlite.__version__, target_codegen.magic_tuple()))
        path = _cache_folder() / "nrt" / hashlib.sha256(key.encode()).hexdigest()[:16]
        try:
            data = pickle.loads(path.read_bytes())
            _reading.source = (path, None)  # the file is the library's data
            try:
                return target_codegen.unserialize_library(data)
            finally:
                _reading.source = None
        except (OSError, EOFError, pickle.UnpicklingError, ValueError):
            pass
        module, library = create_nrt_module(ctx)
        library.enable_object_caching()
        library.add_ir_module(module)
        library.finalize()
        _write_atomically(path, pickle.dumps(library.serialize_using_object_code()))
        return library

    return compile_nrt_functions


def elf_defined_symbols(code: bytes) -> set[str] | None:
    """The names an ELF64 little-endian object defines (functions, data and constants, local ones
    too; not sections or files), as Numba lists them from the library's module. None for any other
    object format."""
    if code[:6] != b"\x7fELF\x02\x01":
        return None
    section_table, = struct.unpack_from("<Q", code, 0x28)
    entry_size, count = struct.unpack_from("<HH", code, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", code, section_table + i * entry_size) for i in range(count)]
    names = set()
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for name, info, _, section, _, _ in struct.iter_unpack("<IBBHQQ", code[offset:offset + size]):
            if name and section != 0 and info & 15 not in (3, 4):  # named, defined, not STT_SECTION/STT_FILE
                start = strings + name
                names.add(code[start:code.index(b"\0", start)].decode())
    return names


_loaded: list[tuple[str, str, object, bool]] = []  # (module, qualified name, signature, found in the cache)
_reading = threading.local()  # .source: the cache file a library is being loaded from, as library_bitcode reads it


def library_bitcode(library) -> bytes | None:
    """A library loaded from the cache: its functions as bitcode, read again from its file (the
    data Numba pickled: the library's (name, kind, (machine code, bitcode)), or a tuple whose first
    field that is). None for any other library. A compile that links the library in needs it; a
    cache file gone by then fails that compile with its name."""
    held = library.__dict__.get("_edgeinfer_bitcode")
    source = library.__dict__.get("_edgeinfer_bitcode_source")
    if held is not None or source is None:
        return held
    path, field = source
    try:
        data = pickle.loads(Path(path).read_bytes())
        return (data if field is None else data[field])[2][1]
    except (OSError, EOFError, pickle.UnpicklingError, IndexError, TypeError) as exc:
        raise RuntimeError(f"{path}: a cached kernel's bitcode, which a compile that calls it needs, cannot be "
                           f"read ({exc}); remove {_cache_folder()} and start again") from None


def _cache_folder() -> Path:
    return Path(os.environ.get("NUMBA_CACHE_DIR") or kernel_cache_dir())


def _preload_file(key: str) -> Path:
    return _cache_folder() / "preload" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _write_atomically(path: Path, data: bytes) -> None:
    """`data` as the file at `path`, whole or not at all; nothing when the cache is read-only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError:
        pass


def preload(key: str) -> bool:
    """Load the kernels that the last run under `key` (a model file and the options that choose its
    kernels) loaded, before its weights are read: then LLVM's pages that loading touches can be
    given back (`release_compiler_pages`) before the weights come, and the process never holds both.
    The list lives beside the compiled kernels, so it names only functions of these sources. False
    when there is no list: the warm-up over the loaded model loads them, as before."""
    try:
        entries = pickle.loads(_preload_file(key).read_bytes())
    except (OSError, EOFError, pickle.UnpicklingError):
        return False
    if not entries:
        return False
    try:
        for module, qualname, sig in entries:
            kernel = importlib.import_module(module)
            for name in qualname.split("."):
                kernel = getattr(kernel, name)
            kernel.compile(sig)  # from the cache: the list was written by a run that loaded it
    except (ImportError, AttributeError):  # a list older than the sources (NUMBA_CACHE_DIR kept)
        return False
    return True


def save_preload(key: str) -> None:
    """Keep the kernels this process loaded from the cache, in order, as `key`'s list, if they are
    new. Not when any kernel was compiled: a compile also compiles the kernels it calls, and the next
    run, which loads only the first, would not find its whole list. A function made inside another
    (a qualified name with <locals>) cannot be found again by name: such a list is not kept either,
    as the memory plan counts a preloaded run's kernels as loaded."""
    if not _loaded or not all(found and "<locals>" not in name for _, name, _, found in _loaded):
        return
    entries = [(module, name, sig) for module, name, sig, _ in _loaded]
    path = _preload_file(key)
    data = pickle.dumps(entries)
    try:
        if path.exists() and path.read_bytes() == data:
            return
    except OSError:
        pass
    _write_atomically(path, data)  # in a read-only cache, every start loads the kernels after the weights


def release_compiler_pages() -> None:
    """Unmap the pages of LLVM's library that loading or compiling kernels touched (50-65 MB on a warm
    start, measured): the kernels run as machine code of their own and do not use LLVM until the
    next compile, which maps the pages back from the page cache. Only mappings the process never
    wrote (code, constants) are let go: MADV_DONTNEED on them drops the process's mapping and keeps
    the file's pages cached, so the next start does not read them again (MADV_PAGEOUT would evict
    them). Linux; elsewhere, or if refused, nothing happens."""
    try:
        with open("/proc/self/smaps") as f:
            smaps = f.read().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    span = None
    for line in smaps:
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header: range, permissions, ..., path
            span = fields if fields[-1].endswith("libllvmlite.so") and "w" not in fields[1] else None
        elif span is not None and fields[0] == "Anonymous:" and fields[1] == "0":  # no page copied on write
            start, end = (int(x, 16) for x in span[0].split("-"))
            madvise(start, end - start, mmap.MADV_DONTNEED)
