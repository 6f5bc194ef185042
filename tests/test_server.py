"""`edgeinfer serve`, started for real on a free loopback port and spoken to with the official
`openai` client and raw HTTP (httpx): the real SmolLM2 model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import pytest
from conftest import edgeinfer_cli
from test_cluster import free_port

pytestmark = pytest.mark.real_model

KEY = "test-key-123"
PROMPT = "What is the capital of France?"


class Server:
    """An `edgeinfer serve` process; `statuses` are the /health codes seen while it started, and
    `loading` the first 503's body."""

    def __init__(self, *args: str, then=None):
        """`then`: called once the process is started (a cluster's worker joins then)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeinfer.cli", "serve", "smollm2-135m", "--port",
                                      str(self.port), "-t", "2", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        if then is not None:
            then()
        self.statuses: list[int] = []
        self.loading: dict | None = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()
            try:
                r = httpx.get(self.url + "/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            status = r.status_code
            if status == 503 and self.loading is None:
                self.loading = r.json()
            self.statuses.append(status)
            if status == 200:
                return
            time.sleep(0.05)
        raise AssertionError("the server did not become ready")

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err

    def metric(self, name: str, headers: dict | None = None) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers or {"Authorization": f"Bearer {KEY}"}).text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"edgeinfer_{name} ")))


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", KEY, "--parallel", "4")
    yield s
    err = s.stop()
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def run_text(*args: str) -> str:
    out = edgeinfer_cli("run", "-p", PROMPT, "-t", "2", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout[:-1]  # run ends its reply with a newline


def test_health_says_503_while_loading_then_200(server):
    assert server.statuses[0] == 503 and server.statuses[-1] == 200
    assert server.loading["error"]["code"] == "model_loading" and server.loading["error"]["message"]
    r = httpx.get(server.url + "/health")  # no key needed
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_chat_text_equals_edgeinfer_run_plain_and_streamed(client):
    """Greedy, and sampled with a seed: the text `edgeinfer run` prints for the same prompt."""
    for settings, args in [({"temperature": 0}, ("--temp", "0")), ({"seed": 42}, ("--seed", "42"))]:
        expected = run_text("-n", "40", *args)
        messages = [{"role": "user", "content": PROMPT}]
        plain = client.chat.completions.create(model="any", messages=messages, max_tokens=40, **settings)
        finish = "length" if plain.usage.completion_tokens == 40 else "stop"  # the end-of-turn token first
        assert plain.choices[0].message.content == expected and plain.choices[0].finish_reason == finish
        assert plain.usage.prompt_tokens > 10
        pieces, streamed_finish, usage = [], None, None
        for chunk in client.chat.completions.create(model="any", messages=messages, max_tokens=40, stream=True,
                                                    stream_options={"include_usage": True}, **settings):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                streamed_finish = chunk.choices[0].finish_reason or streamed_finish
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) == expected and streamed_finish == finish
        assert (usage.prompt_tokens, usage.completion_tokens) == (plain.usage.prompt_tokens,
                                                                  plain.usage.completion_tokens)
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # all but the last, computed again


def test_text_completion_stop_and_logprobs(client):
    full = client.completions.create(model="any", prompt="The three primary colors are", max_tokens=30, temperature=0)
    text = full.choices[0].text
    stop = text[10:14]
    cut = client.completions.create(model="any", prompt="The three primary colors are", max_tokens=30, temperature=0,
                                    stop=[stop], logprobs=2)
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    lp = cut.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) >= 1
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy


def test_models_lists_the_alias(client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]


def test_a_key_is_needed_on_every_route_but_health(server):
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
        wrong = httpx.get(server.url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (json.dumps({"messages": "hello"}), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}), "n"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), "messages[0]"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}), "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}],
                 "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}}),
     "response_format"),
])
def test_bad_requests_get_400_in_openai_s_shape(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers=auth())
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_a_prompt_longer_than_the_context_and_an_unknown_route(server, client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "cat " * 5000}])
    assert info.value.status_code == 400 and info.value.body["code"] == "context_length_exceeded"
    r = httpx.get(server.url + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(server.url + "/health").status_code == 200  # still up


SCHEMAS = {
    "Give me a person as JSON.": {
        "type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 150}}},
    "Pick a color and a count as JSON.": {
        "type": "object", "additionalProperties": False, "required": ["color", "count"],
        "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                       "count": {"type": "integer", "minimum": 0, "maximum": 99}}},
    "Describe Paris as JSON.": {
        "type": "object", "additionalProperties": False, "required": ["city", "population"],
        "properties": {"city": {"type": "object", "additionalProperties": False, "required": ["name", "country"],
                                "properties": {"name": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}}},
                       "population": {"type": "integer", "minimum": 0, "maximum": 100000000}}},
    "List some fruits as JSON.": {
        "type": "object", "additionalProperties": False, "required": ["fruits"],
        "properties": {"fruits": {"type": "array", "minItems": 2, "maxItems": 4,
                                  "items": {"type": "string", "maxLength": 12}}}},
    "Is the sky blue? Answer as JSON.": {
        "type": "object", "additionalProperties": False, "required": ["answer", "confidence", "level"],
        "properties": {"answer": {"type": "boolean"}, "confidence": {"type": "number"},
                       "level": {"enum": ["low", "mid", "high"]}}},
}


@pytest.mark.parametrize("prompt", list(SCHEMAS))
def test_json_schema_output_parses_and_validates(client, prompt):
    schema = SCHEMAS[prompt]
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": prompt}], max_tokens=200,
                                       temperature=0, response_format={"type": "json_schema", "json_schema": {
                                           "name": "answer", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_concurrent_clients_get_their_own_text_and_a_conversation_reuses_its_cache(server, client):
    """Four streams at once, each the text it gets alone; then a follow-up turn computes only what
    is new (usage.prompt_tokens_details.cached_tokens, and /metrics)."""
    prompts = ["Tell me a joke.", "Write a haiku about the sea.", "List three colors.", "Why is the sky blue?"]
    ask = lambda p, **kw: client.chat.completions.create(  # noqa: E731
        model="any", messages=[{"role": "user", "content": p}], max_tokens=32, temperature=0, **kw)
    alone = [ask(p).choices[0].message.content for p in prompts]
    together = [""] * len(prompts)

    def stream(i):
        for chunk in ask(prompts[i], stream=True):
            together[i] += chunk.choices[0].delta.content or "" if chunk.choices else ""

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    cached_before = server.metric("prompt_tokens_cached_total")
    turn = [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": alone[0]},
            {"role": "user", "content": "Another one."}]
    r = client.chat.completions.create(model="any", messages=turn, max_tokens=8, temperature=0)
    first_turn = ask(prompts[0]).usage.prompt_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= first_turn
    assert server.metric("prompt_tokens_cached_total") - cached_before >= first_turn
    assert 1 <= server.metric("threads") <= os.cpu_count()  # the kernels' count now (edgeinfer/threads.py)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    body = {"messages": [{"role": "user", "content": "Write a very long story about a dragon."}], "max_tokens": 3000,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(12)]
        assert any(line.startswith("data: {") for line in got)
        assert server.metric("requests_running") == 1
    deadline = time.monotonic() + 10
    while server.metric("requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("requests_running") == 0
    generated = server.metric("generation_tokens_total")
    time.sleep(0.3)
    assert server.metric("generation_tokens_total") == generated  # nothing decodes for it any more


def test_a_full_queue_gets_503_with_retry_after():
    s = Server("--parallel", "1", "--queue", "1")
    try:
        body = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400, "temperature": 0}
        results: list = []
        post = lambda: results.append(httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120))  # noqa: E731
        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes[0] == 200 and codes[-1] == 503
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["Retry-After"] and busy.json()["error"]["code"] == "queue_full"
    finally:
        assert "Traceback" not in s.stop()


@pytest.mark.parametrize("args, message", [
    (["--parallel", "0"], "--parallel must be at least 1"),
    (["--queue", "-1"], "--queue must be at least 0"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
])
def test_bad_serve_options_get_one_line_and_status_2(args, message):
    out = edgeinfer_cli("serve", "smollm2-135m", *args, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == f"edgeinfer: error: {message}, got {args[1]}"


def test_a_port_in_use_gets_one_line_and_status_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = edgeinfer_cli("serve", "smollm2-135m", "--port", str(port), timeout=120)
    assert out.returncode == 2 and out.stderr.startswith(f"edgeinfer: error: cannot listen on 127.0.0.1:{port}: ")
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_served_model_split_over_a_cluster_worker(tmp_path):
    """serve --listen: the model runs over the master and a worker, one request at a time, and
    answers as `edgeinfer run` does alone."""
    from test_cluster import TOKEN, finish, worker

    port = free_port()
    workers = []
    s = Server("--listen", str(port), "--token", TOKEN, "--workers", "1", "--wait", "120",
               then=lambda: workers.append(worker(port, tmp_path / "w")))
    try:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 20, "temperature": 0}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120).json()
        assert r["choices"][0]["message"]["content"] == run_text("-n", "20", "--temp", "0")
        assert s.metric("slots", headers={}) == 1
    finally:
        err = s.stop()
    assert "plan 1 over 2 nodes" in err and "Traceback" not in err, err
    code, _, werr = finish(workers[0], 60)
    assert "Traceback" not in werr, werr
