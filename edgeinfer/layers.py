"""Linear layers the forward pass calls alike: dense float32, or 4/8-bit weights with int8 activations."""

from __future__ import annotations

import numpy as np

from .kernels.activations import quantize_activations
from .kernels.reference import linear
from .kernels.scales import activation_span
from .kernels.simd import FIXED_BITS
from .run_path import quantizable_at_load
from .storage.quantize import Matrix, quantize_q4_1, quantize_q8_0
from .storage.source import WeightSource
from .storage.tensor_names import ENDS


class DenseLinear:
    bits = 32

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: np.ndarray, held: dict | None = None) -> np.ndarray:
        return linear(x, self.weight, self.bias)

    def partial(self, x: np.ndarray) -> np.ndarray:
        """float32: a cluster adds these partials in node order."""
        return linear(x, self.weight, self.bias)

    def zero_partial(self, count: int) -> np.ndarray:
        """The partial of a node that holds none of the input columns."""
        return np.zeros((count, self.weight.shape[0]), np.float32)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the weight: an embedding lookup (a tied head is its embedding)."""
        return self.weight[ids]


class QuantLinear:
    """y = x W^T for a batch of tokens with the matrix's VNNI GEMM, activations quantised to int8.
    (The decode step does not come here: kernels/decode_layer.py runs whole layers.)"""

    def __init__(self, matrix: Matrix, bias: np.ndarray | None):
        self.matrix, self.bias, self.bits = matrix, bias, matrix.bits

    def __call__(self, x: np.ndarray, held: dict | None = None) -> np.ndarray:
        out = self.matrix.matmul(self.quantize(x, held), np.empty((x.shape[0], self.matrix.rows), np.float32))
        return out + self.bias if self.bias is not None else out

    def partial(self, x: np.ndarray) -> np.ndarray:
        """x W^T as fixed-point sums (int64, kernels/simd.py), for a product whose columns a cluster
        splits over its nodes (o_proj, down_proj): the nodes' partials add up exactly to this."""
        out = self.matrix.matmul(self.quantize(x), np.empty((x.shape[0], self.matrix.rows), np.int64))
        if self.bias is not None:
            out += np.round(self.bias.astype(np.float64) * 2.0 ** FIXED_BITS).astype(np.int64)
        return out

    def quantize(self, x: np.ndarray, held: dict | None = None):
        """x as int8, a scale per 32 values or, for a K-quant, per 256 (as llama.cpp's Q8_K).
        `held`: the quantisations of this x made so far, by span (apply_each), added to here."""
        span = activation_span(self.matrix.scales)
        if held is None:
            return quantize_activations(x, span=span)
        if span not in held:
            held[span] = quantize_activations(x, span=span)
        return held[span]

    def zero_partial(self, count: int) -> np.ndarray:
        return np.zeros((count, self.matrix.rows), np.int64)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.matrix.dequantize(ids)


Linear = DenseLinear | QuantLinear


def apply_each(x: np.ndarray, *linears: Linear) -> list[np.ndarray]:
    """Each of `linears` applied to x (q, k, v; gate, up), x quantised once per activation span
    they take, as the decode step does, not once per matrix."""
    held: dict = {}
    return [lin(x, held) for lin in linears]


def owned(a: np.ndarray | None) -> np.ndarray | None:
    """A norm or bias vector as an array of the process's own: a read-only view of a mapped file is
    copied (a few KB). Numba types read-only arrays apart from writable ones, so the kernels that take
    these vectors compile once, whichever source (file mapped, read, or streamed) they come from."""
    return a if a is None or a.flags.writeable else a.copy()


def load_linear(source: WeightSource, name: str, quantized: bool, load_bits: int | None = None) -> DenseLinear | QuantLinear:
    """`name` (a `.weight`) and its bias: run in 4 or 8 bits when asked and the file stores it so,
    or, with `load_bits`, quantized now from the floats the file stores (one tensor at a time: no
    float32 copy of the model; the embedding and head take 8 bits); otherwise dense float32."""
    bias_name = name[:-len("weight")] + "bias"
    bias = owned(source.float32(bias_name)) if source.has(bias_name) else None
    matrix = source.quantized(name) if quantized else None
    if matrix is None and quantized and load_bits and quantizable_at_load(source, name):
        w = source.float32(name)
        matrix = quantize_q4_1(w) if load_bits == 4 and name not in ENDS else quantize_q8_0(w)
    return DenseLinear(source.float32(name), bias) if matrix is None else QuantLinear(matrix, bias)
