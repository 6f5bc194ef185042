"""4- and 8-bit matrices in edgeinfer's single file, and round-to-nearest quantisation of floats.

A quantised matrix NAME is stored as the kernels' own arrays (kernels/q4.py, q8.py), so loading is
a copy, not a repacking: NAME.packed (U8), NAME.scales (F16 or F32) and, for layouts with minima,
NAME.minima. The file's metadata `quantized` maps each NAME to [layout, rows, cols].

Layouts: Q4_0 (w = d * (n - 8)), Q4_1 (w = d * n + m), Q8_0 (w = d * q), groups of 32 along a
row, fp16 scales; and the layouts GGUF's other types come in as (gguf_quants.py), named
q{bits}g{group}-s{scale bits}[-m{minimum bits}], e.g. q8g16-s32 for Q6_K. Every GGUF type in
GGUF_LAYOUTS comes in losslessly; a float tensor is quantised to nearest (Q4_1 or Q8_0).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError
from ..kernels.activations import GROUP
from ..kernels.q4 import Q4Matrix, scale_values
from ..kernels.q8 import Q8Matrix
from .safetensors import TensorEntry

Matrix = Q4Matrix | Q8Matrix


@dataclass(frozen=True)
class Layout:
    bits: int  # 4: nibbles (q4.py); 8: bytes (q8.py)
    group: int  # weights per scale: 32 or 16
    scale_dtype: str  # "F16" or "F32"
    minima_dtype: str | None  # None: no minima (the offset is a multiple of the scale)

    @property
    def name(self) -> str:
        named = {v: k for k, v in NAMED.items()}
        if self in named:
            return named[self]
        minima = f"-m{self.minima_dtype[1:]}" if self.minima_dtype else ""
        return f"q{self.bits}g{self.group}-s{self.scale_dtype[1:]}{minima}"


NAMED = {"Q4_0": Layout(4, 32, "F16", None), "Q4_1": Layout(4, 32, "F16", "F16"), "Q8_0": Layout(8, 32, "F16", None)}
_LAYOUT_RE = re.compile(r"q([48])g(16|32)-s(16|32)(?:-m(16|32))?$")
# The layout each GGUF type comes in as (gguf_quants.py), fixed per type so a file's index can be
# written before its matrices are decoded.
GGUF_LAYOUTS = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q8_0": "Q8_0", "Q5_0": "Q8_0", "IQ4_NL": "Q8_0",
                "Q4_K": "q4g32-s32-m32", "Q5_1": "q8g32-s16-m16", "Q5_K": "q8g32-s32-m32", "IQ4_XS": "q8g32-s32",
                "Q6_K": "q8g16-s32", "Q3_K": "q8g16-s32", "Q2_K": "q8g16-s32-m32"}


def layout_of(kind: str) -> Layout | None:
    """The layout a stored type names (a layout name, or a GGUF type in GGUF_LAYOUTS); None if none."""
    kind = GGUF_LAYOUTS.get(kind, kind)
    if kind in NAMED:
        return NAMED[kind]
    m = _LAYOUT_RE.match(kind)
    if not m or (m.group(1) == "4" and m.group(2) != "32"):
        return None
    return Layout(int(m.group(1)), int(m.group(2)), f"F{m.group(3)}", f"F{m.group(4)}" if m.group(4) else None)


def is_quantized_type(kind: str) -> bool:
    """Whether a tensor stored as `kind` runs on the 4/8-bit kernels."""
    return layout_of(kind) is not None


def part_entries(name: str, kind: str, rows: int, cols: int) -> list[TensorEntry]:
    """The safetensors entries that hold one quantised matrix, in file order."""
    layout = layout_of(kind)
    packed, scales = (Q4Matrix.array_shapes(rows, cols) if layout.bits == 4
                      else Q8Matrix.array_shapes(rows, cols, layout.group))
    parts = [TensorEntry(f"{name}.packed", "U8", packed), TensorEntry(f"{name}.scales", layout.scale_dtype, scales)]
    if layout.minima_dtype:
        parts.append(TensorEntry(f"{name}.minima", layout.minima_dtype, scales))
    return parts


def _as_stored(a: np.ndarray, dtype: str) -> np.ndarray:
    """Kernel scales (fp16 bits or float32) as the file's dtype: fp16 viewed as float16, or widened
    to float32 (exact)."""
    if dtype == "F32":
        return scale_values(a) if a.dtype == np.uint16 else a
    if a.dtype != np.uint16:
        raise ValueError("float32 scales cannot be stored as fp16 without loss")
    return a.view(np.float16)


def matrix_parts(m: Matrix, kind: str) -> list[np.ndarray]:
    """The arrays part_entries describes for `m` in layout `kind`."""
    layout = layout_of(kind)
    parts = [m.packed, _as_stored(m.scales, layout.scale_dtype)]
    if layout.minima_dtype:
        parts.append(_as_stored(m.offsets, layout.minima_dtype))
    return parts


def matrix_from_parts(kind: str, rows: int, cols: int, parts: list[np.ndarray], copy: bool = True) -> Matrix:
    """The matrix from its stored arrays: copied into memory (from a mapping, whose pages would
    otherwise fault in during the first tokens), or used as they are (a streaming slot)."""
    layout = layout_of(kind)
    arrays = [np.array(p) if copy else p for p in parts]
    kernel = lambda a: a.view(np.uint16) if a.dtype == np.float16 else a  # noqa: E731 (the kernels' fp16 bits)
    scales = kernel(arrays[1])
    offsets = kernel(arrays[2]) if layout.minima_dtype else scales
    factor = 1.0 if layout.minima_dtype else (-8.0 if layout.bits == 4 else -128.0)
    return (Q4Matrix if layout.bits == 4 else Q8Matrix)(arrays[0], scales, offsets, factor, rows, cols)


def fits(m: Matrix, kind: str) -> bool:
    """Whether `m` can be stored in layout `kind` as it is (lossless)."""
    layout = layout_of(kind)
    group = m.group if isinstance(m, Q8Matrix) else GROUP
    has_minima = m.offsets is not m.scales
    return (layout is not None and layout.bits == m.bits and layout.group == group
            and bool(layout.minima_dtype) == has_minima
            and (layout.scale_dtype == "F32" or m.scales.dtype == np.uint16)
            and (not has_minima or layout.minima_dtype == "F32" or m.offsets.dtype == np.uint16))


def read_index(metadata: dict[str, str], path: str) -> dict[str, tuple[str, int, int]]:
    """The file's quantised matrices: NAME -> (type, rows, cols)."""
    try:
        index = json.loads(metadata.get("quantized", "{}"))
        return {name: (str(k), int(r), int(c)) for name, (k, r, c) in index.items() if layout_of(str(k))}
    except (ValueError, TypeError):
        raise ModelFormatError(f"{path}: the metadata's list of quantised tensors is malformed") from None


def quantize_q4_1(w: np.ndarray) -> Q4Matrix:
    """Round to nearest, asymmetric: each group's minimum and step (max - min) / 15, both rounded to
    fp16 first so the nibbles are chosen against the values the kernel will use."""
    rows, cols = w.shape
    g = np.asarray(w, np.float32).reshape(rows, cols // GROUP, GROUP)
    lo, hi = g.min(axis=2), g.max(axis=2)
    minima = lo.astype(np.float16).astype(np.float32)
    scales = ((hi - minima) / 15).astype(np.float16).astype(np.float32)
    safe = np.where(scales > 0, scales, 1)[..., None]
    q = np.clip(np.rint((g - minima[..., None]) / safe), 0, 15).astype(np.uint8)
    return Q4Matrix.from_values(q.reshape(rows, cols), scales, minima)


def quantize_q8_0(w: np.ndarray) -> Q8Matrix:
    """Round to nearest, symmetric: each group's step is its largest magnitude / 127 (fp16)."""
    rows, cols = w.shape
    g = np.asarray(w, np.float32).reshape(rows, cols // GROUP, GROUP)
    scales = (np.abs(g).max(axis=2) / 127).astype(np.float16)
    safe = np.where(scales > 0, scales.astype(np.float32), 1)[..., None]
    q = np.clip(np.rint(g / safe), -127, 127).astype(np.int8)
    return Q8Matrix.from_values(q.reshape(rows, cols), scales)
