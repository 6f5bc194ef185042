"""`edgeinfer serve`: the OpenAI API over HTTP (Starlette under uvicorn), in front of the batch of
sequences (batching.py). HTTP concerns live here: validation, errors in the API's shape
({"error": {"message", "type", "param", "code"}}), the key, server-sent events, metrics.

The model loads on its own thread, which then runs the batch's steps (Numba's threads belong to it);
uvicorn's event loop runs on the main thread and only talks to the batch through submit/cancel and
the events it sends back. /health answers 503 until the model is ready. The `model` field of a
request is not checked (any name is served by the one model, as llama-server does); responses
carry the served model's name.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .batching import Batch, QueueFull, Request as BatchRequest
from .constrain import GrammarError, Grammars
from .engine import Engine
from .errors import ContextOverflowError, EdgeInferError
from .sampling import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's for /v1/completions; chat runs to the end by default
RETRY_AFTER_SECONDS = 1
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _Mailbox:
    """Events from the batch's thread to the requests' queues on the event loop, with one wake-up of
    the loop for all the events that arrive before it runs (a decode step's tokens of every
    sequence), not one per token: on 2 cores every wake-up is taken from the kernels' threads."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list = []
        self._lock = threading.Lock()

    def sender(self, queue: asyncio.Queue) -> Callable[[str, object, object], None]:
        self._loop = asyncio.get_running_loop()

        def send(kind: str, a: object, b: object) -> None:  # on the batch's thread
            with self._lock:
                self._pending.append((queue, (kind, a, b)))
                wake = len(self._pending) == 1
            if wake:
                self._loop.call_soon_threadsafe(self._deliver)

        return send

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


@dataclass
class ServerState:
    alias: str
    api_key: str | None = None
    batch: Batch | None = None
    engine: Engine | None = None
    grammars: Grammars | None = None
    failed: str | None = None  # why the model could not load
    failed_grammars: str | None = None  # why this tokenizer cannot constrain output
    mailbox: _Mailbox = field(default_factory=_Mailbox)
    created: int = field(default_factory=lambda: int(time.time()))


# --- request fields ---------------------------------------------------------------------------------

def _field(body: dict, name: str, kinds: tuple, default: Any = None, check: Callable[[Any], bool] | None = None,
           what: str = "") -> Any:
    """body[name], which must be of one of `kinds` (None allowed: the default) and pass `check`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join("number" if k is float else {int: "integer", str: "string", bool: "boolean",
                                                          list: "array", dict: "object"}[k] for k in kinds)
        raise ApiError(400, f"'{name}' must be {what or names}, got {json.dumps(value)[:80]}", param=name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


NUMBER = (int, float)


def sampling_params(body: dict) -> SamplingParams:
    d = SamplingParams()
    return SamplingParams(
        temperature=float(_field(body, "temperature", NUMBER, d.temperature, lambda v: 0 <= v <= 2, "between 0 and 2")),
        top_k=_field(body, "top_k", (int,), d.top_k, lambda v: v >= 0, "a non-negative integer"),
        top_p=float(_field(body, "top_p", NUMBER, d.top_p, lambda v: 0 < v <= 1, "in (0, 1]")),
        min_p=float(_field(body, "min_p", NUMBER, d.min_p, lambda v: 0 <= v <= 1, "between 0 and 1")),
        repeat_penalty=float(_field(body, "repeat_penalty", NUMBER, d.repeat_penalty, lambda v: v > 0, "positive")),
        presence_penalty=float(_field(body, "presence_penalty", NUMBER, 0.0, lambda v: -2 <= v <= 2,
                                      "between -2 and 2")),
        frequency_penalty=float(_field(body, "frequency_penalty", NUMBER, 0.0, lambda v: -2 <= v <= 2,
                                       "between -2 and 2")),
        seed=_field(body, "seed", (int,)),
    )


def stop_strings(body: dict) -> list[str]:
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or an array of strings", param="stop")
    return stop


def max_tokens(body: dict, default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = _field(body, name, (int,), None, lambda v: v >= 0, "a non-negative integer")
        if value is not None:
            return value
    return default


def message_text(message: Any, i: int) -> dict[str, str]:
    """A chat message as the template takes it: its content a string, or text parts joined."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"'{where}' must be an object", param=where)
    role = message.get("role")
    if role not in ROLES:
        raise ApiError(400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {json.dumps(role)}", param=where)
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"'{where}.content' parts must be text parts ({{\"type\": \"text\", \"text\": ...}})",
                           param=where)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"'{where}.content' must be a string or an array of text parts", param=where)
    return {"role": "system" if role == "developer" else role, "content": content}


def n_is_one(body: dict) -> None:
    _field(body, "n", (int,), 1, lambda v: v == 1, "1 (one choice per request is served)")


# --- the routes -------------------------------------------------------------------------------------

def create_app(state: ServerState) -> Starlette:
    async def health(request: Request) -> Response:
        if state.failed:
            return ApiError(500, f"the model failed to load: {state.failed}", "server_error").response()
        if state.batch is None:
            return ApiError(503, "Loading model", "unavailable_error", code="model_loading").response()
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": state.alias, "object": "model", "created": state.created, "owned_by": "edgeinfer"}]})

    async def metrics(request: Request) -> Response:
        batch = _ready(state)
        m = batch.metrics
        rows = [("prompt_tokens_total", "counter", "prompt tokens of admitted requests", m.prompt_tokens),
                ("prompt_tokens_cached_total", "counter", "prompt tokens reused from a slot's KV cache",
                 m.prompt_tokens_cached),
                ("generation_tokens_total", "counter", "tokens generated", m.generated_tokens),
                ("requests_total", "counter", "requests admitted", m.requests),
                ("requests_running", "gauge", "requests decoding now", batch.running()),
                ("requests_waiting", "gauge", "requests queued for a slot", batch.waiting()),
                ("decode_tokens_per_second", "gauge", "tokens per second over the last decode steps",
                 round(m.decode_tok_s, 3)),
                ("slots", "gauge", "sequences decoded together at most", batch.parallel),
                ("threads", "gauge", "threads the kernels run on now (fewer while other programs keep cores busy)",
                 state.engine.threads.current)]
        text = "".join(f"# HELP edgeinfer_{n} {h}\n# TYPE edgeinfer_{n} {t}\nedgeinfer_{n} {v}\n"
                       for n, t, h, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def chat(request: Request) -> Response:
        body = await _body(request)
        _ready(state)
        engine = state.engine
        messages = _field(body, "messages", (list,), None, lambda v: len(v) > 0, "a non-empty array")
        if messages is None:
            raise ApiError(400, "'messages' is required", param="messages")
        messages = [message_text(m, i) for i, m in enumerate(messages)]
        logprobs = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20, "between 0 and 20")
        try:
            prompt = engine.chat_ids(messages)
        except EdgeInferError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        req = _batch_request(state, body, prompt, max_tokens(body, -1), top if logprobs else None, "messages")
        return await _respond(request, state, body, req, chat=True)

    async def completions(request: Request) -> Response:
        body = await _body(request)
        _ready(state)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = state.engine.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            ids = list(prompt)
            if not all(0 <= t < state.engine.tokenizer.vocab_size for t in ids):
                raise ApiError(400, "'prompt' has a token id outside the vocabulary", param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a string, an array of one string, or an array of token ids",
                           param="prompt")
        top = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "between 0 and 20")
        req = _batch_request(state, body, ids, max_tokens(body, COMPLETIONS_DEFAULT_MAX_TOKENS), top, "prompt")
        return await _respond(request, state, body, req, chat=False)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()
        if exc.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()
        return ApiError(exc.status_code, str(exc.detail)).response()

    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    app = Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics),
        Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={HTTPException: not_found, ApiError: api_error})
    return _Auth(app, state.api_key)


class _Auth:
    """ASGI middleware: every route but /health needs `Authorization: Bearer KEY` when a key is set."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                what = "no API key was given" if not given else "the API key is not valid"
                response = ApiError(401, f"{what}: send 'Authorization: Bearer KEY'", code="invalid_api_key").response()
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _ready(state: ServerState) -> Batch:
    if state.batch is None:
        raise ApiError(503, "Loading model", "unavailable_error", code="model_loading",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    return state.batch


async def _body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _batch_request(state: ServerState, body: dict, prompt: list[int], limit: int, top: int | None,
                   prompt_param: str) -> BatchRequest:
    n_is_one(body)
    _field(body, "stream", (bool,), False)
    _field(body, "stream_options", (dict,), {})
    req = BatchRequest(prompt, sampling_params(body), limit, stop_strings(body), top_logprobs=top)
    fmt = _field(body, "response_format", (dict,), None)
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ApiError(400, "'response_format.json_schema' must be an object with a 'schema' object",
                               param="response_format")
            schema = spec.get("schema", {})
        elif kind == "json_object":
            schema = None
        elif kind == "text":
            return req
        else:
            raise ApiError(400, "'response_format.type' must be text, json_object or json_schema",
                           param="response_format")
        if state.grammars is None:
            raise ApiError(400, f"response_format is not available for this model's tokenizer: "
                                f"{state.failed_grammars}", param="response_format")
        try:
            req.constraint = state.grammars.json(schema)
        except GrammarError as exc:
            raise ApiError(400, str(exc), param="response_format") from None
    if len(prompt) >= state.engine.context:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens but the context holds {state.engine.context}",
                       param=prompt_param, code="context_length_exceeded")
    return req


async def _respond(request: Request, state: ServerState, body: dict, req: BatchRequest, chat: bool) -> Response:
    events: asyncio.Queue = asyncio.Queue()
    on_event = state.mailbox.sender(events)

    try:
        handle = state.batch.submit(req, on_event)
    except QueueFull as exc:
        raise ApiError(503, f"the server is busy: {exc}", "server_busy", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except ContextOverflowError as exc:
        raise ApiError(400, str(exc), code="context_length_exceeded") from None
    reply = _Reply(state, chat, req.top_logprobs)
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_stream(events, handle, reply, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        while True:
            try:
                kind, a, b = await asyncio.wait_for(events.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    handle.cancel()
                    return Response(status_code=499)
                continue
            if kind == "text":
                reply.add(a, b)
            elif kind == "error":
                raise ApiError(500, str(a), "server_error")
            else:
                return JSONResponse(reply.whole(a))
    except asyncio.CancelledError:
        handle.cancel()
        raise


async def _stream(events: asyncio.Queue, handle, reply: "_Reply", include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; a client that goes away cancels its request (Starlette cancels this
    generator when the connection closes), which frees its slot at the next step."""
    try:
        yield _sse(reply.chunk(role=True))
        while True:
            kind, a, b = await events.get()
            if kind == "text":
                yield _sse(reply.chunk(text=a, logprobs=b))
            elif kind == "error":
                yield _sse({"error": {"message": str(a), "type": "server_error", "param": None, "code": None}})
                break
            else:
                yield _sse(reply.chunk(finish=a))
                if include_usage:
                    yield _sse(reply.usage_chunk(a))
                break
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # nothing if it has finished


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Reply:
    """A response's JSON, chat or text completion, whole or as stream chunks."""

    def __init__(self, state: ServerState, chat: bool, top: int | None):
        self.chat, self.top, self.tokenizer = chat, top, state.engine.tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.base = {"id": self.id, "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": state.alias}
        self.text, self.logprobs, self.offset = "", [], 0

    def add(self, text: str, logprobs: list) -> None:
        self.text += text
        self.logprobs += logprobs

    def whole(self, stats) -> dict:
        choice = {"index": 0, "finish_reason": _finish(stats)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": self.text}
        else:
            choice["text"] = self.text
        choice["logprobs"] = self._logprobs(self.logprobs)
        return {**self.base, "choices": [choice], "usage": _usage(stats)}

    def chunk(self, text: str = "", logprobs: list | None = None, role: bool = False, finish=None) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(finish) if finish is not None else None}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
            obj = "chat.completion.chunk"
        else:
            choice["text"] = text
            obj = "text_completion"
        choice["logprobs"] = self._logprobs(logprobs or []) if logprobs else None
        return {**self.base, "object": obj, "choices": [choice]}

    def usage_chunk(self, stats) -> dict:
        return {**self.base, "object": "chat.completion.chunk" if self.chat else "text_completion", "choices": [],
                "usage": _usage(stats)}

    def _logprobs(self, entries: list) -> dict | None:
        if self.top is None:
            return None
        piece = lambda t: self.tokenizer.decode([t], skip_special=False)  # noqa: E731
        if self.chat:
            return {"content": [{"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode()),
                                 "top_logprobs": [{"token": piece(i), "logprob": v, "bytes": list(piece(i).encode())}
                                                  for i, v in alts]} for t, lp, alts in entries]}
        tokens = [piece(t) for t, _, _ in entries]
        offsets = []
        for tok in tokens:
            offsets.append(self.offset)
            self.offset += len(tok)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{piece(i): v for i, v in alts} for _, _, alts in entries], "text_offset": offsets}


def _finish(stats) -> str:
    return "length" if stats.finish_reason in ("length", "context") else "stop"


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.prompt_tokens - stats.prefill_tokens}}


# --- running it -------------------------------------------------------------------------------------

def serve(open_engine: Callable[[], Engine], host: str, port: int, alias: str, api_key: str | None = None,
          parallel: int = 4, queue: int = 64, report: Callable[[str], None] = print,
          on_close: Callable[[Engine], None] | None = None) -> None:
    """Listen at once (/health says 503 while loading), open the model on the engine thread, which
    then runs the batch, until interrupted."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EdgeInferError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    state = ServerState(alias, api_key)
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)

    def engine_thread() -> None:
        try:
            engine = open_engine()
            batch = Batch(engine, parallel, queue)
            state.engine = engine
            try:
                state.grammars = Grammars(engine.tokenizer, engine.model.config.vocab_size)
            except Exception as exc:  # noqa: BLE001 — only response_format needs it: those requests say why
                state.failed_grammars = f"{type(exc).__name__}: {exc}"
            state.batch = batch
        except BaseException as exc:  # noqa: BLE001 — /health says so; the server stops and serve() raises it
            state.failed = str(exc) if isinstance(exc, EdgeInferError) else f"{type(exc).__name__}: {exc}"
            server.should_exit = True
            return
        at_once = f"{batch.parallel} sequences at once" if batch.parallel > 1 else "one sequence at a time"
        report(f"serving {alias} at http://{host}:{port}/v1 ({at_once}, context {engine.context} each)")
        try:
            batch.run()
        finally:
            if on_close is not None:
                on_close(engine)

    worker = threading.Thread(target=engine_thread, name="edgeinfer-engine", daemon=True)
    worker.start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.batch is not None:
            state.batch.close()
        worker.join(timeout=5)
    if state.failed:
        raise EdgeInferError(state.failed)
