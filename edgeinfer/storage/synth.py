"""Random-weight models with real shapes, for memory and speed tests (never for quality).

`synth` writes edgeinfer's single file tensor by tensor through the converter: the matrices are
made directly in the kernels' layout from random bytes (nothing float, nothing whole in memory),
with small fp16 scales so the activations stay finite. The tokenizer is byte-level BPE over the 256
bytes, no merges, so the file runs end to end.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from ..config import ModelConfig
from ..errors import EdgeInferError
from ..kernels.q4 import Q4Matrix
from ..kernels.q8 import Q8Matrix
from ..tokenizer import TokenizerSpec
from .source import WeightSource
from .tensor_names import ENDS, model_tensor_shapes

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, rope theta
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, 10000.0),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000, 10000.0),
    "llama2-70b": (8192, 28672, 80, 64, 8, 32000, 10000.0),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0),
}


def synth_config(shape: str) -> ModelConfig:
    if shape not in SHAPES:
        raise EdgeInferError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    hidden, ffn, layers, heads, kv_heads, vocab, theta = SHAPES[shape]
    return ModelConfig("llama", hidden, ffn, layers, heads, kv_heads, hidden // heads, vocab, 4096, 1e-5, theta)


def byte_tokenizer() -> TokenizerSpec:
    """Byte-level BPE over the 256 bytes (GPT-2's byte alphabet), no merges, and an end token."""
    alphabet = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = dict(zip(alphabet, alphabet)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    vocab = {chr(chars[b]): b for b in range(256)}
    data = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 256, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                                  "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {**vocab, "</s>": 256}, "merges": []}}
    return TokenizerSpec("hf", json.dumps(data).encode(), None, (256,), False)


class SynthSource(WeightSource):
    """Random tensors of a real shape, made when asked: 4-bit (Q4_0) or 8-bit (Q8_0) matrices, unit norms."""

    def __init__(self, shape: str, bits: int, seed: int = 0):
        if bits not in (4, 8):
            raise EdgeInferError(f"synth writes 4- or 8-bit models, got --bits {bits}")
        self.config, self.tokenizer = synth_config(shape), byte_tokenizer()
        self.path, self.format, self.bits, self.seed = f"synth:{shape}", "synth", bits, seed
        self._shapes = dict(model_tensor_shapes(self.config))

    def names(self) -> list[str]:
        return list(self._shapes)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def stored_type(self, name: str) -> str:
        if len(self._shapes[name]) == 1:
            return "F32"
        return "Q8_0" if self.bits == 8 or name in ENDS else "Q4_0"

    def file_size(self) -> int:
        return 0

    def float32(self, name: str) -> np.ndarray:
        matrix = self.quantized(name)
        return np.ones(self._shapes[name], np.float32) if matrix is None else matrix.dequantize()

    def quantized(self, name: str) -> Q4Matrix | Q8Matrix | None:
        kind = self.stored_type(name)
        if kind == "F32":
            return None
        rows, cols = self._shapes[name]
        rng = np.random.default_rng([self.seed, sum(map(ord, name)), len(name)])
        packed_shape, (blocks, groups) = (Q4Matrix.array_shapes(rows, cols) if kind == "Q4_0"
                                          else Q8Matrix.array_shapes(rows, cols, 32))
        packed = np.frombuffer(rng.bytes(packed_shape[0] * packed_shape[1]), np.uint8).reshape(packed_shape)
        # Steps such that a row's products stay near unit size whatever its width.
        scale = (0.5 if kind == "Q4_0" else 0.06) / np.sqrt(cols)
        scales = (rng.random((blocks, groups), np.float32) * scale + scale / 2).astype(np.float16).view(np.uint16)
        if kind == "Q8_0":
            return Q8Matrix(packed, scales, scales, -128.0, rows, cols)
        return Q4Matrix(packed, scales, scales, -8.0, rows, cols)


def synth(shape: str, bits: int, out_path: str, progress: Callable[[int, int], None] | None = None) -> None:
    from .single import convert

    convert(SynthSource(shape, bits), out_path, progress, bits=bits)
