"""Quantised matrices (2 to 8 bits) in edgeinfer's single file, and round-to-nearest quantisation of floats.

A quantised matrix NAME is stored as the kernels' own arrays (kernels/q4.py, q6.py, q8.py), so loading is
a copy, not a repacking: NAME.packed (U8), NAME.scales (F16 or F32) and, for layouts with minima,
NAME.minima; scales in two levels (kernels/scales.py: SuperScales, "k") are NAME.scales (I8) and
NAME.scales_d (F16), and the minima likewise. The file's metadata `quantized` maps each NAME to
[layout, rows, cols].

Layouts: Q4_0 (w = d * (n - 8)), Q4_1 (w = d * n + m), Q8_0 (w = d * q), IQ4_NL (w = d *
IQ4_VALUES[n]), groups of 32 along a row, fp16 scales; and the layouts GGUF's other types come in as
(gguf_quants.py), named q{bits}g{group}-s{scale bits or k}[-m{minimum bits or k}][-iq4][-w4], e.g. q6g16-sk
for Q6_K, q5g32-s16 for Q5_0, q4g32-sk-iq4 for IQ4_XS (-iq4: the nibbles index IQ4_VALUES). Every GGUF type in
GGUF_LAYOUTS comes in losslessly; a float tensor is quantised to nearest (Q4_1 or Q8_0). -w4: 2- or 3-bit
integers held in nibbles, as files of format 6 hold them (read_index names their layouts so); they are
repacked to their own width at load, the very integers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

import numpy as np

from ..errors import ModelFormatError
from ..kernels.activations import GROUP
from ..kernels.q4 import IQ4_FACTOR, Q4Matrix
from ..kernels.q6 import Q2Matrix, Q3Matrix, Q5Matrix, Q6Matrix
from ..kernels.q8 import Q8Matrix
from ..kernels.scales import ROWS, SUPER, SuperScales, scale_values
from .safetensors import DTYPES, TensorEntry

Matrix = Q2Matrix | Q3Matrix | Q4Matrix | Q5Matrix | Q6Matrix | Q8Matrix
MATRIX_TYPES = {2: Q2Matrix, 3: Q3Matrix, 4: Q4Matrix, 5: Q5Matrix, 6: Q6Matrix, 8: Q8Matrix}
SIGNED_FACTORS = {3: -32.0, 4: -8.0, 5: -32.0, 6: -32.0, 8: -128.0}  # q6.py's widths: + 32 in the kernel  # offset factor of the layouts without minima


@dataclass(frozen=True)
class Layout:
    bits: int  # 4: nibbles (q4.py); 2 to 6: as many bits (q6.py); 8: bytes (q8.py)
    group: int  # weights per scale: 32 or 16
    scale_dtype: str  # "F16", "F32" or "K" (SuperScales)
    minima_dtype: str | None  # likewise; None: no minima (the offset is a multiple of the scale)
    lookup: bool = False  # 4-bit nibbles that index IQ4_VALUES (IQ4_NL, IQ4_XS)
    width: int | None = None  # the bits the integers are held in when not `bits`: 4 (format 6's 2 and 3 bits)

    @property
    def name(self) -> str:
        named = {v: k for k, v in NAMED.items()}
        if self in named:
            return named[self]
        minima = f"-m{_dtype_tag(self.minima_dtype)}" if self.minima_dtype else ""
        held = f"-w{self.width}" if self.width else ""
        return f"q{self.bits}g{self.group}-s{_dtype_tag(self.scale_dtype)}{minima}{'-iq4' if self.lookup else ''}{held}"

    @property
    def factor(self) -> float:
        """The matrices' offset factor: 1 with minima, else the signed integers' offset."""
        return 1.0 if self.minima_dtype else IQ4_FACTOR if self.lookup else SIGNED_FACTORS[self.bits]


def _dtype_tag(dtype: str) -> str:
    return "k" if dtype == "K" else dtype[1:]


def _tag_dtype(tag: str) -> str:
    return "K" if tag == "k" else f"F{tag}"


NAMED = {"Q4_0": Layout(4, 32, "F16", None), "Q4_1": Layout(4, 32, "F16", "F16"), "Q8_0": Layout(8, 32, "F16", None),
         "IQ4_NL": Layout(4, 32, "F16", None, lookup=True)}
_LAYOUT_RE = re.compile(r"q([234568])g(16|32)-s(16|32|k)(?:-m(16|32|k))?(-iq4)?(-w4)?$")
# The layout each GGUF type comes in as (gguf_quants.py), fixed per type so a file's index can be
# written before its matrices are decoded. (Files written before IQ4 ran as nibbles hold IQ4_NL as
# Q8_0 and IQ4_XS as q8g32-sk: they still load.)
GGUF_LAYOUTS = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q8_0": "Q8_0", "Q5_0": "q5g32-s16", "IQ4_NL": "IQ4_NL",
                "Q4_K": "q4g32-sk-mk", "Q5_1": "q5g32-s16-m16", "Q5_K": "q5g32-sk-mk", "IQ4_XS": "q4g32-sk-iq4",
                "Q6_K": "q6g16-sk", "Q3_K": "q3g16-sk", "Q2_K": "q2g16-sk-mk"}


def layout_of(kind: str) -> Layout | None:
    """The layout a stored type names (a layout name, or a GGUF type in GGUF_LAYOUTS); None if none."""
    kind = GGUF_LAYOUTS.get(kind, kind)
    if kind in NAMED:
        return NAMED[kind]
    m = _LAYOUT_RE.match(kind)
    if (not m or (m.group(1) == "4" and m.group(2) != "32") or (m.group(5) and (m.group(1) != "4" or m.group(4)))
            or (m.group(6) and m.group(1) not in "23")):
        return None
    return Layout(int(m.group(1)), int(m.group(2)), _tag_dtype(m.group(3)), _tag_dtype(m.group(4)) if m.group(4) else None,
                  bool(m.group(5)), 4 if m.group(6) else None)


def plain_type(kind: str) -> str:
    """The layout of a matrix of type `kind` whose two-level scales became plain float32 ones (a
    column slice off the 256-column super-blocks: kernels/scales.select_scales)."""
    layout = layout_of(kind)
    if layout is None or "K" not in (layout.scale_dtype, layout.minima_dtype):
        return kind
    plain = lambda dtype: "F32" if dtype == "K" else dtype  # noqa: E731
    return Layout(layout.bits, layout.group, plain(layout.scale_dtype),
                  layout.minima_dtype and plain(layout.minima_dtype), layout.lookup, layout.width).name



def has_super_scales(kind: str) -> bool:
    """Whether a tensor stored as `kind` has a K-quant's two-level scales (256-column super-blocks)."""
    layout = layout_of(kind)
    return layout is not None and layout.scale_dtype == "K"


def is_quantized_type(kind: str) -> bool:
    """Whether a tensor stored as `kind` runs on the 4/8-bit kernels."""
    return layout_of(kind) is not None


def part_entries(name: str, kind: str, rows: int, cols: int) -> list[TensorEntry]:
    """The safetensors entries that hold one quantised matrix, in file order."""
    layout = layout_of(kind)
    packed, scales = (Q4Matrix.array_shapes(rows, cols) if layout.bits == 4
                      else Q8Matrix.array_shapes(rows, cols, layout.group) if layout.bits == 8
                      else MATRIX_TYPES[layout.bits].array_shapes(rows, cols, layout.group, layout.width))
    supers = (scales[0], -(-scales[1] // ROWS // (SUPER // layout.group)) * ROWS)
    parts = [TensorEntry(f"{name}.packed", "U8", packed)]
    for part, dtype in (("scales", layout.scale_dtype), ("minima", layout.minima_dtype)):
        if dtype == "K":
            parts += [TensorEntry(f"{name}.{part}", "I8", scales), TensorEntry(f"{name}.{part}_d", "F16", supers)]
        elif dtype:
            parts.append(TensorEntry(f"{name}.{part}", dtype, scales))
    return parts


def _as_stored(a, dtype: str) -> list[np.ndarray]:
    """Kernel scales as the file's dtype: SuperScales as their integers and their d (fp16); plain
    ones (fp16 bits or float32) as fp16 viewed as float16, or widened to float32 (exact)."""
    if dtype == "K":
        return [a.q, a.d.view(np.float16)]
    return [_as_plain(a, dtype)]


def _as_plain(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return scale_values(a) if a.dtype == np.uint16 else a
    if a.dtype != np.uint16:
        raise ValueError("float32 scales cannot be stored as fp16 without loss")
    return a.view(np.float16)


def matrix_parts(m: Matrix, kind: str) -> list[np.ndarray]:
    """The arrays part_entries describes for `m` in layout `kind`."""
    layout = layout_of(kind)
    parts = [m.packed, *_as_stored(m.scales, layout.scale_dtype)]
    if layout.minima_dtype:
        parts += _as_stored(m.offsets, layout.minima_dtype)
    return parts


def matrix_from_parts(kind: str, rows: int, cols: int, parts: list[np.ndarray], copy: bool = True) -> Matrix:
    """The matrix from its stored arrays: copied into memory (from a mapping, whose pages would
    otherwise fault in during the first tokens), or used as they are (a streaming slot)."""
    layout = layout_of(kind)
    arrays = [np.array(p) if copy else p for p in parts]
    kernel = lambda a: a.view(np.uint16) if a.dtype == np.float16 else a  # noqa: E731 (the kernels' fp16 bits)

    def scales_from(at: int, dtype: str):
        if dtype == "K":
            q, d = arrays[at], kernel(arrays[at + 1])
            per = SUPER // layout.group
            return SuperScales(d, q, per.bit_length() - 1), at + 2
        return kernel(arrays[at]), at + 1
    scales, at = scales_from(1, layout.scale_dtype)
    offsets = scales_from(at, layout.minima_dtype)[0] if layout.minima_dtype else scales
    m = MATRIX_TYPES[layout.bits](arrays[0], scales, offsets, layout.factor, rows, cols)
    return m.narrowed() if layout.width else m


def empty_matrix(kind: str, cols: int) -> Matrix:
    """A matrix of layout `kind` with no rows: the kernels' types of every matrix of that layout."""
    parts = [np.zeros(e.shape, DTYPES[e.dtype]) for e in part_entries("", kind, 0, cols)]
    return matrix_from_parts(kind, 0, cols, parts, copy=False)


def fits(m: Matrix, kind: str) -> bool:
    """Whether `m` can be stored in layout `kind` as it is (lossless)."""
    layout = layout_of(kind)
    group = GROUP if isinstance(m, Q4Matrix) else m.group
    has_minima = m.offsets is not m.scales
    return (layout is not None and layout.bits == m.bits and layout.group == group
            and layout.lookup == m.lookup and (layout.width or m.bits) == getattr(m, "width", m.bits)
            and bool(layout.minima_dtype) == has_minima and _holds(layout.scale_dtype, m.scales)
            and (not has_minima or _holds(layout.minima_dtype, m.offsets)))


def _holds(dtype: str, scales) -> bool:
    """Whether scales of the file's `dtype` hold the kernel's `scales` as they are."""
    if isinstance(scales, SuperScales):  # always a d per 256 columns (SUPER), as part_entries counts them
        return dtype == "K"
    return dtype == "F32" or (dtype == "F16" and scales.dtype == np.uint16)


def read_index(metadata: dict[str, str], path: str) -> dict[str, tuple[str, int, int]]:
    """The file's quantised matrices: NAME -> (type, rows, cols); a format 6 file's 2- and 3-bit
    layouts named as held in nibbles (-w4), as that format held them."""
    try:
        listed = [(name, str(k), int(r), int(c)) for name, (k, r, c) in
                  json.loads(metadata.get("quantized", "{}")).items()]
    except (ValueError, TypeError, AttributeError):  # not JSON, not an object, entries not triples
        raise ModelFormatError(f"{path}: the metadata's list of quantised tensors is malformed") from None
    format6 = metadata.get("format_version") == "6"
    index = {}
    for name, k, r, c in listed:
        layout = layout_of(k)
        if layout:
            index[name] = (replace(layout, width=4).name if format6 and layout.bits in (2, 3) else k, r, c)
    return index


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
