"""The 4-bit GEMV equals the numpy reference of the same computation; GGUF Q4_0/Q4_1 import losslessly."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.kernels.activations import quantize_activations
from edgeinfer.kernels.q4 import Q4Matrix, gemm, gemv, gemv_reference
from edgeinfer.kernels.simd import has_kernels
from edgeinfer.storage.gguf_quants import gguf_matrix


def random_q4(rng, rows: int, cols: int, with_min: bool) -> Q4Matrix:
    minima = (rng.standard_normal((rows, cols // 32)) * 0.05).astype(np.float32) if with_min else None
    return Q4Matrix.from_rows(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                              (rng.random((rows, cols // 32)) * 0.02).astype(np.float32), minima)


def test_this_machine_has_the_kernels_instructions():
    # these machines are AVX-512 VNNI (Zen 4) or AVX2 (Zen 3): the kernels must run on both
    assert has_kernels()


@pytest.mark.parametrize("with_min", [False, True], ids=["q4_0", "q4_1"])
@pytest.mark.parametrize("rows,cols", [(4, 128), (7, 256), (64, 4096), (129, 1536), (3, 11008), (9, 576), (5, 96)])
def test_gemv_equals_the_reference(rows, cols, with_min):
    rng = np.random.default_rng(rows * cols + with_min)
    m = random_q4(rng, rows, cols, with_min)
    x = quantize_activations(rng.standard_normal(cols).astype(np.float32))
    out = gemv(m, x, np.empty(rows, np.float32))
    ref = gemv_reference(m, x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=np.abs(ref).max() * 3e-6)


@pytest.mark.parametrize("with_min", [False, True], ids=["q4_0", "q4_1"])
def test_gemv_approximates_the_float_product(with_min):
    rng = np.random.default_rng(1)
    m = random_q4(rng, 256, 1024, with_min)
    xf = rng.standard_normal(1024).astype(np.float32)
    out = gemv(m, quantize_activations(xf), np.empty(256, np.float32))
    exact = m.dequantize().astype(np.float64) @ xf
    assert np.abs(out - exact).max() / np.abs(exact).max() < 2e-2  # int8 activations, per 32-group


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_import_is_lossless(kind):
    import gguf

    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 576)).astype(np.float32)
    qt = gguf.GGMLQuantizationType[kind]
    blocks = gguf.quants.quantize(w, qt)
    m = gguf_matrix(kind, blocks, 576)
    np.testing.assert_array_equal(m.dequantize(), gguf.quants.dequantize(blocks, qt).reshape(48, 576))


def test_interleaving_round_trips():
    rng = np.random.default_rng(3)
    halves = lambda: rng.random((7, 18)).astype(np.float16).astype(np.float32)  # noqa: E731 (stored as fp16)
    qs, sc, mn = rng.integers(0, 256, (7, 288), dtype=np.uint8), halves(), halves()
    back = Q4Matrix.from_rows(qs, sc, mn).row_major()
    for a, b in zip(back, (qs, sc, mn)):
        np.testing.assert_array_equal(a, b)


def test_rows_must_hold_whole_groups():
    with pytest.raises(ValueError, match="multiple of 32"):
        Q4Matrix.from_rows(np.zeros((2, 40), np.uint8), np.ones((2, 2), np.float32))


@pytest.mark.real_model
def test_smollm2_q4_1_weights_import_losslessly(smollm2_gguf):
    """Every Q4_1 tensor of the real model, in its file row order, dequantises to exactly gguf's values."""
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf))
    tensors = [t for t in reader.tensors if t.tensor_type.name == "Q4_1"]
    assert len(tensors) == 210
    for t in tensors:
        rows, cols = int(t.shape[1]), int(t.shape[0])
        m = gguf_matrix("Q4_1", np.asarray(t.data), cols)
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(rows, cols)
        np.testing.assert_array_equal(m.dequantize(), expected, err_msg=t.name)


def test_activation_quantisation_matches_its_definition():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(576) * rng.random(576) * 10).astype(np.float32)
    x[32:64] = 0  # an all-zero group
    q = quantize_activations(x)
    groups = np.zeros(640, np.float32)
    groups[:576] = x
    groups = groups.reshape(-1, 32)
    d = np.abs(groups).max(axis=1) / 127
    d[d == 0] = 1
    expected = np.round(groups / d[:, None])
    np.testing.assert_array_equal(q.int8(), expected)
    np.testing.assert_allclose(q.scales, d, rtol=1e-7)
    np.testing.assert_allclose(q.sums, d * expected.sum(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(q.starts, -8 * expected.sum(axis=1))  # where a Q4_0 group's dot starts
    again = quantize_activations(x * 2, q)  # refills the same buffers
    assert again is q and np.array_equal(q.int8(), expected)


def test_parallel_and_serial_kernels_agree(monkeypatch):
    from edgeinfer.kernels import q4

    rng = np.random.default_rng(5)
    m = random_q4(rng, 129, 1536, True)
    x = quantize_activations(rng.standard_normal(1536).astype(np.float32))
    serial = gemv(m, x, np.empty(129, np.float32))
    monkeypatch.setattr(q4, "PARALLEL_MIN_BYTES", 0)
    np.testing.assert_array_equal(gemv(m, x, np.empty(129, np.float32)), serial)


@pytest.mark.parametrize("tokens", [1, 3, 4, 9, 64])
@pytest.mark.parametrize("with_min", [False, True], ids=["q4_0", "q4_1"])
def test_gemm_equals_the_gemv_token_by_token(tokens, with_min):
    rng = np.random.default_rng(tokens)
    m = random_q4(rng, 70, 576, with_min)
    x = rng.standard_normal((tokens, 576)).astype(np.float32)
    out = gemm(m, quantize_activations(x), np.empty((tokens, 70), np.float32))
    for t in range(tokens):
        np.testing.assert_array_equal(out[t], gemv(m, quantize_activations(x[t]), np.empty(70, np.float32)))


def test_fixed_point_sums_become_float32_rounded_once():
    """from_fixed: each int64 sum to float64 (exact below 2**53), times 2**-FIXED_BITS (exact), then
    rounded to float32 once: numpy's own arithmetic, in any shape."""
    from edgeinfer.kernels.simd import FIXED_SCALE, from_fixed

    sums = np.random.default_rng(9).integers(-2**55, 2**55, (7, 300))
    for a in (sums, sums[3], sums[:, ::2]):
        got = from_fixed(a)
        assert got.dtype == np.float32 and got.shape == a.shape
        np.testing.assert_array_equal(got, (a.astype(np.float64) * FIXED_SCALE).astype(np.float32))


@pytest.mark.parametrize("with_min", [False, True], ids=["q4_0", "q4_1"])
@pytest.mark.parametrize("cuts", [(192, 384), (32, 1504), (640,), (96, 224, 800, 1248)])
def test_fixed_point_sums_are_the_same_over_any_split_of_the_groups(with_min, cuts):
    """An int64 output makes the kernels sum in fixed point: the whole matrix's sums equal, bit for
    bit, the sums of its column pieces (a cluster's partials, pieces not on 128-column chunks too),
    in GEMV and GEMM, and they stand for the same product as the float kernel's."""
    from edgeinfer.kernels.simd import from_fixed

    rng = np.random.default_rng(len(cuts) + with_min)
    rows, cols = 37, 1536
    m = random_q4(rng, rows, cols, with_min)
    x = rng.standard_normal((5, cols)).astype(np.float32)
    whole = gemm(m, quantize_activations(x), np.empty((5, rows), np.int64))
    edges = (0, *cuts, cols)
    pieces = [(m.select(slice(None), slice(a, b)), slice(a, b)) for a, b in zip(edges, edges[1:])]
    split = sum(gemm(p, quantize_activations(x[:, c]), np.empty((5, rows), np.int64)) for p, c in pieces)
    np.testing.assert_array_equal(split, whole)
    for t in range(5):
        xt = quantize_activations(x[t])
        np.testing.assert_array_equal(gemv(m, xt, np.empty(rows, np.int64)), whole[t])
        ref = gemv_reference(m, xt)
        np.testing.assert_allclose(from_fixed(whole[t]), ref, rtol=0, atol=np.abs(ref).max() * 3e-6)
        split_gemv = sum(gemv(p, quantize_activations(x[t, c]), np.empty(rows, np.int64)) for p, c in pieces)
        np.testing.assert_array_equal(split_gemv, whole[t])
