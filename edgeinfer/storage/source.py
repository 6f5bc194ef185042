"""WeightSource: what the model reads weights from. Tensor names are Hugging Face's."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..tokenizer import TokenizerSpec
from .quantize import Matrix
from .safetensors import PAD_PREFIX, SafetensorsFile
from .tensor_names import ROPE_FREQS, model_tensor_shapes


@dataclass(frozen=True)
class KeyCodebooks:
    """LUT attention's codebooks: per layer (kv_heads, bands, head_dim / d_sub, 16, d_sub) float32, a
    codebook per band of positions (kernels/lut_attention.py)."""

    d_sub: int
    layers: list[np.ndarray]


class WeightSource:
    """A model's config, tokenizer and tensors, whatever file they came from."""

    config: ModelConfig
    tokenizer: TokenizerSpec
    path: str
    format: str  # "gguf", "hf", "edgeinfer"
    can_stream = False  # whether layers can be read one unit at a time (storage/units.py): the single file

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

    def quantized(self, name: str) -> Matrix | None:
        """The tensor as the 4/8-bit kernels take it, if the file stores it as Q4_0, Q4_1 or Q8_0."""
        return None

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def read_ahead(self) -> None:
        """Start reading, in the background, the quantised matrices a resident load will take with
        `quantized`, while the caller does other work; nothing where there is nothing to read ahead."""

    def key_codebooks(self) -> KeyCodebooks | None:
        """LUT attention's codebooks, if the file holds them (edgeinfer calibrate)."""
        return None

    def file_size(self) -> int:
        raise NotImplementedError

    def resident_bytes(self) -> int:
        """What the weights take once loaded (the memory plan's figure): the file's bytes, unless a
        format's tensors change size on the way in."""
        return self.file_size()

    def model_tensor_names(self) -> list[str]:
        """The tensors the model uses, in file order, after checking each is present with its shape."""
        names = set(self.names())
        order = []
        for name, shape in model_tensor_shapes(self.config):
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
