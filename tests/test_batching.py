"""Continuous batching: sequences decoded together give each the bits it gets alone; the batch's
slots, queue, prefix reuse and cancellation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import make_hf_model, write_gguf
from test_quantized_model import PROJECTIONS

from edgeinfer.batching import Batch, QueueFull, Request
from edgeinfer.engine import Engine
from edgeinfer.errors import ContextOverflowError
from edgeinfer.model import Model
from edgeinfer.sampling import SamplingParams
from edgeinfer.storage import open_model
from edgeinfer.storage.single import convert
from edgeinfer.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)


def _model(tmp_path, tokenizer_json, kind: str) -> Model:
    return _model_and_source(tmp_path, tokenizer_json, kind)[0]


def _model_and_source(tmp_path, tokenizer_json, kind: str):
    if kind == "gemma3-q8-at-load":  # local layers, q/k and output norms, GELU; 8-bit matrices
        source = open_model(str(make_hf_model(tmp_path / kind, tokenizer_json, arch="gemma3", sliding_window=4)))
        return Model(source, quantized=True), source
    arch, q8_cache = kind.split("-")[0], kind.endswith("q8_0-cache")
    heads = {"num_attention_heads": 2, "num_key_value_heads": 1} if q8_cache else {}  # q8_0: 32 per head
    hf = make_hf_model(tmp_path / arch, tokenizer_json, arch=arch, **heads)
    types = {**LAYERED, **PROJECTIONS} if kind.endswith("layered") else PROJECTIONS
    source = open_model(str(write_gguf(tmp_path / f"{arch}.gguf", hf, tokenizer_json, types, arch)))
    return Model(source, quantized=True, cache_type="q8_0" if q8_cache else "f16"), source


# Projections whose type differs between layers, as llama.cpp's mixes hold some layers' ffn_down
# or attn_v in a wider type: each slot's alternatives in the fused kernels (weights.one_decode_type).
LAYERED = {"blk.1.ffn_down.weight": "Q8_0", "blk.0.attn_v.weight": "Q5_0"}


def test_layers_of_different_types_pass_the_fused_kernels_one_type(tmp_path, tokenizer_json):
    from numba import typeof

    model, source = _model_and_source(tmp_path, tokenizer_json, "llama-layered")
    stored = lambda i, name: source.stored_type(f"model.layers.{i}.{name}.weight")  # noqa: E731
    assert stored(0, "mlp.down_proj") != stored(1, "mlp.down_proj") and stored(0, "self_attn.v_proj") != stored(1, "self_attn.v_proj")
    layers = [model.weights.layer(i)[1] for i in range(model.config.num_layers)]
    assert len({typeof(args) for args in layers}) == 1  # one decode layer compiles for them all
    q, k, v, o, gate, up, down = layers[0][1]
    assert len(v) == len(down) == 2 and [m[2].shape[0] == 0 for m in down] == [False, True]
    assert [m[2].shape[0] == 0 for m in layers[1][1][6]] == [True, False] and len(q) == 6  # q: one matrix


def test_a_streamed_model_of_mixed_layers_passes_the_resident_decode_type(tmp_path, tokenizer_json):
    """Streamed under --mem-limit, the layers arrive one at a time; their alternatives come from the
    file's index, so the streamed model compiles one decode layer, the resident model's (whose norms,
    views of the mapped file, the kernels take as copies), and gives its bits."""
    from numba import typeof

    _, source = _model_and_source(tmp_path, tokenizer_json, "llama-layered")
    single = tmp_path / "layered.safetensors"
    convert(source, str(single))  # every GGUF type kept as it is
    resident = Model(open_model(str(single)), quantized=True)
    streamed = Model(open_model(str(single)), True, 1)

    def decode_types(model):
        types = []
        for i in range(model.config.num_layers):
            types.append(typeof(model.weights.layer(i)[1]))
            model.weights.done(i)
        return types
    assert decode_types(streamed) == decode_types(resident) and len(set(decode_types(resident))) == 1
    assert len(streamed.weights.layer(0)[1][1][6]) == 2  # down: a Q4_0 matrix and an empty Q8_0 one
    streamed.weights.done(0)
    outputs = []
    for model in (resident, streamed):
        cache, ids = model.new_cache(24), np.arange(5, 17)
        logits = [model.forward(ids, cache)]
        for _ in range(6):
            logits.append(model.forward(np.array([int(np.argmax(logits[-1]))]), cache))
        outputs.append(np.array(logits))
    assert np.array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("kind", ["llama-q4", "qwen2-q4", "gemma3-q8-at-load", "llama-q4-q8_0-cache", "llama-layered"])
def test_batched_decode_rows_equal_each_sequence_alone(tmp_path, tokenizer_json, kind):
    """Model.decode_batch reads each weight once for all rows; every row's logits equal, bit for bit,
    those of its sequence decoded alone, whichever sequences share the step."""
    model = _model(tmp_path, tokenizer_json, kind)
    assert model.path.fused
    prompts = [np.arange(5, 5 + n) for n in (7, 12, 3)]
    alone = []
    for p in prompts:
        cache = model.new_cache(40)
        logits = [model.forward(p, cache)]
        for _ in range(8):
            logits.append(model.forward(np.array([int(np.argmax(logits[-1]))]), cache))
        alone.append(logits)
    caches = model.new_caches(40, 4)
    slot_of = [3, 0, 2]  # not in order, and slot 1 idle
    last = [model.forward(p, caches.slot(s)) for p, s in zip(prompts, slot_of)]
    steps = [[0, 1, 2], [2, 0], [1], [0, 1, 2], [0, 2], [1, 2, 0]]
    for members in steps:
        out = model.decode_batch(np.array([int(np.argmax(last[i])) for i in members]), caches,
                                 [slot_of[i] for i in members])
        for row, i in enumerate(members):
            last[i] = out[row]
            done = caches.slot(slot_of[i]).length - len(prompts[i])
            np.testing.assert_array_equal(out[row], alone[i][done], err_msg=f"sequence {i}")


@pytest.fixture(scope="module", params=["kernels", "float32"])
def engine(tiny_single, request):
    """The tiny model on the fused 4/8-bit path (batched steps), and on the float32 path (whose
    sequences run in turn within a step)."""
    source = open_model(str(tiny_single))
    return Engine(Model(source, quantized=request.param == "kernels"), Tokenizer(source.tokenizer), context=96)


def _run_batch(engine: Engine, requests: list[Request], parallel: int) -> tuple[list[str], list, Batch]:
    """Submit every request at once to a running batch; their texts and final stats."""
    batch = Batch(engine, parallel)
    texts, stats, left = [""] * len(requests), [None] * len(requests), threading.Semaphore(0)

    def events(i):
        def on_event(kind, a, b):
            if kind == "text":
                texts[i] += a
            else:
                stats[i] = a
                left.release()
        return on_event

    handles = [batch.submit(r, events(i)) for i, r in enumerate(requests)]
    runner = threading.Thread(target=batch.run)
    runner.start()
    try:
        for _ in requests:
            assert left.acquire(timeout=120)
    finally:
        batch.close()
        runner.join()
    assert all(h.stats is s for h, s in zip(handles, stats))
    return texts, stats, batch


def test_requests_give_the_same_text_alone_or_together(engine):
    """Five requests through three slots (two wait for a slot) give what Engine.generate gives each
    alone: greedy, seeded sampling, a stop string, max_tokens."""
    prompts = ["the quick brown fox", "memory flash kernel", "Paris France capital", "cache layer", "token"]
    params = [GREEDY, SamplingParams(seed=7), GREEDY, SamplingParams(seed=11, temperature=1.2), GREEDY]
    ids = [engine.prompt_ids(p, raw=True) for p in prompts]
    gens = [Engine(engine.model, engine.tokenizer, engine.context).generate(i, p, max_tokens=24)
            for i, p in zip(ids, params)]
    alone = [g.run() for g in gens]
    stop = alone[2][5:8]
    expected = alone[:2] + [alone[2][:alone[2].find(stop)]] + alone[3:]
    requests = [Request(i, p, 24, [stop] if k == 2 else []) for k, (i, p) in enumerate(zip(ids, params))]
    texts, stats, batch = _run_batch(engine, requests, parallel=3)
    assert texts == expected
    reasons = [g.stats.finish_reason for g in gens]
    assert [s.finish_reason for s in stats] == reasons[:2] + ["stop"] + reasons[3:] and reasons[2] == "length"
    assert [s.generated_tokens for k, s in enumerate(stats) if k != 2] == \
        [g.stats.generated_tokens for k, g in enumerate(gens) if k != 2]
    assert batch.metrics.decode_tokens > 0 and batch.metrics.requests == 5
    assert max(n for n, _ in batch.metrics.recent) <= 3


def test_a_longer_conversation_reuses_its_slot_s_cache(engine):
    """A request that extends an earlier one is given the slot holding its prefix and computes only
    the rest; its text is the same as computed from nothing."""
    first = engine.prompt_ids("the quick brown fox", raw=True)
    other = engine.prompt_ids("memory flash kernel", raw=True)
    batch = Batch(engine, 2)
    done = threading.Semaphore(0)
    out: list = []
    on_event = lambda kind, a, b: (out.append((kind, a)), kind != "text" and done.release())  # noqa: E731
    runner = threading.Thread(target=batch.run)
    runner.start()
    try:
        for prompt in (first, other):
            batch.submit(Request(prompt, GREEDY, 6), on_event)
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
        longer = first + engine.tokenizer.encode(" jumps over the lazy dog")
        h = batch.submit(Request(longer, GREEDY, 6), on_event)
        assert done.acquire(timeout=60)
    finally:
        batch.close()
        runner.join()
    assert h.stats.prefill_tokens == len(longer) - len(first)
    assert batch.metrics.prompt_tokens_cached == len(first)
    fresh = Engine(engine.model, engine.tokenizer, engine.context).generate(longer, GREEDY, max_tokens=6)
    assert fresh.run() == "".join(a for k, a in out[_last_done(out, 2) + 1:] if k == "text")


def _last_done(events: list, count: int) -> int:
    """The index of the count-th "done" event."""
    return [i for i, (k, _) in enumerate(events) if k == "done"][count - 1]


def test_cancel_frees_the_slot_and_the_queue_has_a_limit(engine):
    batch = Batch(engine, parallel=1, queue_limit=2)
    ids = engine.prompt_ids("the quick brown fox", raw=True)
    events: list = []
    at_cancel: list = []

    def cancel_at_first_text(kind, a, b):  # on the batch's thread: the next step must see it
        events.append((1, kind, a))
        if kind == "text" and not first.cancelled.is_set():
            first.cancel()
            at_cancel.append(first.stats.generated_tokens)

    first = batch.submit(Request(ids, GREEDY, -1), cancel_at_first_text)
    second = batch.submit(Request(ids, GREEDY, 3), lambda kind, a, b: events.append((2, kind, a)))
    with pytest.raises(QueueFull):
        batch.submit(Request(ids, GREEDY, 3), lambda *a: None)
    with pytest.raises(ContextOverflowError):
        batch.submit(Request(list(range(5, 5 + engine.context)), GREEDY, 3), lambda *a: None)
    runner = threading.Thread(target=batch.run)
    runner.start()
    try:
        while not any(n == 2 and k == "done" for n, k, _ in events):
            threading.Event().wait(0.01)
    finally:
        batch.close()
        runner.join()
    assert first.stats.finish_reason == "cancelled" and 0 < first.stats.generated_tokens < engine.context
    assert first.stats.generated_tokens == at_cancel[0]  # not one token more after the cancel
    assert second.stats.finish_reason == "length" and second.stats.generated_tokens == 3
    assert batch.running() == 0 and batch.waiting() == 0
