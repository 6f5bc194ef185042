"""WeightSource: what the model reads weights from. Tensor names are Hugging Face's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..kernels.q4 import Q4Matrix
from ..kernels.q8 import Q8Matrix
from ..tokenizer import TokenizerSpec
from .safetensors import PAD_PREFIX, SafetensorsFile

ROPE_FREQS = "rope_freqs.weight"  # optional per-pair RoPE divisors (GGUF's Llama-3 scaling)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


EMBEDDING, HEAD, LUT = "embedding", "head", "lut"  # the units besides the layers


def unit_of(name: str) -> int | str:
    """Which unit a model tensor belongs to: the embedding, layer i, the head (final norm, output
    matrix and RoPE factors) or LUT attention's codebooks. A unit is stored contiguously and read as one."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    if name.startswith("lut."):
        return LUT
    return EMBEDDING if name == "model.embed_tokens.weight" else HEAD


def codebook_name(layer: int) -> str:
    return f"lut.layers.{layer}.key_codebooks"


@dataclass(frozen=True)
class KeyCodebooks:
    """LUT attention's codebooks: per layer (kv_heads, bands, head_dim / d_sub, 16, d_sub) float32, a
    codebook per band of positions (kernels/lut_attention.py)."""

    d_sub: int
    layers: list[np.ndarray]


def llama_tensor_shapes(c: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor a Llama-family model needs, in file order: layer by layer, each layer contiguous."""
    d, f = c.hidden_size, c.intermediate_size
    if not c.layers_only:
        yield "model.embed_tokens.weight", (c.vocab_size, d)
    for i in range(c.num_layers):
        p = layer_prefix(i)
        yield p + "input_layernorm.weight", (d,)
        for proj, rows in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
            yield p + f"self_attn.{proj}.weight", (rows, d)
            if c.attention_bias:
                yield p + f"self_attn.{proj}.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (d, c.q_size)
        yield p + "post_attention_layernorm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (f, d)
        yield p + "mlp.up_proj.weight", (f, d)
        yield p + "mlp.down_proj.weight", (d, f)
        if c.mlp_bias:
            yield p + "mlp.gate_proj.bias", (f,)
            yield p + "mlp.up_proj.bias", (f,)
            yield p + "mlp.down_proj.bias", (d,)
    yield "model.norm.weight", (d,)
    if not c.tie_embeddings and not c.layers_only:
        yield "lm_head.weight", (c.vocab_size, d)


class WeightSource:
    """A model's config, tokenizer and tensors, whatever file they came from."""

    config: ModelConfig
    tokenizer: TokenizerSpec
    path: str
    format: str  # "gguf", "hf", "edgeinfer"

    def names(self) -> list[str]:
        raise NotImplementedError

    def stored_type(self, name: str) -> str:
        """The tensor's type as the file stores it (F32, BF16, Q4_1, ...)."""
        raise NotImplementedError

    def stored_shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def float32(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def storable_type(self, name: str) -> str:
        """The safetensors dtype that keeps this tensor's values exactly (for conversion)."""
        return "F32"

    def storable(self, name: str) -> np.ndarray:
        """The tensor's data in storable_type (BF16 as uint16)."""
        return self.float32(name)

    def quantized(self, name: str) -> Q4Matrix | Q8Matrix | None:
        """The tensor as the 4/8-bit kernels take it, if the file stores it as Q4_0, Q4_1 or Q8_0."""
        return None

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def key_codebooks(self) -> KeyCodebooks | None:
        """LUT attention's codebooks, if the file holds them (edgeinfer calibrate)."""
        return None

    def file_size(self) -> int:
        raise NotImplementedError

    def model_tensor_names(self) -> list[str]:
        """The tensors the model uses, in file order, after checking each is present with its shape."""
        names = set(self.names())
        order = []
        for name, shape in llama_tensor_shapes(self.config):
            if name not in names:
                raise ModelFormatError(f"{self.path}: tensor {name} is missing")
            if tuple(self.stored_shape(name)) != shape:
                raise ModelFormatError(f"{self.path}: tensor {name} has shape {tuple(self.stored_shape(name))}, "
                                       f"expected {shape}")
            order.append(name)
        if ROPE_FREQS in names:
            order.append(ROPE_FREQS)
        return order

    def close(self) -> None:
        pass


class SafetensorsSource(WeightSource):
    """Tensors from one or more safetensors files (a HF folder's shards, or edgeinfer's single file)."""

    def __init__(self, path: str, fmt: str, files: list[SafetensorsFile], config: ModelConfig,
                 tokenizer: TokenizerSpec):
        self.path, self.format, self.config, self.tokenizer = path, fmt, config, tokenizer
        self._files = files
        self._where = {name: f for f in files for name in f.entries}

    def names(self) -> list[str]:
        return [n for n in self._where if not n.startswith(PAD_PREFIX)]

    def stored_type(self, name: str) -> str:
        return self._where[name].entries[name].dtype

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].entries[name].shape

    def float32(self, name: str) -> np.ndarray:
        return self._where[name].float32(name)

    def storable_type(self, name: str) -> str:
        return self.stored_type(name)

    def storable(self, name: str) -> np.ndarray:
        return self._where[name].array(name)

    def has(self, name: str) -> bool:
        return name in self._where

    def file_size(self) -> int:
        return sum(os.path.getsize(f.path) for f in self._files)

    def close(self) -> None:
        for f in self._files:
            f.close()
