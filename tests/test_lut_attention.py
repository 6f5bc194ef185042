"""LUT attention kernels: the integer lookups equal numpy's, and scores approximate exact attention."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.kernels import reference as ref
from edgeinfer.kernels.lut_attention import (EXACT_SLOTS, RECENT_KEYS, SINK_KEYS, attend_one_lut, band_of, band_start,
                                             bands_for, build_tables, encode_keys, encode_keys_into, fit_codebooks,
                                             keep_exact_key, lut_sums, lut_sums_reference, pack_codes)
from edgeinfer.session import open_engine


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
    lut_sums(tables, pack_codes(codes), 0, -(-n // 64), out)
    np.testing.assert_array_equal(out[:n], lut_sums_reference(tables[:, :16], codes))


def test_codes_round_trip_through_the_packed_layout():
    codes = np.random.default_rng(1).integers(0, 16, (130, 32), dtype=np.uint8)
    packed = pack_codes(codes)  # (3 blocks, 16 pairs, 64 keys)
    keys = packed.transpose(0, 2, 1).reshape(-1, 16)[:130]
    np.testing.assert_array_equal(np.stack([keys & 15, keys >> 4], axis=2).reshape(130, 32), codes)


def decode_keys(keys: np.ndarray, books: np.ndarray) -> np.ndarray:
    """The keys (kv_heads, n, hd) that a query at position n - 1 scores: each position's band's
    centroids, but the first SINK_KEYS and the last RECENT_KEYS keys themselves (they score exactly)."""
    decoded = keys.copy()
    for kh in range(keys.shape[0]):
        for p in range(SINK_KEYS, keys.shape[1] - RECENT_KEYS):
            book = books[kh, band_of(p, books.shape[1])]
            codes = encode_keys(keys[kh, p:p + 1], book)[0].astype(np.int64)
            decoded[kh, p] = book[np.arange(book.shape[0]), codes].reshape(-1)
    return decoded


@pytest.mark.parametrize("d_sub,length,half", [(1, 300, False), (2, 300, True), (4, 300, False), (1, 1300, True)])
def test_lut_attention_approximates_exact_attention(d_sub, length, half):
    """1300 positions reach three bands, each with codebooks of its own; values float32 or fp16."""
    rng = np.random.default_rng(3)
    heads, kv_heads, hd, capacity = 8, 2, 64, length + 20
    keys = np.stack([clustered_keys(rng, capacity, hd) for _ in range(kv_heads)])
    values = rng.standard_normal((kv_heads, capacity, hd)).astype(np.float32)
    stored = values.astype(np.float16).view(np.uint16) if half else values
    values = stored.view(np.float16).astype(np.float32) if half else values
    bands = band_of(length - 1, 8) + 1
    books = np.stack([np.stack([fit_codebooks(keys[k, band_start(b):min(length, band_start(b + 1))], d_sub, seed=b)
                                for b in range(bands)]) for k in range(kv_heads)])
    assert bands == (3 if length > 1024 else 1)
    codes = np.zeros((kv_heads, -(-capacity // 64), hd // (2 * d_sub), 64), np.uint8)
    encode_keys_into(keys, books, codes, 0)
    exact_keys = np.zeros((kv_heads, EXACT_SLOTS, hd), np.float32)
    for p in range(length):  # as the model keeps them: the ring ends up with the last RECENT_KEYS
        keep_exact_key(exact_keys, keys, p, p)
    q = (0.5 * rng.standard_normal(heads * hd)).astype(np.float32)
    s = hd // d_sub
    out = np.empty_like(q)
    attend_one_lut(q, books, codes, exact_keys, stored, length, np.zeros((heads, s, 64), np.uint8),
                   np.zeros((heads, codes.shape[1] * 64), np.uint16), np.zeros((heads, capacity), np.float32), out)
    # The exact attention over the keys the codes stand for: only the tables' 8-bit rounding
    # remains, so they agree closely.
    decoded = decode_keys(keys[:, :length], books)
    expected = ref.causal_attention(q.reshape(heads, 1, hd), decoded, values[:, :length], length - 1)
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
        r = edgeinfer_cli("calibrate", str(tiny_single), "-f", str(text), "-o", str(out), "--d-sub", "2", "-c", "64",
                          "--span", "64")
        assert r.returncode == 0, r.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes()  # seeded: the same text gives the same file
    source = open_model(str(outs[0]))
    books = source.key_codebooks()
    c = source.config
    assert books.d_sub == 2 and len(books.layers) == c.num_layers
    assert books.layers[0].shape == (c.num_kv_heads, 1, c.head_dim // 2, 16, 2)  # --span 64: one band
    assert "LUT codebooks: d_sub 2" in edgeinfer_cli("info", str(outs[0])).stdout
    # The codes stand for the model's own keys far better than their mean does.
    engine = open_engine(str(outs[0]), 64, float32=True)
    keys, positions = collect_keys(engine.model, engine.tokenizer.encode(text.read_text(), add_bos=False), 64, 512)
    assert positions.min() == SINK_KEYS and positions.max() == 63  # the sinks score exactly: left out
    for layer, layer_keys in enumerate(keys):
        for head, k in enumerate(layer_keys):
            book = books.layers[layer][head, 0]
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


def test_encoding_in_the_cache_picks_the_nearest_centroids_of_the_positions_band():
    rng = np.random.default_rng(5)
    keys = np.stack([clustered_keys(rng, 700, 32) for _ in range(2)])
    books = np.stack([np.stack([fit_codebooks(keys[k, :512], 2), fit_codebooks(keys[k, 512:], 2)]) for k in range(2)])
    codes = np.zeros((2, 11, 8, 64), np.uint8)
    encode_keys_into(keys[:, :130], books, codes, 0)  # a prompt, then tokens one by one, across the band's edge
    for p in range(130, 700):
        encode_keys_into(keys[:, p:p + 1], books, codes, p)
    for k in range(2):
        expected = np.concatenate([encode_keys(keys[k, :512], books[k, 0]), encode_keys(keys[k, 512:], books[k, 1])])
        assert (codes[k] == pack_codes(expected, 704)).mean() > 0.99  # float ties may fall either way


def test_bands_are_octaves_after_the_first():
    assert [band_start(b) for b in range(5)] == [0, 512, 1024, 2048, 4096]
    positions = (0, 511, 512, 1023, 1024, 2047, 2048, 4095, 4096, 100_000)
    assert [band_of(p, 5) for p in positions] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert band_of(100_000, 2) == 1 and [bands_for(n) for n in (64, 512, 513, 8192, 8193)] == [1, 1, 2, 5, 6]


def test_lut_prefill_and_decode_agree_and_track_exact(calibrated):
    from edgeinfer.model import Model
    from edgeinfer.storage import open_model

    _, path = calibrated
    lut, exact = Model(open_model(str(path)), True, attention="lut"), Model(open_model(str(path)), True)
    for n in (40, 160):  # 40: every key within the exactly scored slots; 160: most by lookups
        ids = np.arange(3, 3 + n)
        whole = lut.new_cache(168)
        prefilled = lut.forward(ids, whole, all_logits=True)
        cache = lut.new_cache(168)
        lut.forward(ids[:-10], cache)
        stepped = np.stack([lut.forward(ids[i:i + 1], cache) for i in range(n - 10, n)])  # the fused decode step
        # The decode step keeps what the prefill keeps: the same codes, the same float keys in the ring.
        for layer in range(lut.config.num_layers):
            np.testing.assert_array_equal(cache.lut[layer][1], whole.lut[layer][1])
            np.testing.assert_allclose(cache.k[layer], whole.k[layer], atol=1e-5 * np.abs(whole.k[layer]).max())
        reference = exact.forward(ids, exact.new_cache(168), all_logits=True)
        if n < EXACT_SLOTS:
            np.testing.assert_allclose(stepped, prefilled[-10:], atol=2e-3 * np.abs(prefilled).max())
        else:
            # A query that differs from the prefill's in its last bits (GEMV vs GEMM) can round a
            # table entry the other way, a step of the 8-bit table: the two still agree far within
            # the approximation's own error.
            assert np.abs(stepped - prefilled[-10:]).mean() < 0.05 * np.abs(prefilled - reference).mean()
        # The approximation follows the exact logits: its error is a fraction of how much they vary.
        # (Quality on a real model is perplexity's to judge: bench/RESULTS.md.)
        assert np.abs(prefilled - reference).mean() < 0.5 * reference.std()


def test_caches_hold_what_the_memory_plan_counts(calibrated):
    """A LUT cache keeps codes, fp16 values and the exactly scored float keys only; exact attention
    keeps fp16 keys and values (the default cache type), float32 ones with --cache-type f32 or on the
    float32 path."""
    from edgeinfer.errors import EdgeInferError
    from edgeinfer.kv_cache import KVCache, cache_bytes
    from edgeinfer.model import Model
    from edgeinfer.run_path import choose_path
    from edgeinfer.storage import open_model

    _, path = calibrated
    source = open_model(str(path))
    for attention in ("exact", "lut"):
        model = Model(open_model(str(path)), True, attention=attention)
        cache = model.new_cache(200)
        held = cache.nbytes + sum(lut[1].nbytes for lut in cache.lut)
        assert cache.v[0].dtype == np.uint16 and cache.k[0].dtype == (np.float32 if attention == "lut" else np.uint16)
        assert held == cache_bytes(source, 200, choose_path(source, True, attention))
        assert cache.k[0].shape[1] == (200 if attention == "exact" else EXACT_SLOTS)
    f32 = Model(open_model(str(path)), True, cache_type="f32").new_cache(200)
    assert f32.k[0].dtype == f32.v[0].dtype == np.float32
    assert f32.nbytes == cache_bytes(source, 200, choose_path(source, True, cache_type="f32"))
    assert cache_bytes(source, 200, choose_path(source, False)) == KVCache.size(model.config, 200, "f32", None) == \
        Model(open_model(str(path)), False).new_cache(200).nbytes
    with pytest.raises(EdgeInferError, match="4/8-bit path"):  # the float path has no LUT attention
        choose_path(source, False, "lut")


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


def test_spread_keys_move_a_key_to_where_rope_would_put_it():
    from edgeinfer.calibrate import spread_keys

    rng = np.random.default_rng(5)
    inv_freq = 1.0 / (1e5 ** (np.arange(0, 64, 2) / 64))
    raw = rng.standard_normal((2, 50, 64)).astype(np.float32)  # before RoPE
    positions, targets = rng.integers(0, 512, 50), rng.integers(0, 8192, 50)
    at = lambda p: ref.apply_rope(raw, *ref.rope_tables(ref.rope_of(inv_freq), p))  # noqa: E731
    np.testing.assert_allclose(spread_keys(at(positions), positions, targets, ref.rope_of(inv_freq)), at(targets),
                               atol=1e-4)
