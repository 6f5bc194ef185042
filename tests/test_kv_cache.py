"""The KV cache's local-layer rings: a sliding-window layer holds only its window, and attention
over the ring gives what it gives over every position; what a ring can keep when truncated; the
memory plan's size is what the cache allocates."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_hf_model
from test_loaders import prompt_ids

from edgeinfer.engine import prefill
from edgeinfer.kv_cache import KVCache
from edgeinfer.model import Model
from edgeinfer.storage import open_model

WINDOW = 8
GEMMA = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], head_dim=32)


@pytest.fixture(scope="module")
def gemma_source(tmp_path_factory, tokenizer_json):
    return open_model(str(make_hf_model(tmp_path_factory.mktemp("ring") / "gemma3", tokenizer_json, "gemma3", **GEMMA)))


def _logits(model: Model, ids: np.ndarray, rings: bool) -> np.ndarray:
    """Prompt chunks of 7 tokens (chunks that start inside the window, and cross the ring's end),
    then one fused decode step per token."""
    cache = model.new_cache(64, rings=rings)
    assert cache.rows == ([WINDOW, 64] if rings else [64, 64])
    out = [model.prefill(ids[s:min(s + 7, 24)], cache) for s in range(0, 24, 7)]
    out += [model.forward(ids[t:t + 1], cache) for t in range(24, len(ids))]
    return np.stack(out)


@pytest.mark.oracle
@pytest.mark.parametrize("path", ["float32", "fused-f16", "fused-q8_0"])
def test_a_local_layers_ring_attends_as_the_whole_cache(gemma_source, tokenizer_json, path):
    """Gemma 3's local layer (window 8) in a ring of 8 rows against a cache of every position: the
    same logits but for the order of the attention sums, prompt chunks and decode steps alike."""
    model = Model(gemma_source, quantized=path != "float32",
                  cache_type=path.split("-")[1] if path != "float32" else "f16")
    ids = np.asarray(prompt_ids(tokenizer_json)[:56])
    ring, whole = _logits(model, ids, True), _logits(model, ids, False)
    np.testing.assert_allclose(ring, whole, atol=2e-4 * np.abs(whole).max(), rtol=0)
    assert (ring.argmax(-1) == whole.argmax(-1)).all()


@pytest.mark.oracle
def test_a_ring_keeps_what_its_window_still_holds(gemma_source, tokenizer_json):
    """Once a ring has wrapped it holds its last window: cutting one position keeps the rest (the
    next token's window is all there), cutting more keeps nothing, and a prompt sent again is then
    computed whole; before it wraps, any cut keeps. The logits are those of a fresh cache."""
    model = Model(gemma_source, quantized=True)
    ids = prompt_ids(tokenizer_json)[:30]
    cache = model.new_cache(64)
    model.prefill(np.asarray(ids[:6]), cache)
    assert cache.truncate(2) == 2  # not wrapped yet
    model.prefill(np.asarray(ids[2:20]), cache)
    assert cache.truncate(19) == 19
    assert cache.truncate(15) == 0
    logits, computed = prefill(model, cache, ids[:19], ids[:26])
    assert computed == 26
    fresh = model.new_cache(64)
    np.testing.assert_array_equal(logits, prefill(model, fresh, [], ids[:26])[0])
    logits, computed = prefill(model, cache, ids[:26], ids[:30])  # a continuation keeps its whole prefix
    assert computed == 4
    np.testing.assert_array_equal(logits, prefill(model, fresh, ids[:26], ids[:30])[0])


@pytest.mark.parametrize("cache_type", ["f16", "q8_0", "f32"])
def test_the_plans_cache_size_is_what_the_cache_allocates(gemma_source, cache_type):
    """KVCache.size (the memory plan's figure) equals the bytes the cache's arrays take, the
    local layer holding 8 rows instead of 512."""
    config = gemma_source.config
    cache = KVCache(config, 512, cache_type=cache_type)
    assert cache.nbytes == KVCache.size(config, 512, cache_type, None)
    assert KVCache(config, 512, cache_type=cache_type, rings=False).nbytes == cache.nbytes * 2 * 512 // (512 + WINDOW)
