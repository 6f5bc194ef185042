"""`edgeinfer perplexity`: windows, scoring, KL against a base run, and its errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import edgeinfer_cli, varied_lines

from edgeinfer.perplexity import log_softmax, perplexity
from edgeinfer.session import open_engine


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text("\n".join(varied_lines(120, seed=3)), encoding="utf-8")
    return path


def test_perplexity_is_the_mean_nll_of_every_window_token_but_the_first(tiny_single, text_file):
    engine = open_engine(str(tiny_single), float32=True)
    ids = engine.tokenizer.encode(text_file.read_text(), add_bos=False)
    ctx = 40
    result = perplexity(engine.model, ids, ctx)
    assert result.windows == len(ids) // ctx and result.tokens_scored == result.windows * (ctx - 1)
    # The same scores, decoding each window one token at a time.
    nll = []
    for w in range(result.windows):
        cache = engine.model.new_cache(ctx)
        window = ids[w * ctx:(w + 1) * ctx]
        for t in range(ctx - 1):
            logprobs = log_softmax(engine.model.forward(np.array([window[t]]), cache).astype(np.float64))
            nll.append(-logprobs[window[t + 1]])
    assert result.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    assert 0 < result.ppl_error < result.ppl


def test_kl_base_written_then_compared(tiny_single, text_file, tmp_path):
    base = tmp_path / "base.kl"
    first = edgeinfer_cli("perplexity", str(tiny_single), "-f", str(text_file), "-c", "32", "--exact",
                          "--kl-base", str(base), "-o", "json")
    assert first.returncode == 0, first.stderr
    written = json.loads(first.stdout)
    assert base.exists() and "kl_mean" not in written and not list(tmp_path.glob("*.tmp-*"))
    again = json.loads(edgeinfer_cli("perplexity", str(tiny_single), "-f", str(text_file), "-c", "32", "--exact",
                                     "--kl-base", str(base), "-o", "json").stdout)
    assert again["ppl"] == pytest.approx(written["ppl"], rel=1e-6)
    assert again["kl_mean"] < 1e-3 and again["top1_agreement"] == 1.0  # against itself: fp16 rounding only
    assert again["tokens_scored"] == written["tokens_scored"]


def test_text_output_and_errors(tiny_single, text_file, tmp_path):
    r = edgeinfer_cli("perplexity", str(tiny_single), "-f", str(text_file), "-c", "64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("PPL = ") and " ± " in r.stdout
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    for args, words in ((["-f", str(short)], "fewer than one window"), (["-f", str(tmp_path / "none.txt")], "none.txt"),
                        (["-f", str(text_file), "-c", "1"], "--ctx")):
        r = edgeinfer_cli("perplexity", str(tiny_single), *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    other = tmp_path / "other.kl"
    with open(other, "wb") as f:
        np.save(f, np.zeros((3, 4), np.float16))
    r = edgeinfer_cli("perplexity", str(tiny_single), "-f", str(text_file), "-c", "32", "--kl-base", str(other))
    assert r.returncode == 2 and "not the same text" in r.stderr, r.stderr
