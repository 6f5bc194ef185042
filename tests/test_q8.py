"""The 8-bit GEMV (output head) equals the numpy reference; GGUF Q8_0 imports losslessly."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.kernels.activations import quantize_activations
from edgeinfer.kernels.q8 import gemm8, gemv8, gemv8_reference
from edgeinfer.storage.gguf_quants import gguf_matrix


def q8_blocks(rng, rows: int, cols: int) -> np.ndarray:
    import gguf

    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)


@pytest.mark.parametrize("rows,cols", [(4, 64), (7, 576), (130, 1536), (3, 96)])
def test_gemv8_equals_the_reference(rows, cols):
    rng = np.random.default_rng(rows + cols)
    m = gguf_matrix("Q8_0", q8_blocks(rng, rows, cols), cols)
    x = quantize_activations(rng.standard_normal(cols).astype(np.float32))
    ref = gemv8_reference(m, x)
    np.testing.assert_allclose(gemv8(m, x, np.empty(rows, np.float32)), ref, rtol=0,
                               atol=np.abs(ref).max() * 3e-6)


def test_q8_0_import_is_lossless():
    import gguf

    rng = np.random.default_rng(7)
    blocks = q8_blocks(rng, 9, 576)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(9, 576)
    np.testing.assert_array_equal(gguf_matrix("Q8_0", blocks, 576).dequantize(), expected)


def test_parallel_and_serial_agree(monkeypatch):
    from edgeinfer.kernels import q8

    rng = np.random.default_rng(8)
    m = gguf_matrix("Q8_0", q8_blocks(rng, 77, 640), 640)
    x = quantize_activations(rng.standard_normal(640).astype(np.float32))
    serial = gemv8(m, x, np.empty(77, np.float32))
    monkeypatch.setattr(q8, "PARALLEL_MIN_BYTES", 0)
    np.testing.assert_array_equal(gemv8(m, x, np.empty(77, np.float32)), serial)


def test_row_lookup_equals_full_dequantisation():
    from edgeinfer.kernels.q4 import Q4Matrix

    rng = np.random.default_rng(9)
    m8 = gguf_matrix("Q8_0", q8_blocks(rng, 13, 96), 96)
    m4 = Q4Matrix.from_rows(rng.integers(0, 256, (13, 48), dtype=np.uint8), rng.random((13, 3)).astype(np.float32),
                            rng.random((13, 3)).astype(np.float32))
    ids = np.array([12, 0, 5, 5, 7])
    for m in (m8, m4):
        np.testing.assert_array_equal(m.dequantize(ids), m.dequantize()[ids])


def test_both_kernels_refuse_activations_of_another_width():
    from edgeinfer.kernels.q4 import Q4Matrix, gemv

    rng = np.random.default_rng(10)
    m8 = gguf_matrix("Q8_0", q8_blocks(rng, 4, 576), 576)
    m4 = Q4Matrix.from_rows(rng.integers(0, 256, (4, 288), dtype=np.uint8), np.ones((4, 18), np.float32))
    wrong = quantize_activations(np.ones(1536, np.float32))
    with pytest.raises(ValueError, match="columns"):
        gemv8(m8, wrong, np.empty(4, np.float32))
    with pytest.raises(ValueError, match="columns"):
        gemv(m4, wrong, np.empty(4, np.float32))


@pytest.mark.parametrize("tokens", [1, 5])
def test_gemm8_equals_the_gemv_token_by_token(tokens):
    rng = np.random.default_rng(9)
    m = gguf_matrix("Q8_0", q8_blocks(rng, 33, 576), 576)
    x = rng.standard_normal((tokens, 576)).astype(np.float32)
    out = gemm8(m, quantize_activations(x), np.empty((tokens, 33), np.float32))
    for t in range(tokens):
        np.testing.assert_array_equal(out[t], gemv8(m, quantize_activations(x[t]), np.empty(33, np.float32)))


def test_fixed_point_sums_are_the_same_over_any_split_of_the_groups():
    """As in 4 bits: with an int64 output the pieces' sums add up to the whole matrix's exactly."""
    from edgeinfer.kernels.simd import from_fixed

    rng = np.random.default_rng(11)
    m = gguf_matrix("Q8_0", q8_blocks(rng, 21, 576), 576)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    whole = gemm8(m, quantize_activations(x), np.empty((3, 21), np.int64))
    edges = (0, 96, 160, 576)
    split = sum(gemm8(m.select(slice(None), slice(a, b)), quantize_activations(x[:, a:b]), np.empty((3, 21), np.int64))
                for a, b in zip(edges, edges[1:]))
    np.testing.assert_array_equal(split, whole)
    for t in range(3):
        xt = quantize_activations(x[t])
        np.testing.assert_array_equal(gemv8(m, xt, np.empty(21, np.int64)), whole[t])
        ref = gemv8_reference(m, xt)
        np.testing.assert_allclose(from_fixed(whole[t]), ref, rtol=0, atol=np.abs(ref).max() * 3e-6)
