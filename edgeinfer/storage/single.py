"""edgeinfer's own single-file model: one .safetensors with config, tokenizer and template inside.

`__metadata__` holds `format=edgeinfer`, the config as JSON, the tokenizer (tokenizer.json text or a
base64 sentencepiece model), the chat template, and the index of the 4/8-bit matrices (quantize.py),
so the file alone is enough to run. Tensors go layer by layer.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Callable, Iterator

import numpy as np

from .. import __version__
from ..config import ModelConfig
from ..errors import EdgeInferError, ModelFormatError
from ..kernels.activations import GROUP
from ..tokenizer import TokenizerSpec
from .quantize import (Matrix, fits, layout_of, matrix_from_parts, matrix_parts, part_entries, quantize_q4_1,
                       quantize_q8_0, read_index)
from .safetensors import PAD_PREFIX, SafetensorsFile, TensorEntry, write_safetensors
from .source import KeyCodebooks, SafetensorsSource, WeightSource
from .tensor_names import ENDS, ROPE_FREQS, codebook_name, unit_of

FORMAT = "edgeinfer"
FORMAT_VERSION = "7"  # 2: quantised matrices; 3: 4-bit rows in blocks of 16 (kernels/q4.py); 4: 8-bit too;
# 5: layouts added (K-quants' two-level scales, 6-bit rows), none changed; 6: 5-, 3- and 2-bit rows added, none changed;
# 7: 3- and 2-bit rows held in 3 and 2 bits, not nibbles (read_index names 6's as "-w4" layouts)
READABLE_VERSIONS = ("4", "5", "6", "7")  # whose layouts this version reads as they were written


def is_single_file(f: SafetensorsFile) -> bool:
    return f.metadata.get("format") == FORMAT


def open_single_file(f: SafetensorsFile) -> "SingleFileSource":
    return SingleFileSource(f)


class SingleFileSource(SafetensorsSource):
    """The single file: float tensors as stored, quantised matrices as their kernels' arrays."""

    can_stream = True

    def __init__(self, f: SafetensorsFile):
        config = ModelConfig.from_json(f.metadata.get("config", ""))
        super().__init__(f.path, FORMAT, [f], config, TokenizerSpec.from_metadata(f.metadata))
        self._file = f
        self._quantized = read_index(f.metadata, f.path)
        version = f.metadata.get("format_version")
        if version not in READABLE_VERSIONS and self._quantized:
            raise ModelFormatError(f"{f.path}: written by another edgeinfer (format {version}, whose quantised "
                                   f"layouts this one, format {FORMAT_VERSION}, does not read); convert its source again")
        self._parts: dict[str, list[TensorEntry]] = {}
        for name, (kind, rows, cols) in self._quantized.items():
            expected = part_entries(name, kind, rows, cols)
            if any(f.entries.get(e.name) != e for e in expected):
                raise ModelFormatError(f"{f.path}: the stored parts of {name} ({kind}) are missing or malformed")
            self._parts[name] = expected
        self._owners = {e.name: name for name, parts in self._parts.items() for e in parts}

    def names(self) -> list[str]:
        parts = {e.name for entries in self._parts.values() for e in entries}
        return [n for n in super().names() if n not in parts] + list(self._quantized)

    def has(self, name: str) -> bool:
        return name in self._quantized or super().has(name)

    def stored_type(self, name: str) -> str:
        return self._quantized[name][0] if name in self._quantized else super().stored_type(name)

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self._quantized[name][1:] if name in self._quantized else super().stored_shape(name)

    def float32(self, name: str) -> np.ndarray:
        matrix = self.quantized(name)
        return super().float32(name) if matrix is None else matrix.dequantize()

    def storable_type(self, name: str) -> str:
        return "F32" if name in self._quantized else super().storable_type(name)

    def storable(self, name: str) -> np.ndarray:
        return self.float32(name) if name in self._quantized else super().storable(name)

    def key_codebooks(self) -> KeyCodebooks | None:
        if "lut_d_sub" not in self._file.metadata:
            return None
        try:
            d_sub = int(self._file.metadata["lut_d_sub"])
            layers = [np.array(self._file.array(codebook_name(i))) for i in range(self.config.num_layers)]
        except (KeyError, ValueError):
            raise ModelFormatError(f"{self.path}: the LUT codebooks are incomplete") from None
        layers = [book[:, None] if book.ndim == 4 else book for book in layers]  # files before bands: one band
        expected = (self.config.num_kv_heads, layers[0].shape[1], self.config.head_dim // max(d_sub, 1), 16, d_sub)
        if any(book.shape != expected for book in layers) or not expected[1]:
            raise ModelFormatError(f"{self.path}: LUT codebooks of shape {layers[0].shape}, expected {expected}")
        return KeyCodebooks(d_sub, layers)

    def quantized(self, name: str) -> Matrix | None:
        if name not in self._quantized:
            return None
        kind, rows, cols = self._quantized[name]
        return matrix_from_parts(kind, rows, cols, [self._file.read(e.name) for e in self._parts[name]], copy=False)

    def read_ahead(self) -> None:
        self._file.read_ahead(e.name for parts in self._parts.values() for e in parts)

    @property
    def file(self) -> SafetensorsFile:
        return self._file

    def quantized_parts(self, name: str) -> tuple[tuple[str, int, int], list[TensorEntry]] | None:
        """A quantised matrix's (type, rows, cols) and its stored entries; None for other tensors."""
        return (self._quantized[name], self._parts[name]) if name in self._quantized else None

    def owner_of(self, stored: str) -> str | None:
        """The model tensor a stored entry belongs to (a matrix's parts belong to the matrix); None
        for fillers."""
        return None if stored.startswith(PAD_PREFIX) else self._owners.get(stored, stored)


def target_type(source: WeightSource, name: str, bits: int | None) -> str | None:
    """The quantised layout `name` gets in the file, or None for float. bits None keeps what the
    source stores (its quantised matrices come in losslessly, gguf_quants.py); 4 puts projections
    in 4 bits (keeping a source's own layout of at most 4 bits, else Q4_1) and the embedding and head
    in 8; 8 puts all in 8 (keeping a source's own layout but for the 4-bit ones, else Q8_0: the
    GGUF types it kept when the 5-, 3- and 2-bit ones were held in 6 and 8 bits); 16, none."""
    shape, stored = source.stored_shape(name), layout_of(source.stored_type(name))
    if stored and stored.width:  # format 6's 2- and 3-bit rows in nibbles: loaded, and written, in their own width
        stored = replace(stored, width=None)
    if len(shape) != 2 or name == ROPE_FREQS or shape[1] % GROUP:
        return None
    if bits is None:
        return stored.name if stored else None
    if bits == 16:
        return None
    if bits == 8 or name in ENDS:  # embedding and head: 8 bits when the rest is 4 (a 6-bit layout is kept)
        return stored.name if stored and stored.bits != 4 else "Q8_0"
    return stored.name if stored and stored.bits <= 4 else "Q4_1"


def quantized_as(source: WeightSource, name: str, kind: str) -> Matrix:
    """The matrix in layout `kind`: the source's own when it fits (lossless), else rounded to nearest."""
    matrix = source.quantized(name)
    if matrix is not None and fits(matrix, kind):
        return matrix
    w = source.float32(name)
    return quantize_q8_0(w) if kind == "Q8_0" else quantize_q4_1(w)


def float_type(source: WeightSource, name: str, bits: int | None) -> str:
    stored = source.storable_type(name)
    return "F16" if bits == 16 and len(source.stored_shape(name)) == 2 and stored == "F32" else stored


def convert(source: WeightSource, out_path: str, progress: Callable[[int, int], None] | None = None,
            bits: int | None = None, codebooks: KeyCodebooks | None = None) -> None:
    """Write `source` as a single-file model, one tensor in memory at a time, layer by layer. LUT
    attention's key codebooks (`codebooks`, else the source's own) go after the head."""
    if bits not in (None, 4, 8, 16):
        raise EdgeInferError(f"--bits must be 4, 8 or 16, got {bits}")
    names = source.model_tensor_names()
    kinds = {n: target_type(source, n, bits) for n in names}
    entries, index, group_starts, unit = [], {}, set(), None
    for n in names:
        if unit_of(n) != unit:  # each unit starts on a page: one aligned read when streaming
            unit = unit_of(n)
            group_starts.add(n if kinds[n] is None else f"{n}.packed")
        if kinds[n] is None:
            entries.append(TensorEntry(n, float_type(source, n, bits), tuple(source.stored_shape(n))))
        else:
            rows, cols = source.stored_shape(n)
            index[n] = [kinds[n], rows, cols]
            entries += part_entries(n, kinds[n], rows, cols)

    codebooks = codebooks or source.key_codebooks()
    if codebooks:
        entries += [TensorEntry(codebook_name(i), "F32", book.shape) for i, book in enumerate(codebooks.layers)]
        group_starts.add(codebook_name(0))

    def arrays() -> Iterator[np.ndarray]:
        for n in names:
            if kinds[n] is not None:
                yield from matrix_parts(quantized_as(source, n, kinds[n]), kinds[n])
            elif float_type(source, n, bits) == "F16" and source.storable_type(n) == "F32":
                yield source.storable(n).astype(np.float16)
            else:
                yield source.storable(n)
        yield from (codebooks.layers if codebooks else ())

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "edgeinfer_version": __version__,
                "config": source.config.to_json(), "source_format": source.format,
                "quantized": json.dumps(index), **source.tokenizer.to_metadata(),
                **({"lut_d_sub": str(codebooks.d_sub)} if codebooks else {})}
    write_safetensors(out_path, entries, arrays(), metadata, progress, group_starts)
