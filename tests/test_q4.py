"""The 4-bit GEMV: equal to the numpy reference of the same integer computation; GGUF Q4_0 lossless."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.kernels.q4 import Q4Matrix, gemv, gemv_reference, quantize_activations
from edgeinfer.kernels.simd import has_avx512_vnni


def random_q4(rng, rows: int, cols: int) -> Q4Matrix:
    return Q4Matrix.from_rows(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                              (rng.random((rows, cols // 32)) * 0.02).astype(np.float32))


def test_this_machine_has_the_kernels_instructions():
    # CI and the developers' machines are AVX-512 VNNI; the portable path is still to come (issue 3).
    assert has_avx512_vnni()


@pytest.mark.parametrize("rows,cols", [(4, 128), (7, 256), (64, 4096), (129, 1536), (3, 11008)])
def test_gemv_equals_the_integer_reference(rows, cols):
    rng = np.random.default_rng(rows * cols)
    m = random_q4(rng, rows, cols)
    x = quantize_activations(rng.standard_normal(cols).astype(np.float32))
    out = gemv(m, x, np.empty(rows, np.float32))
    ref = gemv_reference(m, x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=np.abs(ref).max() * 2e-6)


def test_gemv_approximates_the_float_product():
    rng = np.random.default_rng(1)
    m = random_q4(rng, 256, 1024)
    xf = rng.standard_normal(1024).astype(np.float32)
    out = gemv(m, quantize_activations(xf), np.empty(256, np.float32))
    exact = m.dequantize().astype(np.float64) @ xf
    assert np.abs(out - exact).max() / np.abs(exact).max() < 2e-2  # int8 activations, per 32-group


def test_gguf_q4_0_import_is_lossless():
    import gguf

    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 384)).astype(np.float32)
    blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    m = Q4Matrix.from_gguf_q4_0(blocks, 384)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0).reshape(48, 384)
    np.testing.assert_array_equal(m.dequantize(), expected)


def test_interleaving_round_trips():
    rng = np.random.default_rng(3)
    qs = rng.integers(0, 256, (7, 256), dtype=np.uint8)
    sc = rng.random((7, 16)).astype(np.float32)
    back = Q4Matrix.from_rows(qs, sc).row_major()
    np.testing.assert_array_equal(back[0], qs)
    np.testing.assert_array_equal(back[1], sc)


def test_columns_must_fill_whole_chunks():
    with pytest.raises(ValueError, match="multiple of 128"):
        Q4Matrix.from_gguf_q4_0(np.zeros((2, 18 * 18), np.uint8), 576)
