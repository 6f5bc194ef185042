"""Sampling: each filter does what llama.cpp's does, and the same seed gives the same tokens."""

from __future__ import annotations

from collections import Counter

import numpy as np

from edgeinfer.sampling import Sampler, SamplingParams

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)


def draws(params: SamplingParams, logits: np.ndarray, n: int, history=()) -> Counter:
    sampler = Sampler(params)
    return Counter(sampler(logits, list(history)) for _ in range(n))


def test_greedy_is_argmax_whatever_the_seed():
    logits = np.random.default_rng(0).standard_normal(1000)
    for seed in (1, 2, 3):
        assert Sampler(SamplingParams(temperature=0, seed=seed))(logits, []) == int(np.argmax(logits))


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = np.zeros(50)
    p = SamplingParams(temperature=1.0, seed=42, **OFF)
    a, b = Sampler(p), Sampler(p)
    seq_a = [a(logits, []) for _ in range(40)]
    assert seq_a == [b(logits, []) for _ in range(40)]
    c = Sampler(SamplingParams(temperature=1.0, seed=43, **OFF))
    assert seq_a != [c(logits, []) for _ in range(40)]


def test_unfiltered_draws_follow_the_softmax():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    counts = draws(SamplingParams(temperature=1.0, seed=0, **OFF), logits, 20000)
    for tid, p in enumerate([0.5, 0.25, 0.15, 0.1]):
        assert abs(counts[tid] / 20000 - p) < 0.015


def test_top_k_keeps_the_k_best():
    logits = np.array([1.0, 3.0, 2.0, 0.5, 2.5])
    assert set(draws(SamplingParams(temperature=5.0, seed=0, top_k=2, top_p=1, min_p=0), logits, 500)) == {1, 4}
    assert set(draws(SamplingParams(temperature=5.0, seed=0, top_k=1, top_p=1, min_p=0), logits, 50)) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert set(draws(SamplingParams(temperature=1.0, seed=0, top_k=0, top_p=0.7, min_p=0), logits, 2000)) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, seed=0, top_k=0, top_p=0.81, min_p=0), logits, 3000)) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    logits = np.log(np.array([0.5, 0.3, 0.12, 0.08]))
    # 0.2 * 0.5 = 0.1: token 3 (0.08) goes, token 2 (0.12) stays
    assert set(draws(SamplingParams(temperature=1.0, seed=0, top_k=0, top_p=1, min_p=0.2), logits, 3000)) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    logits = np.log(np.array([0.6, 0.4]))
    cold = draws(SamplingParams(temperature=0.25, seed=0, **OFF), logits, 4000)
    hot = draws(SamplingParams(temperature=4.0, seed=0, **OFF), logits, 4000)
    assert cold[0] / 4000 > 0.8 and 0.45 < hot[0] / 4000 < 0.6


def test_repetition_penalty_applies_to_recent_tokens_only():
    logits = np.array([2.0, 1.9, -1.0, -1.2])
    greedy = dict(temperature=0, repeat_penalty=1.2)
    assert Sampler(SamplingParams(**greedy))(logits, [0]) == 1  # 2.0 / 1.2 < 1.9
    assert Sampler(SamplingParams(**greedy, repeat_last_n=1))(logits, [0, 3]) == 0  # 0 is outside the window
    # negative logits are multiplied: -1.0 * 1.2 = -1.2 ties below nothing here, but drops under -1.1
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.2))(np.array([-1.0, -1.1]), [0]) == 1


def test_defaults_are_llama_cpps():
    d = SamplingParams()
    assert (d.temperature, d.top_k, d.top_p, d.min_p, d.repeat_penalty) == (0.8, 40, 0.95, 0.05, 1.0)
