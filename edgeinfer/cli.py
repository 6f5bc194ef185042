"""The `edgeinfer` command. Thin: parse, call, print. Errors become one line and exit status 2."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys

from .errors import EdgeInferError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _set_threads(argv)  # before anything imports numpy
    # At exit the interpreter collects garbage over every object still alive, Numba's type registries
    # above all: 0.2 s of a 1.2 s `run` (measured). Frozen objects are skipped by those collections;
    # every destructor still runs. Registered for exit, so a caller's process is unchanged until then.
    atexit.register(gc.freeze)
    args = _parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except EdgeInferError as exc:
        print(f"edgeinfer: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied, ...: the OS's words, the file's name
        where = f": {exc.filename}" if exc.filename else ""
        print(f"edgeinfer: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _set_threads(argv: list[str]) -> None:
    """Apply -t/--threads: BLAS reads these variables once, when numpy is first imported."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("-t", "--threads")
    try:  # bench takes a list (-t 1,2): the pool must hold the largest
        threads = max(int(t) for t in (early.parse_known_args(argv)[0].threads or "0").split(","))
    except ValueError:
        return  # the full parser reports it
    if threads > 0:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
            os.environ[var] = str(threads)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeinfer", description="Pure-CPU LLM inference for constrained hardware.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate from a prompt, or chat line by line without -p")
    run.add_argument("model", nargs="?", help="a .gguf, an edgeinfer .safetensors, a HF folder or a catalog "
                                              "name (default: the catalog's default model)")
    run.add_argument("-p", "--prompt", help="generate once from this prompt and exit")
    run.add_argument("-n", "--n-predict", type=int, default=-1, help="tokens to generate (-1: until the end)")
    run.add_argument("-s", "--system", help="system prompt for chat models")
    run.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    run.add_argument("--exact", action="store_true", help="the exact float32 reference path (default: 4-bit weights run in 4 bits)")
    run.add_argument("--bits", type=int, choices=(4, 8), default=8,
                     help="a float model (F16/BF16/F32 GGUF, HF folder) is quantized to this at load (default 8)")
    run.add_argument("-t", "--threads", type=int, help="threads (default: all cores)")
    run.add_argument("-c", "--ctx", type=int, help="context size in tokens (default: the model's, at most 4096)")
    run.add_argument("--mem-limit", metavar="SIZE", help="keep memory within SIZE (e.g. 2G, 512M): layers beyond it "
                                                        "stream from the file through a sliding window")
    run.add_argument("--attention", choices=("exact", "lut"), default="exact",
                     help="lut: NoMAD-style lookup-table scores over product-quantised keys (needs edgeinfer calibrate)")
    run.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    _cluster_args(run)
    run.add_argument("-v", "--verbose", action="store_true", help="print the prompt's token count and the seed")
    _sampling_args(run)
    _cache_type_arg(run)
    run.set_defaults(func=_cmd_run)

    chat = sub.add_parser("chat", help="open the terminal chat app")
    chat.add_argument("model", nargs="?", help="as for run (default: the catalog's default model)")
    chat.add_argument("-c", "--ctx", type=int, help="context size in tokens")
    chat.add_argument("-t", "--threads", type=int, help="threads (default: all cores)")
    chat.add_argument("--mem-limit", metavar="SIZE", help="as for run")
    chat.add_argument("--history", help="history database (default: ~/.local/share/edgeinfer/history.sqlite3)")
    chat.add_argument("--attention", choices=("exact", "lut"), default="exact", help="as for run")
    _cluster_args(chat)
    _cache_type_arg(chat)
    chat.set_defaults(func=_cmd_chat)

    serve = sub.add_parser("serve", help="serve the OpenAI API (chat and text completions) over HTTP")
    serve.add_argument("model", nargs="?", help="as for run (default: the catalog's default model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1; 0.0.0.0 for the network)")
    serve.add_argument("--port", type=int, default=8080, help="(8080)")
    serve.add_argument("--api-key", default=os.environ.get("EDGEINFER_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every route but /health "
                            "(default: $EDGEINFER_API_KEY; none)")
    serve.add_argument("--parallel", type=int, default=4, help="sequences decoded together, each with its own "
                       "KV cache of --ctx tokens (4)")
    serve.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot; more get 503 (64)")
    serve.add_argument("--alias", help="the model name /v1/models and responses give (default: the file's name)")
    serve.add_argument("-c", "--ctx", type=int, help="context of each sequence (default: the model's, at most 4096)")
    serve.add_argument("-t", "--threads", type=int, help="threads (default: all cores)")
    serve.add_argument("--mem-limit", metavar="SIZE", help="as for run; the plan counts every sequence's KV cache")
    serve.add_argument("--exact", action="store_true", help="the exact float32 path")
    serve.add_argument("--bits", type=int, choices=(4, 8), default=8, help="as for run")
    _cluster_args(serve)
    _cache_type_arg(serve)
    serve.set_defaults(func=_cmd_serve)

    bench = sub.add_parser("bench", help="prefill and decode speed, shaped like llama-bench")
    bench.add_argument("model", nargs="?", help="as for run (default: the catalog's default model)")
    bench.add_argument("-p", "--n-prompt", type=int, default=512, help="prefill test size (512; 0 skips)")
    bench.add_argument("-n", "--n-gen", type=int, default=128, help="decode test size (128; 0 skips)")
    bench.add_argument("-r", "--repetitions", type=int, default=5)
    bench.add_argument("-t", "--threads", default=None, help="thread counts, comma-separated (default: all cores)")
    bench.add_argument("-d", "--depth", type=int, default=0, help="tokens in the KV cache before each test")
    bench.add_argument("-o", "--output", choices=("md", "json"), default="md")
    bench.add_argument("--exact", action="store_true", help="bench the exact float32 path")
    bench.add_argument("--mem-limit", metavar="SIZE", help="as for run")
    bench.add_argument("--attention", default="exact", help="exact, lut or both (exact,lut): one row each")
    _cache_type_arg(bench)
    bench.set_defaults(func=_cmd_bench)

    ppl = sub.add_parser("perplexity", help="perplexity of a text file, as llama-perplexity computes it")
    ppl.add_argument("model", nargs="?", help="as for run (default: the catalog's default model)")
    ppl.add_argument("-f", "--file", required=True, help="the text to score")
    ppl.add_argument("-c", "--ctx", type=int, default=512, help="window size in tokens (512)")
    ppl.add_argument("-o", "--output", choices=("text", "json"), default="text")
    ppl.add_argument("--kl-base", help="log-probabilities of a base run: written if the file does not exist "
                                      "(run it with --exact), else compared: mean KL divergence and top-1 agreement")
    ppl.add_argument("--exact", action="store_true", help="the exact float32 path")
    ppl.add_argument("--mem-limit", metavar="SIZE", help="as for run")
    ppl.add_argument("--attention", choices=("exact", "lut"), default="exact", help="as for run")
    ppl.add_argument("-t", "--threads", type=int, help="threads (default: all cores)")
    _cache_type_arg(ppl)
    ppl.set_defaults(func=_cmd_perplexity)

    info = sub.add_parser("info", help="print a model's config, parameter count, tensor types and size")
    info.add_argument("model")
    info.set_defaults(func=_cmd_info)

    conv = sub.add_parser("convert", help="write a model as edgeinfer's single-file .safetensors")
    conv.add_argument("source", help="a .gguf, a HF folder, an edgeinfer .safetensors or a catalog name")
    conv.add_argument("-o", "--output", required=True)
    conv.add_argument("--bits", type=int, choices=(4, 8, 16),
                      help="4: projections in 4 bits (a GGUF's Q4_0/Q4_1 kept losslessly, others rounded to nearest), "
                           "embedding and head in 8; 8: all matrices in 8 bits; 16: float16. "
                           "Default: as the source stores them")
    conv.set_defaults(func=_cmd_convert)

    cal = sub.add_parser("calibrate", help="fit LUT attention's key codebooks on a text, into a copy of the model")
    cal.add_argument("model", nargs="?", help="as for run (default: the catalog's default model)")
    cal.add_argument("-f", "--file", required=True, help="the calibration text")
    cal.add_argument("-o", "--output", required=True, help="the model file to write, with the codebooks")
    cal.add_argument("--d-sub", type=int, default=1, help="dimensions per sub-space: 1, 2 or 4 (1: the one within 3%% "
                     "of exact perplexity; 2 and 4 are smaller and faster)")
    cal.add_argument("-c", "--ctx", type=int, default=512, help="window size in tokens (512)")
    cal.add_argument("--max-tokens", type=int, default=8192, help="tokens of the text to use (8192)")
    cal.add_argument("--span", type=int, default=0, help="the longest context the codebooks serve: keys are turned "
                     "to positions spread over it (default: the model's context)")
    cal.set_defaults(func=_cmd_calibrate)

    syn = sub.add_parser("synth", help="write a random-weight model of a real shape (speed and memory tests only)")
    syn.add_argument("--shape", required=True, help="llama2-7b, llama2-13b, llama2-70b, llama3-8b or llama3.2-1b")
    syn.add_argument("--bits", type=int, default=4, choices=(4, 8))
    syn.add_argument("-o", "--output", required=True, help="the file to write: edgeinfer's own, or a GGUF that "
                     "llama.cpp runs too when it ends in .gguf (Q4_0 or Q8_0 matrices, Q8_0 embedding and head)")
    syn.set_defaults(func=_cmd_synth)

    worker = sub.add_parser("worker", help="join a master's cluster and compute a share of every layer")
    worker.add_argument("--join", required=True, metavar="HOST[:PORT]", help="the master's address")
    worker.add_argument("--token", required=True, help="the join token the master printed")
    worker.add_argument("-t", "--threads", type=int, help="threads (default: all cores)")
    worker.add_argument("--cache-dir", help="where model files pulled from the master are kept "
                        "(default: ~/.cache/edgeinfer/cluster)")
    worker.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the master to answer (60; with --stay, "
                        "forever); a line says so every 5 s")
    worker.add_argument("--stay", action="store_true", help="after a session, or when the master is lost, join "
                        "it again (a restarted master too) until stopped")
    worker.add_argument("--mem-limit", metavar="SIZE", help="keep within SIZE: this node's shard is written once "
                        "as its own file and its layers stream through a window (as run --mem-limit)")
    worker.set_defaults(func=_cmd_worker)

    pull = sub.add_parser("pull", help="fetch and convert a catalog model into the cache")
    pull.add_argument("name", nargs="?")
    pull.set_defaults(func=_cmd_pull)
    return p


def _cache_type_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-type", default="f16",  # checked by run_path.choose_path
                   help="the KV cache's keys and values on the 4/8-bit path: f16 (default, as llama.cpp's), q8_0 "
                        "(8 bits and a scale per 32: about half of f16) or f32 (--exact keeps float32)")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (tensor parallelism over ZeroMQ, with `edgeinfer worker` on other devices)")
    g.add_argument("--listen", metavar="[HOST:]PORT", help="be the master: listen for workers here "
                   "(HOST defaults to 127.0.0.1; give 0.0.0.0 for the network)")
    g.add_argument("--token", help="the join token workers must give (default: a random one, printed)")
    g.add_argument("--workers", type=int, default=0, help="wait for this many workers before starting (0)")
    g.add_argument("--wait", type=float, default=60.0, help="seconds to wait for them; then start with "
                   "whoever joined (60)")
    g.add_argument("--timeout", type=float, default=30.0, help="a worker silent this long in a step is dropped "
                   "and the work re-planned without it (30; loading a share waits at least 120)")
    g.add_argument("--sync", choices=("fp32", "fp16"), default="fp32", help="all-reduce payload type (fp32)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from .sampling import SamplingParams

    d = SamplingParams()
    g = p.add_argument_group("sampling (defaults as llama.cpp)")
    g.add_argument("--temp", type=float, default=d.temperature, help=f"temperature, 0 = greedy ({d.temperature})")
    g.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off ({d.top_k})")
    g.add_argument("--top-p", type=float, default=d.top_p, help=f"1.0 = off ({d.top_p})")
    g.add_argument("--min-p", type=float, default=d.min_p, help=f"0.0 = off ({d.min_p})")
    g.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, help=f"1.0 = off ({d.repeat_penalty})")
    g.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n, help=f"({d.repeat_last_n})")
    g.add_argument("--seed", type=int, help="random seed (default: random; printed with -v)")


def _model_path(arg: str | None) -> str:
    """A model argument as a path: a catalog name is fetched and converted first, with progress bars."""
    from .progress import StageProgress
    from .storage.fetch import resolve_model

    return resolve_model(arg, StageProgress())


def _mem_limit(args: argparse.Namespace) -> int | None:
    from .storage.memory_plan import parse_size

    return parse_size(args.mem_limit) if args.mem_limit is not None else None


def _session_options(args: argparse.Namespace, context: int | None = None):
    """The session a command's arguments ask for (`context`: the command's own, where not --ctx)."""
    from .session import ClusterOptions, SessionOptions

    cluster = None
    if getattr(args, "listen", None) is not None:
        cluster = ClusterOptions(args.listen, args.token, args.workers, args.wait, args.timeout, args.sync)
    return SessionOptions(args.model, context or getattr(args, "ctx", None), getattr(args, "exact", False),
                          getattr(args, "bits", 8), _mem_limit(args), getattr(args, "attention", "exact"),
                          getattr(args, "verbose", False), cluster, cache_type=getattr(args, "cache_type", "f16"))


def _log_cluster_to_stderr() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cluster: %(message)s"))
    logger = logging.getLogger("edgeinfer.cluster")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from .models import default_model
    from .server import serve
    from .session import close_session, open_session

    if args.parallel < 1:
        raise EdgeInferError(f"--parallel must be at least 1, got {args.parallel}")
    if args.ctx is not None and args.ctx < 2:
        raise EdgeInferError(f"--ctx must be at least 2, got {args.ctx}")
    if not 0 <= args.port <= 65535:
        raise EdgeInferError(f"--port must be between 0 and 65535, got {args.port}")
    _log_cluster_to_stderr()
    path = _model_path(args.model)  # fetched now, with progress bars, before the server listens
    options = dataclasses.replace(_session_options(args), model=path, sequences=args.parallel)
    alias = args.alias or (os.path.basename(os.path.normpath(args.model)).removesuffix(".safetensors")
                           .removesuffix(".gguf") if args.model else default_model())
    if args.queue < 0:
        raise EdgeInferError(f"--queue must be at least 0, got {args.queue}")
    serve(lambda: open_session(options), args.host, args.port, alias, args.api_key, args.parallel, args.queue,
          lambda line: print(line, file=sys.stderr, flush=True), close_session)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .session import close_session, open_session

    if args.ctx is not None and args.ctx < 2:
        raise EdgeInferError(f"--ctx must be at least 2, got {args.ctx}")
    _log_cluster_to_stderr()
    engine = open_session(_session_options(args))
    try:
        return _run(engine, args)
    finally:
        close_session(engine)


def _run(engine, args: argparse.Namespace) -> int:
    from .sampling import SamplingParams

    params = SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)
    if args.prompt is not None:
        ids = engine.prompt_ids(args.prompt, raw=args.raw, system=args.system)
        _generate(engine, ids, params, args)
        print()
        return 0
    return _chat_loop(engine, params, args)


def _generate(engine, ids: list[int], params, args: argparse.Namespace) -> str:
    if args.verbose:
        print(f"prompt: {len(ids)} tokens | weights: {engine.model.precision}", file=sys.stderr)
    gen = engine.generate(ids, params, args.n_predict, args.stop)
    try:
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:  # stop this reply, keep what was generated
        gen.stats.finish_reason = "cancelled"
    _print_stats(gen.stats, args.verbose)
    if args.verbose:
        _print_stream_stats(engine)
    return gen.text


def _print_stream_stats(engine) -> None:
    """What streaming the layers read and waited, when they stream."""
    stream = getattr(getattr(engine.model, "weights", None), "stream", None)
    if stream is not None:
        print(stream.stats.describe(), file=sys.stderr)


def _print_stats(s, verbose: bool) -> None:
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rate = lambda x: f"{x:.1f}" if x >= 10 else f"{x:.3g}"  # noqa: E731 (a 70B model streams at 0.07)
    line = (f"\nprefill: {s.prefill_tokens} tok, {rate(s.prefill_tok_s)} tok/s | "
            f"decode: {s.generated_tokens} tok, {rate(s.decode_tok_s)} tok/s | peak RSS: {peak_mb:.0f} MB")
    if verbose:
        line += f" | finish: {s.finish_reason} | seed: {s.seed}"
    print(line, file=sys.stderr, flush=True)


def _chat_loop(engine, params, args: argparse.Namespace) -> int:
    from .errors import ContextOverflowError

    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print("chat: Enter sends, /reset starts over, /exit or Ctrl+D quits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            ids = engine.chat_ids(messages, args.raw)
            reply = _generate(engine, ids, params, args)
        except ContextOverflowError as exc:
            print(f"edgeinfer: error: {exc}; the conversation was reset", file=sys.stderr)
            messages = messages[:1] if args.system else []
            continue
        print()
        messages.append({"role": "assistant", "content": reply})


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    import numba

    from .bench import markdown, run_bench
    from .session import open_session
    from .threads import affinity, cpu_sample, others_between

    try:  # the pool was sized to the largest count before numba started (see _set_threads)
        threads = [int(t) for t in args.threads.split(",")] if args.threads else [numba.config.NUMBA_NUM_THREADS]
    except ValueError:
        raise EdgeInferError(f"-t takes thread counts separated by commas, got {args.threads!r}") from None
    if min(threads) < 1:
        raise EdgeInferError(f"thread counts must be at least 1, got {args.threads}")
    if args.repetitions < 1 or min(args.n_prompt, args.n_gen, args.depth) < 0:
        raise EdgeInferError("-r must be at least 1 and -p, -n, -d not negative")
    attentions = args.attention.split(",")
    if not attentions or not set(attentions) <= {"exact", "lut"}:
        raise EdgeInferError(f"--attention takes exact, lut or exact,lut, got {args.attention!r}")
    path = _model_path(args.model)
    rows = []
    cpus = affinity()
    before = cpu_sample(cpus)
    for attention in attentions:
        # The caches bench makes hold depth + test tokens: plan memory for that, not the model's context.
        options = _session_options(args, args.depth + max(args.n_prompt, args.n_gen) + 1)
        options.model, options.attention = path, attention
        engine = open_session(options)
        rows += run_bench(engine.model, os.path.getsize(path) / 1e6 if os.path.isfile(path) else 0.0,
                          args.n_prompt, args.n_gen, args.repetitions, threads, args.depth, attention)
        _print_stream_stats(engine)
        del engine
    after = cpu_sample(cpus)
    if before is not None and after is not None and (others := others_between(before, after)) >= 0.5:
        print(f"edgeinfer: note: other programs used {others:.1f} of {len(cpus)} cores during the benchmark: its "
              f"figures are not this machine's alone", file=sys.stderr)
    print(json.dumps([r.to_dict() for r in rows]) if args.output == "json" else markdown(rows))
    return 0


def _cmd_perplexity(args: argparse.Namespace) -> int:
    import json

    from .perplexity import perplexity
    from .progress import Progress
    from .session import open_session

    text = _read_text(args.file)
    engine = open_session(_session_options(args))
    ids = engine.tokenizer.encode(text, add_bos=False)
    bos = engine.tokenizer.bos_id if engine.tokenizer.spec.add_bos else None
    result = perplexity(engine.model, ids, args.ctx, args.kl_base, Progress("scoring", " windows"), bos)
    if args.output == "json":
        print(json.dumps(result.to_dict()))
        return 0
    print(f"PPL = {result.ppl:.4f} ± {result.ppl_error:.4f} ({result.tokens_scored} tokens in {result.windows} "
          f"windows of {args.ctx})")
    if result.kl_mean is not None:
        print(f"mean KL divergence from the base = {result.kl_mean:.6f}, same top token {result.top1_agreement:.2%}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .tui.app import ChatApp

    app = ChatApp(_session_options(args), args.history)
    try:
        app.run()
    finally:
        app.close_session()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from collections import Counter

    import numpy as np

    from .calibrate import codebooks_summary
    from .storage import open_model
    from .tokenizer import Tokenizer

    source = open_model(_model_path(args.model))
    c = source.config
    names = source.model_tensor_names()
    params = sum(int(np.prod(source.stored_shape(n))) for n in names)
    types = Counter(source.stored_type(n) for n in names)
    tok = Tokenizer(source.tokenizer)
    print(f"file: {source.path} ({source.format}, {source.file_size() / 1e6:.1f} MB)")
    print(f"architecture: {c.architecture}  layers: {c.num_layers}  hidden: {c.hidden_size}  "
          f"ffn: {c.intermediate_size}  heads: {c.num_heads}  kv heads: {c.num_kv_heads}  head dim: {c.head_dim}")
    print(f"vocab: {c.vocab_size}  context: {c.max_context}  rope theta: {c.rope_theta:g}  "
          f"rope scaling: {_rope_scaling_text(c.rope_scaling)}  norm eps: {c.rms_norm_eps:g}  tied head: {c.tie_embeddings}  "
          f"qkv bias: {c.attention_bias}")
    options = [f"activation: {c.hidden_act}"] + (["q/k norms"] if c.qk_norm else []) + \
        (["output norms"] if c.sandwich_norms else []) + ([f"embed scale {c.embed_scale:g}"] if c.embed_scale != 1 else [])
    if c.rotary_dim:
        options.append(f"RoPE on {c.rotary_dim} of {c.head_dim} head dims")
    if c.local_layers:
        base = f", local RoPE base {c.rope_local_theta:g}" if c.rope_local_theta else ""
        options.append(f"sliding window {c.sliding_window} on {len(c.local_layers)} of {c.num_layers} layers{base}")
    print("family: " + ", ".join(options))
    print(f"parameters: {params:,} ({params / 1e6:.1f} M)")
    print("tensor types: " + ", ".join(f"{t} x{n}" for t, n in types.most_common()))
    print(f"tokenizer: {tok.spec.kind}, {tok.vocab_size} tokens, bos {tok.bos_id}, eos {list(tok.eos_ids)}, "
          f"add bos {tok.spec.add_bos}, chat template: {'yes' if tok.chat_template else 'no'}")
    if tok.spec.note:
        print(tok.spec.note)
    print(codebooks_summary(source))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .progress import Progress
    from .storage import open_model
    from .storage.single import convert

    src = resolve_source(args.source)
    if os.path.abspath(src) == os.path.abspath(args.output):
        raise EdgeInferError("the output would overwrite the source")
    source = open_model(src)
    if source.tokenizer.note:  # the output keeps the tokenizer as rebuilt, without the note
        print(source.tokenizer.note, file=sys.stderr)
    try:
        convert(source, args.output, Progress(f"converting {os.path.basename(src.rstrip(os.sep))}", " tensors"),
                bits=args.bits)
    finally:
        source.close()
    print(args.output)
    return 0


def resolve_source(arg: str) -> str:
    """For convert: a path as given, or a catalog name's original GGUF."""
    from .progress import StageProgress
    from .storage.fetch import fetch_gguf, is_path

    return arg if is_path(arg) else str(fetch_gguf(arg, StageProgress()))


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate
    from .progress import Progress
    from .session import SessionOptions, open_session
    from .storage import open_model
    from .storage.single import convert

    path = _model_path(args.model)
    if os.path.abspath(path) == os.path.abspath(args.output):
        raise EdgeInferError("the output would overwrite the model")
    if args.ctx < 16:
        raise EdgeInferError(f"--ctx must be at least 16, got {args.ctx}")
    engine = open_session(SessionOptions(path, args.ctx))
    ids = engine.tokenizer.encode(_read_text(args.file), add_bos=False)
    books = calibrate(engine.model, ids, args.d_sub, args.ctx, args.max_tokens, args.span,
                      Progress("fitting codebooks", " layers"))
    convert(open_model(path), args.output, Progress("writing", " tensors"), codebooks=books)
    print(args.output)
    return 0


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise EdgeInferError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _rope_scaling_text(scaling: dict | None) -> str:
    """RoPE scaling in a line: LongRoPE's factor lists summed up as its original context and attention factor."""
    if not scaling:
        return "none"
    if scaling["rope_type"] == "longrope":
        return (f"longrope (original context {scaling['original_max_position_embeddings']}, attention factor "
                f"{scaling['attention_factor']:.4f})")
    return str(scaling)


def _cmd_synth(args: argparse.Namespace) -> int:
    from .progress import Progress
    from .storage.synth import synth, synth_gguf

    write = synth_gguf if args.output.endswith(".gguf") else synth
    write(args.shape, args.bits, args.output, Progress(f"writing {args.shape}", " tensors"))
    print(args.output)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from .cluster.worker import run_worker

    _log_cluster_to_stderr()
    return run_worker(args.join, args.token, args.cache_dir, args.timeout, _mem_limit(args), stay=args.stay)


def _cmd_pull(args: argparse.Namespace) -> int:
    print(_model_path(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
