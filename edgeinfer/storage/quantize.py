"""4- and 8-bit matrices in edgeinfer's single file, and round-to-nearest quantisation of floats.

A quantised matrix NAME is stored as the kernels' own arrays (kernels/q4.py, q8.py), so loading is
a copy, not a repacking: NAME.packed (U8), NAME.scales (F16) and, for Q4_1, NAME.minima (F16).
The file's metadata `quantized` maps each NAME to [type, rows, cols].

Types: Q4_0 (w = d * (n - 8)), Q4_1 (w = d * n + m), Q8_0 (w = d * q), groups of 32 along a row.
GGUF's Q4_0/Q4_1/Q8_0 come in losslessly; anything else is quantised from float32 to nearest.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import ModelFormatError
from ..kernels.activations import CHUNK, GROUP
from ..kernels.q4 import ROWS, Q4Matrix
from ..kernels.q8 import WEIGHTS_PER_LOAD, Q8Matrix
from .safetensors import TensorEntry

Matrix = Q4Matrix | Q8Matrix
TYPES = ("Q4_0", "Q4_1", "Q8_0")


def part_entries(name: str, kind: str, rows: int, cols: int) -> list[TensorEntry]:
    """The safetensors entries that hold one quantised matrix, in file order."""
    blocks = -(-rows // ROWS)
    if kind == "Q8_0":
        chunks = -(-cols // WEIGHTS_PER_LOAD)
        return [TensorEntry(f"{name}.packed", "U8", (blocks, chunks * ROWS * 64)),
                TensorEntry(f"{name}.scales", "F16", (blocks, chunks * ROWS * 2))]
    chunks = -(-cols // CHUNK)
    parts = [TensorEntry(f"{name}.packed", "U8", (blocks, chunks * ROWS * 64)),
             TensorEntry(f"{name}.scales", "F16", (blocks, chunks * ROWS * 4))]
    if kind == "Q4_1":
        parts.append(TensorEntry(f"{name}.minima", "F16", (blocks, chunks * ROWS * 4)))
    return parts


def matrix_parts(m: Matrix) -> list[np.ndarray]:
    """The arrays part_entries describes (fp16 bits viewed as float16)."""
    parts = [m.packed, m.scales.view(np.float16)]
    if isinstance(m, Q4Matrix) and m.offsets is not m.scales:
        parts.append(m.offsets.view(np.float16))
    return parts


def matrix_from_parts(kind: str, rows: int, cols: int, parts: list[np.ndarray], copy: bool = True) -> Matrix:
    """The matrix from its stored arrays: copied into memory (from a mapping, whose pages would
    otherwise fault in during the first tokens), or used as they are (a streaming slot)."""
    arrays = [np.array(p) if copy else p for p in parts]
    if kind == "Q8_0":
        return Q8Matrix(arrays[0], arrays[1].view(np.uint16), rows, cols)
    scales = arrays[1].view(np.uint16)
    if kind == "Q4_1":
        return Q4Matrix(arrays[0], scales, arrays[2].view(np.uint16), 1.0, rows, cols)
    return Q4Matrix(arrays[0], scales, scales, -8.0, rows, cols)


def kind_of(m: Matrix) -> str:
    if isinstance(m, Q8Matrix):
        return "Q8_0"
    return "Q4_1" if m.offsets is not m.scales else "Q4_0"


def read_index(metadata: dict[str, str], path: str) -> dict[str, tuple[str, int, int]]:
    """The file's quantised matrices: NAME -> (type, rows, cols)."""
    try:
        index = json.loads(metadata.get("quantized", "{}"))
        return {name: (str(k), int(r), int(c)) for name, (k, r, c) in index.items() if k in TYPES}
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
    return Q4Matrix.from_rows(_pack_nibbles(q, rows, cols), scales, minima)


def quantize_q8_0(w: np.ndarray) -> Q8Matrix:
    """Round to nearest, symmetric: each group's step is its largest magnitude / 127 (fp16)."""
    rows, cols = w.shape
    g = np.asarray(w, np.float32).reshape(rows, cols // GROUP, GROUP)
    scales = (np.abs(g).max(axis=2) / 127).astype(np.float16)
    safe = np.where(scales > 0, scales.astype(np.float32), 1)[..., None]
    q = np.clip(np.rint(g / safe), -127, 127).astype(np.int8)
    blocks = np.concatenate([scales[..., None].view(np.uint8), q.view(np.uint8)], axis=2)
    return Q8Matrix.from_gguf(blocks.reshape(rows, -1), cols)


def _pack_nibbles(q: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows, groups, 32) values 0..15 -> GGUF's byte order: low nibbles 0..15, high 16..31."""
    return (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, cols // 2)
