"""The engine: stop conditions, context limits, prefix reuse across chat turns, cancellation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeinfer.engine import Engine, _split_stop
from edgeinfer.errors import ContextOverflowError
from edgeinfer.model import Model
from edgeinfer.sampling import SamplingParams
from edgeinfer.storage import open_model
from edgeinfer.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def parts(tiny_single):
    source = open_model(str(tiny_single))
    return Model(source), source.tokenizer


def engine(parts, context=256, **spec_changes) -> Engine:
    model, spec = parts
    return Engine(model, Tokenizer(dataclasses.replace(spec, **spec_changes)), context)


def test_max_tokens_and_determinism(parts):
    e = engine(parts)
    ids = e.prompt_ids("the quick brown fox", raw=True)
    g = e.generate(ids, GREEDY, max_tokens=20)
    text = g.run()
    assert len(g.token_ids) == 20 and g.stats.finish_reason == "length"
    assert text == e.tokenizer.decode(g.token_ids)
    assert engine(parts).generate(ids, GREEDY, max_tokens=20).run() == text


def test_end_of_generation_token_stops(parts):
    e = engine(parts)
    ids = e.prompt_ids("hello", raw=True)
    first = e.generate(ids, GREEDY, max_tokens=5)
    first.run()
    stopper = engine(parts, eos_ids=(first.token_ids[2],))
    g = stopper.generate(ids, GREEDY, max_tokens=5)
    g.run()
    assert g.token_ids == first.token_ids[:2] and g.stats.finish_reason == "stop"


def test_stop_string_cuts_the_text_and_is_never_emitted(parts):
    e = engine(parts)
    ids = e.prompt_ids("memory flash kernel", raw=True)
    full = e.generate(ids, GREEDY, max_tokens=40).run()
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3 and full.find(stop) >= 0
    g = engine(parts).generate(ids, GREEDY, max_tokens=40, stop=[stop])
    pieces = list(g)
    assert "".join(pieces) == full[:full.find(stop)] and g.stats.finish_reason == "stop"


def test_split_stop_holds_back_a_possible_start():
    assert _split_stop("hello wor", ("world",)) == ("hello ", "wor", False)
    assert _split_stop("hello world!", ("world",)) == ("hello ", "", True)
    assert _split_stop("abc", ()) == ("abc", "", False)
    assert _split_stop("hello wor", ("world",), final=True) == ("hello wor", "", False)


def test_full_context_ends_generation(parts):
    e = engine(parts, context=32)
    ids = e.prompt_ids("the quick brown fox", raw=True)
    g = e.generate(ids, GREEDY)
    g.run()
    assert g.stats.finish_reason == "context" and e.cache.length == 32
    with pytest.raises(ContextOverflowError, match="32"):
        e.generate(list(range(32)), GREEDY)


def test_chat_turns_reuse_the_cached_prefix_and_match_a_fresh_run(parts):
    e = engine(parts)
    convo = [{"role": "user", "content": "hello there"}]
    first_ids = e.chat_ids(convo)
    first = e.generate(first_ids, GREEDY, max_tokens=6)
    convo += [{"role": "assistant", "content": first.run()}, {"role": "user", "content": "and more"}]
    ids = e.chat_ids(convo)
    cached = first_ids + first.token_ids[:-1]  # the last sampled token was never run
    common = next(i for i, (a, b) in enumerate(zip(cached + [-1], ids)) if a != b)
    second = e.generate(ids, GREEDY, max_tokens=6)
    text = second.run()
    assert common >= len(first_ids) and second.stats.prefill_tokens == len(ids) - common
    fresh = engine(parts).generate(ids, GREEDY, max_tokens=6)
    assert fresh.run() == text and fresh.stats.prefill_tokens == len(ids)


def test_prefill_then_decode_equals_one_long_prefill(parts):
    model, _ = parts
    ids = np.arange(3, 40)
    whole = model.forward(ids, model.new_cache(64), all_logits=True)
    cache = model.new_cache(64)
    model.forward(ids[:10], cache)
    steps = [model.forward(ids[i:i + 1], cache) for i in range(10, len(ids))]
    np.testing.assert_allclose(np.stack(steps), whole[10:], atol=1e-5, rtol=0)


def test_cancel_stops_within_a_token(parts):
    e = engine(parts)
    g = e.generate(e.prompt_ids("fox", raw=True), GREEDY, max_tokens=200)
    for i, _ in enumerate(g):
        if i == 2:
            g.cancel()
    assert g.stats.finish_reason == "cancelled" and len(g.token_ids) <= 4
