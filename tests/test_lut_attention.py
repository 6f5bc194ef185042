"""LUT attention kernels: the integer lookups equal numpy's, and scores approximate exact attention."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.engine import Engine
from edgeinfer.kernels import reference as ref
from edgeinfer.kernels.lut_attention import (SINK_KEYS, attend_one_lut, build_tables, encode_keys, fit_codebooks,
                                             lut_sums, lut_sums_reference, pack_codes)


def clustered_keys(rng, n, hd):
    """Keys with structure (as real keys have), so that 16 centroids per sub-space fit them well."""
    centres = rng.standard_normal((8, hd)).astype(np.float32) * 2
    return (centres[rng.integers(0, 8, n)] + 0.3 * rng.standard_normal((n, hd))).astype(np.float32)


@pytest.mark.parametrize("d_sub,n", [(1, 64), (2, 100), (4, 1000)])
def test_lookup_sums_equal_the_reference(d_sub, n):
    rng = np.random.default_rng(d_sub)
    keys = clustered_keys(rng, n, 64)
    books = fit_codebooks(keys, d_sub)
    codes = encode_keys(keys, books)
    tables = np.zeros((64 // d_sub, 64), np.uint8)
    build_tables(rng.standard_normal(64).astype(np.float32), 0, books, tables)
    assert all((tables[:, lane * 16:(lane + 1) * 16] == tables[:, :16]).all() for lane in range(4))
    out = np.zeros(-(-n // 64) * 64, np.uint16)
    lut_sums(tables, pack_codes(codes), -(-n // 64), out)
    np.testing.assert_array_equal(out[:n], lut_sums_reference(tables[:, :16], codes))


def test_codes_round_trip_through_the_packed_layout():
    codes = np.random.default_rng(1).integers(0, 16, (130, 32), dtype=np.uint8)
    packed = pack_codes(codes)  # (3 blocks, 16 pairs, 64 keys)
    keys = packed.transpose(0, 2, 1).reshape(-1, 16)[:130]
    np.testing.assert_array_equal(np.stack([keys & 15, keys >> 4], axis=2).reshape(130, 32), codes)


@pytest.mark.parametrize("d_sub", [1, 2, 4])
def test_lut_attention_approximates_exact_attention(d_sub):
    rng = np.random.default_rng(3)
    heads, kv_heads, hd, length, capacity = 8, 2, 64, 300, 320
    keys = np.stack([clustered_keys(rng, capacity, hd) for _ in range(kv_heads)])
    values = rng.standard_normal((kv_heads, capacity, hd)).astype(np.float32)
    books = np.stack([fit_codebooks(keys[k, :length], d_sub) for k in range(kv_heads)])
    codes = np.stack([pack_codes(encode_keys(keys[k], books[k])) for k in range(kv_heads)])
    q = (0.5 * rng.standard_normal(heads * hd)).astype(np.float32)
    s = hd // d_sub
    out = np.empty_like(q)
    attend_one_lut(q, books, codes, keys, values, length, np.zeros((heads, s, 64), np.uint8),
                   np.zeros((heads, capacity), np.uint16), np.zeros((heads, capacity), np.float32), out)
    # The exact attention over the keys the codes stand for (the centroids; the first SINK_KEYS keys
    # themselves, which score exactly): only the tables' 8-bit rounding remains, so they agree closely.
    decoded = np.stack([np.take_along_axis(books[k][None], encode_keys(keys[k], books[k])[:, :, None, None]
                                           .astype(np.int64), axis=2)[:, :, 0].reshape(capacity, hd)
                        for k in range(kv_heads)])
    decoded[:, :SINK_KEYS] = keys[:, :SINK_KEYS]
    expected = ref.causal_attention(q.reshape(heads, 1, hd), decoded[:, :length], values[:, :length], length - 1)
    np.testing.assert_allclose(out, expected.reshape(-1), atol=0.05)
    # And against the true keys, the error is the quantisation's: bounded, not exact.
    exact = ref.causal_attention(q.reshape(heads, 1, hd), keys[:, :length], values[:, :length], length - 1)
    assert np.abs(out - exact.reshape(-1)).mean() < 0.1


def test_calibrate_stores_codebooks_that_fit_the_models_keys(tiny_single, tmp_path):
    from conftest import edgeinfer_cli, varied_lines
    from edgeinfer.calibrate import collect_keys
    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(varied_lines(80, seed=11)), encoding="utf-8")
    outs = [tmp_path / f"cal{i}.safetensors" for i in range(2)]
    for out in outs:
        r = edgeinfer_cli("calibrate", str(tiny_single), "-f", str(text), "-o", str(out), "--d-sub", "2", "-c", "64")
        assert r.returncode == 0, r.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes()  # seeded: the same text gives the same file
    source = open_model(str(outs[0]))
    books = source.key_codebooks()
    c = source.config
    assert books.d_sub == 2 and len(books.layers) == c.num_layers
    assert books.layers[0].shape == (c.num_kv_heads, c.head_dim // 2, 16, 2)
    assert "LUT codebooks: d_sub 2" in edgeinfer_cli("info", str(outs[0])).stdout
    # The codes stand for the model's own keys far better than their mean does.
    engine = Engine.load(str(outs[0]), 64, exact=True)
    keys = collect_keys(engine.model, engine.tokenizer.encode(text.read_text(), add_bos=False), 64, 512)
    for layer, layer_keys in enumerate(keys):
        for head, k in enumerate(layer_keys):
            book = books.layers[layer][head]
            decoded = book[np.arange(book.shape[0])[None, :], encode_keys(k, book).astype(np.int64)].reshape(k.shape)
            assert ((decoded - k) ** 2).sum() < 0.5 * ((k - k.mean(axis=0)) ** 2).sum()
    # The model's weights are untouched, and converting keeps the codebooks.
    again = tmp_path / "again.safetensors"
    convert(source, str(again))
    assert open_model(str(again)).key_codebooks().layers[1].tobytes() == books.layers[1].tobytes()
    for name in open_model(str(tiny_single)).model_tensor_names():
        np.testing.assert_array_equal(source.float32(name), open_model(str(tiny_single)).float32(name))
    bad = edgeinfer_cli("calibrate", str(tiny_single), "-f", str(text), "-o", str(tmp_path / "x.safetensors"),
                        "--d-sub", "3")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--d-sub" in bad.stderr


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_hf):
    """The tiny model in 4 bits with codebooks fitted on a text (d_sub 1)."""
    from conftest import edgeinfer_cli, varied_lines
    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    folder = tmp_path_factory.mktemp("lut")
    q4, text, out = folder / "q4.safetensors", folder / "calib.txt", folder / "lut.safetensors"
    convert(open_model(str(tiny_hf)), str(q4), bits=4)
    text.write_text("\n".join(varied_lines(80, seed=12)), encoding="utf-8")
    r = edgeinfer_cli("calibrate", str(q4), "-f", str(text), "-o", str(out), "--d-sub", "1", "-c", "64")
    assert r.returncode == 0, r.stderr
    return q4, out


def test_encoding_in_the_cache_picks_the_nearest_centroids():
    from edgeinfer.kernels.lut_attention import encode_keys_into

    rng = np.random.default_rng(5)
    keys = np.stack([clustered_keys(rng, 200, 32) for _ in range(2)])
    books = np.stack([fit_codebooks(keys[k], 2) for k in range(2)])
    codes = np.zeros((2, 4, 8, 64), np.uint8)
    encode_keys_into(keys, books, codes, 0, 130)
    encode_keys_into(keys, books, codes, 130, 70)
    for k in range(2):
        expected = pack_codes(encode_keys(keys[k], books[k]), 256)
        assert (codes[k] == expected).mean() > 0.99  # float ties may fall either way


def test_lut_prefill_and_decode_agree_and_track_exact(calibrated):
    from edgeinfer.model import Model
    from edgeinfer.storage import open_model

    _, path = calibrated
    lut, exact = Model(open_model(str(path)), True, attention="lut"), Model(open_model(str(path)), True)
    ids = np.arange(3, 43)
    prefilled = lut.forward(ids, lut.new_cache(48), all_logits=True)
    cache = lut.new_cache(48)
    lut.forward(ids[:-1], cache)
    stepped = lut.forward(ids[-1:], cache)  # the fused decode step's LUT path
    np.testing.assert_allclose(stepped, prefilled[-1], atol=2e-3 * np.abs(prefilled).max())
    # The approximation follows the exact logits: its error is a fraction of how much they vary.
    # (Quality on a real model is perplexity's to judge: bench/RESULTS.md.)
    reference = exact.forward(ids, exact.new_cache(48), all_logits=True)
    assert np.abs(prefilled - reference).mean() < 0.5 * reference.std()


def test_lut_attention_needs_codebooks(calibrated):
    from conftest import edgeinfer_cli

    plain, path = calibrated
    r = edgeinfer_cli("run", str(plain), "-p", "x", "-n", "1", "--attention", "lut")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "calibrate" in r.stderr
    ok = edgeinfer_cli("run", str(path), "-p", "hello", "-n", "4", "--temp", "0", "--attention", "lut")
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr


def test_bench_rows_for_each_attention(calibrated):
    import json

    from conftest import edgeinfer_cli

    _, path = calibrated
    r = edgeinfer_cli("bench", str(path), "-p", "8", "-n", "4", "-r", "1", "-d", "16", "--attention", "exact,lut",
                      "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["attention"], row["test"]) for row in rows] == [("exact", "pp8"), ("exact", "tg4"), ("lut", "pp8"),
                                                                 ("lut", "tg4")]
    assert all(row["tok_s"] > 0 for row in rows)
    bad = edgeinfer_cli("bench", str(path), "--attention", "exact,fast")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--attention" in bad.stderr
