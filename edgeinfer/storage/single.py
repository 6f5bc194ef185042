"""edgeinfer's own single-file model: one .safetensors with config, tokenizer and template inside.

`__metadata__` holds `format=edgeinfer`, the config as JSON, the tokenizer (tokenizer.json text or a
base64 sentencepiece model) and the chat template, so the file alone is enough to run.
"""

from __future__ import annotations

from typing import Callable

from .. import __version__
from ..config import ModelConfig
from ..tokenizer import TokenizerSpec
from .safetensors import SafetensorsFile, TensorEntry, write_safetensors
from .source import SafetensorsSource, WeightSource

FORMAT = "edgeinfer"
FORMAT_VERSION = "1"


def is_single_file(f: SafetensorsFile) -> bool:
    return f.metadata.get("format") == FORMAT


def open_single_file(f: SafetensorsFile) -> SafetensorsSource:
    config = ModelConfig.from_json(f.metadata.get("config", ""))
    return SafetensorsSource(f.path, FORMAT, [f], config, TokenizerSpec.from_metadata(f.metadata))


def convert(source: WeightSource, out_path: str, progress: Callable[[int, int], None] | None = None) -> None:
    """Write `source` as a single-file model, one tensor in memory at a time, layer by layer."""
    names = source.model_tensor_names()
    entries = [TensorEntry(n, source.storable_type(n), tuple(source.stored_shape(n))) for n in names]
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "edgeinfer_version": __version__,
                "config": source.config.to_json(), "source_format": source.format,
                **source.tokenizer.to_metadata()}
    write_safetensors(out_path, entries, (source.storable(n) for n in names), metadata, progress)
