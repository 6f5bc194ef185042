"""The units of edgeinfer's single file: what it stores contiguously and page-aligned (one layer, or
the head), so that streaming reads one aligned run per unit; and the tensors of a unit read into a
buffer, as a WeightSource over that buffer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .quantize import matrix_from_parts
from .safetensors import DTYPES, PAGE, to_float32
from .source import WeightSource
from .tensor_names import HEAD, output_weight, unit_of

if TYPE_CHECKING:
    from .single import SingleFileSource


@dataclass(frozen=True)
class Unit:
    key: int | str  # a layer index, or HEAD (the unit holding the output matrix)
    start: int  # byte offset in the file (page-aligned)
    size: int  # bytes to read, rounded up to whole pages
    data_end: int  # where its last tensor ends, from start: a shorter read means a truncated file
    entries: dict[str, tuple[int, str, tuple[int, ...]]]  # stored tensor -> (offset in the unit, dtype, shape)


def file_units(source: SingleFileSource, layers_only: bool = False) -> list[Unit]:
    """The layers, then (unless `layers_only`: a cluster worker) the unit holding the output matrix
    (the embedding's, when tied)."""
    f = source.file
    spans: dict[int | str, list[str]] = {}
    for stored in f.entries:
        owner = source.owner_of(stored)
        if owner is not None:
            spans.setdefault(unit_of(owner), []).append(stored)
    keys = list(range(source.config.num_layers)) + ([] if layers_only else [unit_of(output_weight(source.config))])
    units = []
    for key in keys:
        names = spans[key]
        begin = min(f.offset(n) for n in names) // PAGE * PAGE
        end = max(f.offset(n) + f.entries[n].nbytes for n in names)
        entries = {n: (f.offset(n) - begin, f.entries[n].dtype, f.entries[n].shape) for n in names}
        units.append(Unit(key if isinstance(key, int) else HEAD, begin, -(-(end - begin) // PAGE) * PAGE,
                          end - begin, entries))
    return units


class UnitView(WeightSource):
    """The tensors of one unit, as views into the slot that holds it (nothing is copied)."""

    def __init__(self, source: SingleFileSource, unit: Unit, slot: np.ndarray):
        self.config, self.tokenizer, self.path, self.format = source.config, source.tokenizer, source.path, "slot"
        self._source, self._unit, self._slot = source, unit, slot

    def _stored(self, name: str) -> np.ndarray:
        offset, dtype, shape = self._unit.entries[name]
        count = int(np.prod(shape, dtype=np.int64))
        return self._slot[offset:offset + count * DTYPES[dtype].itemsize].view(DTYPES[dtype]).reshape(shape)

    def has(self, name: str) -> bool:
        return name in self._unit.entries or self._source.quantized_parts(name) is not None

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self._source.stored_shape(name)

    def float32(self, name: str) -> np.ndarray:
        matrix = self.quantized(name)
        return to_float32(self._stored(name), self._unit.entries[name][1]) if matrix is None else matrix.dequantize()

    def quantized(self, name: str):
        parts = self._source.quantized_parts(name)
        if parts is None:
            return None
        (kind, rows, cols), entries = parts
        return matrix_from_parts(kind, rows, cols, [self._stored(e.name) for e in entries], copy=False)
