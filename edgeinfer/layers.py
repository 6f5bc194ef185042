"""Linear layers the forward pass calls alike: dense float32, or 4-bit weights with int8 activations."""

from __future__ import annotations

import numpy as np

from .kernels.q4 import Q4Matrix, Q8Activations, gemv, quantize_activations
from .kernels.reference import linear
from .storage.source import WeightSource


class DenseLinear:
    bits = 32

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return linear(x, self.weight, self.bias)


class Q4Linear:
    """y = W x per token with the VNNI GEMV; activations are quantised into buffers made once."""

    bits = 4

    def __init__(self, matrix: Q4Matrix, bias: np.ndarray | None):
        self.matrix, self.bias = matrix, bias
        self._xq = Q8Activations.empty(matrix.cols)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], self.matrix.rows), np.float32)
        for t in range(x.shape[0]):  # prefill runs token by token until the GEMM exists
            gemv(self.matrix, quantize_activations(x[t], self._xq), out[t])
        return out + self.bias if self.bias is not None else out


def load_linear(source: WeightSource, name: str, quantized: bool) -> DenseLinear | Q4Linear:
    """`name` (a `.weight`) and its bias; 4-bit when asked and the file holds it in a 4-bit type."""
    bias_name = name[:-len("weight")] + "bias"
    bias = source.float32(bias_name) if source.has(bias_name) else None
    blocks = source.quantized(name) if quantized else None
    if blocks is not None:
        data, kind = blocks
        return Q4Linear(Q4Matrix.from_gguf(data, source.stored_shape(name)[1], kind), bias)
    return DenseLinear(source.float32(name), bias)
