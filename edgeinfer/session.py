"""Opening a model for a user: a model name and the user's options become an engine with its kernels
ready, on this machine alone or as the master of a home cluster. The CLI, the chat app and the
server all come here; none of them imports another."""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from typing import Callable

from .engine import Engine, default_context
from .errors import EdgeInferError
from .jit_cache import first_run, preload, release_compiler_pages, save_preload
from .kernels.simd import has_kernels
from .kv_cache import fitting_memory_plan, model_memory_plan
from .model import Model
from .progress import StageProgress
from .run_path import choose_path
from .storage import open_model
from .storage.fetch import ProgressFn, resolve_model
from .tokenizer import Tokenizer

Report = Callable[[str], None]
COMPILING = "compiling kernels, first run only (about 15 s)"
NO_KERNELS = ("this CPU has none of the 4/8-bit kernels' instructions (x86: AVX2 with FMA and F16C, or AVX-512 VNNI; "
              "aarch64: any); running the float32 path")


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class ClusterOptions:
    """Be the master of a cluster: listen for `edgeinfer worker`s and split every layer with them."""

    listen: str  # [HOST:]PORT
    token: str | None = None  # the join token; None: a random one
    workers: int = 0  # wait for this many before starting
    wait: float = 60.0  # seconds to wait for them
    timeout: float = 30.0  # a worker silent this long in a step is dropped
    sync: str = "fp32"  # all-reduce payload type: fp32 or fp16


@dataclass
class SessionOptions:
    model: str | None = None  # a path or a catalog name; None: the catalog's default model
    context: int | None = None  # None: the model's, at most engine.DEFAULT_CONTEXT
    float32: bool = False  # the exact float32 path (--exact), not 4/8-bit kernels
    load_bits: int = 8  # what a float model (F16/BF16/F32) is quantized to at load: 8, or 4 (--bits)
    mem_limit: int | None = None  # bytes
    attention: str = "exact"  # or "lut"
    verbose: bool = False  # report the memory plan even when it is plainly resident
    cluster: ClusterOptions | None = None
    sequences: int = 1  # KV caches the memory plan counts (a server's parallel slots)
    cache_type: str = "f16"  # the 4/8-bit path's KV cache: f16, q8_0 or f32 (--exact keeps float32)


def open_session(options: SessionOptions, report: Report = to_stderr, progress: ProgressFn | None = None) -> Engine:
    """The engine for `options`: the catalog model fetched and converted first if needed (`progress`
    sees it), its kernels compiled now on the very first run (and said so). `report` gets one-line
    accounts: the memory plan when a limit is given, when the model must stream, or when verbose;
    a cluster's join command."""
    path = resolve_model(options.model, progress or StageProgress())
    if not options.float32 and not has_kernels():
        report(NO_KERNELS)
    if options.cluster is not None:
        return _open_cluster(path, options, report)
    kernels = _kernels_key(path, options)
    preloaded = not options.float32 and has_kernels() and kernels is not None and preload(kernels)
    if preloaded:
        release_compiler_pages()  # before the weights: the process never holds both
    engine = open_engine(path, options.context, options.float32, options.mem_limit, options.attention, report,
                         options.load_bits, options.sequences, options.cache_type, preloaded)
    if options.verbose and options.mem_limit is None and engine.memory_plan.window is None:
        report(engine.memory_plan.describe())
    if preloaded:  # every kernel the warm-up would load is in: their first calls come with the prompt
        return engine
    if engine.model.path.fused and first_run():  # the float32 path compiles nothing
        report(COMPILING)
    engine.model.warm_up()
    if engine.model.path.fused and kernels is not None:
        save_preload(kernels)
        release_compiler_pages()
    return engine


def _kernels_key(path: str, options: SessionOptions) -> str | None:
    """What decides which kernels a run loads: the model file as it is now and the options that
    choose paths and types. None for a path that is not there: opening it says why."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return repr((os.path.realpath(path), stat.st_size, stat.st_mtime_ns, options.float32, options.load_bits,
                 options.mem_limit, options.context, options.attention, options.sequences, options.cache_type))


def open_engine(path: str, context: int | None = None, float32: bool = False, mem_limit: int | None = None,
                attention: str = "exact", report: Report | None = None, load_bits: int = 8,
                sequences: int = 1, cache_type: str = "f16", kernels_loaded: bool = False) -> Engine:
    """The engine of the model file at `path` (kernels not yet warm). The memory preflight
    (storage/memory_plan.py) decides, before any weight is read, whether the model is resident or
    streamed through a window of layers, within `mem_limit` when given, else within the memory
    available, counting `sequences` KV caches; at the default context, or at the largest smaller one
    that fits (said in one line). `report` gets the plan's one-line account when it streams or a
    limit was given. kernels_loaded: the kernels are in the process already (jit_cache.preload), so
    the plan counts only their first calls."""
    source = open_model(path)
    if source.config.layers_only:
        raise EdgeInferError(f"{source.path} holds a cluster worker's share of the layers, not a whole model")
    if context is None:  # the default context, or less where its KV cache would not fit
        wanted = default_context(source.config)
        plan, context = fitting_memory_plan(source, wanted, mem_limit, not float32, attention, sequences,
                                            cache_type, kernels_loaded, tokenizer_built=False)
        if context < wanted and report:
            where = f"--mem-limit {mem_limit / 2**20:.0f} MB" if mem_limit else "the memory available"
            kind = "with every weight resident" if plan.window is None else "that fits"
            report(f"context: {wanted} tokens do not fit in {where}; running at --ctx {context}, the largest "
                   f"{kind} (give --ctx to choose)")
    else:
        plan = model_memory_plan(source, context, mem_limit, not float32, attention, sequences, cache_type,
                                 kernels_loaded, tokenizer_built=False)
    if report and (mem_limit is not None or plan.window is not None):
        report(plan.describe())
    if plan.window is None and not float32:  # the weights come in while the tokenizer is built
        source.read_ahead()
    tokenizer = Tokenizer(source.tokenizer)
    if tokenizer.spec.note and report:
        report(tokenizer.spec.note)
    model = Model(source, not float32, plan.window, attention, plan.pinned, load_bits, cache_type)
    engine = Engine(model, tokenizer, context)
    engine.memory_plan = plan
    return engine


def _open_cluster(path: str, options: SessionOptions, report: Report) -> Engine:
    """The master's engine: its own shard, and the workers that joined within the wait."""
    from .cluster.cluster_model import ClusterModel
    from .cluster.master import Master

    c = options.cluster
    token = c.token or secrets.token_urlsafe(12)
    if not options.float32 and has_kernels() and first_run():
        report(COMPILING)
    source = open_model(path)  # a file or options no node can run fail here, before listening
    choose_path(source, not options.float32, options.attention, cache_type=options.cache_type)
    master = Master(c.listen, token, c.timeout, "f2" if c.sync == "fp16" else "f4")
    try:
        report(f"cluster: join with: edgeinfer worker --join {master.address.removeprefix('tcp://')} --token {token}")
        master.wait_for(c.workers, c.wait)
        context = default_context(source.config, options.context)
        tokenizer = Tokenizer(source.tokenizer)  # before the model's memory plan, which counts it
        if tokenizer.spec.note:
            report(tokenizer.spec.note)
        model = ClusterModel(master, path, context, quantized=not options.float32, attention=options.attention,
                             mem_limit=options.mem_limit, cache_type=options.cache_type)
        return Engine(model, tokenizer, context)
    except BaseException:
        master.close("the master failed to start")
        raise


def close_session(engine: Engine | None) -> None:
    """Say bye to a cluster's workers; nothing for a model alone."""
    master = getattr(engine.model, "master", None) if engine is not None else None
    if master is not None:
        master.close()
