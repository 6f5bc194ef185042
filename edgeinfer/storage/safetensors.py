"""Safetensors: a validating mmap reader and a streaming, crash-safe writer.

Format: 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets}},
optional "__metadata__": {str: str}), then the data buffer that the offsets index.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ..errors import ModelFormatError, UnsupportedModelError

# numpy has no bfloat16: BF16 data is read as uint16 and widened by to_float32().
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
MAX_HEADER = 100 * 1024 * 1024
# One read-ahead call: at most this many buffers (Linux's IOV_MAX) and bytes (below the 2 GB one call
# returns), and it reads through a gap between tensors no larger than READ_THROUGH.
READ_BUFFERS, READ_BYTES, READ_THROUGH = 1024, 1 << 30, 1 << 20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a stored tensor to float32 (a view when it already is)."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F32":
        return array
    return array.astype(np.float32)


def bf16_from_float32(array: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


class SafetensorsFile:
    """One .safetensors file, header validated up front, tensors served as read-only mmap views."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise ModelFormatError(f"{self.path}: no such file") from None
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER, size - 8):
            raise ModelFormatError(f"{self.path}: safetensors header length {header_len} exceeds the file "
                                   f"({size} bytes): truncated or not a safetensors file")
        raw = self._file.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise ModelFormatError(f"{self.path}: safetensors header is not valid JSON (corrupt file)") from None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{self.path}: safetensors header is not a JSON object")
        self.data_start = 8 + header_len
        self.metadata: dict[str, str] = _validate_metadata(self.path, header.pop("__metadata__", None) or {})
        self.entries: dict[str, TensorEntry] = {}
        self._offsets: dict[str, int] = {}
        data_size = size - self.data_start
        for name, spec in header.items():
            entry, begin = _validate_entry(self.path, name, spec, data_size)
            self.entries[name] = entry
            self._offsets[name] = self.data_start + begin
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._ahead: dict[str, np.ndarray] = {}  # tensors read ahead, not yet handed over
        self._reader: threading.Thread | None = None  # the read-ahead

    def array(self, name: str) -> np.ndarray:
        """The tensor as stored (BF16 as uint16), a read-only view into the mapping."""
        entry = self.entries[name]
        count = math.prod(entry.shape)
        arr = np.frombuffer(self._map, dtype=DTYPES[entry.dtype], count=count, offset=self._offsets[name])
        return arr.reshape(entry.shape)

    def float32(self, name: str) -> np.ndarray:
        return to_float32(self.array(name), self.entries[name].dtype)

    def read(self, name: str) -> np.ndarray:
        """The tensor copied into memory with plain reads, not through the mapping: a mapped page read
        stays in the process's resident set, so a copy through it would count the weights twice.
        A tensor read ahead (read_ahead) is handed over once its read is done."""
        if name in self._ahead:
            assert self._reader is not None
            self._reader.join()
            if name in self._ahead:  # not when the read ahead failed: read it here, and say why
                return self._ahead.pop(name)
        entry = self.entries[name]
        out = np.empty(entry.shape, DTYPES[entry.dtype])
        if not _read_into(self._file.fileno(), [memoryview(out.reshape(-1).view(np.uint8))], self._offsets[name]):
            raise ModelFormatError(f"{self.path}: the file ends inside tensor {name!r} (truncated)")
        return out

    def read_ahead(self, names: Iterable[str]) -> None:
        """Start reading `names` into arrays of their own in a thread, in file order, a few large
        reads (os.preadv, which lets go of the interpreter while it reads): the caller goes on with
        other work, a tokenizer's parse say, and `read` hands each array over. Every array is
        allocated here, as reading them one by one would: call it only for tensors the caller will
        read."""
        names = sorted((n for n in names if self.entries[n].nbytes), key=self._offsets.__getitem__)
        ahead = {n: np.empty(self.entries[n].shape, DTYPES[self.entries[n].dtype]) for n in names}
        batches: list[tuple[int, list[memoryview]]] = []  # (offset, buffers) per call
        gap, end, size = memoryview(bytearray(READ_THROUGH)), 0, 0
        for n in names:
            start, buffer = self._offsets[n], memoryview(ahead[n].reshape(-1).view(np.uint8))
            through = start - end  # the bytes between this tensor and the last, read and dropped
            if batches and 0 <= through <= READ_THROUGH and len(batches[-1][1]) + 2 <= READ_BUFFERS \
                    and size + through + len(buffer) <= READ_BYTES:
                batches[-1][1].extend([gap[:through], buffer] if through else [buffer])
                size += through + len(buffer)
            else:
                batches.append((start, [buffer]))
                size = len(buffer)
            end = start + len(buffer)

        def fill() -> None:
            try:
                if all(_read_into(self._file.fileno(), buffers, offset) for offset, buffers in batches):
                    return
            except OSError:
                pass
            for n in ahead:  # the file ended early or would not read: `read` reads each again, and says why
                self._ahead.pop(n, None)

        if self._reader is not None:
            self._reader.join()
        self._ahead.update(ahead)
        self._reader = threading.Thread(target=fill, name="read-ahead", daemon=True)
        self._reader.start()

    def offset(self, name: str) -> int:
        """Where the tensor's data begins in the file."""
        return self._offsets[name]

    def close(self) -> None:
        # Views handed out keep the mapping alive; closing the file object is safe once no read is on.
        if self._reader is not None:
            self._reader.join()
        self._ahead.clear()
        self._file.close()


def _read_into(fd: int, buffers: list[memoryview], offset: int) -> bool:
    """Fill `buffers`, in order, from the file at `offset`, in as few calls as the OS allows (one
    may return fewer bytes than asked). False when the file ends first."""
    first = 0
    buffers = [b for b in buffers if len(b)]  # an empty one would read as the file's end
    while first < len(buffers):
        n = os.preadv(fd, buffers[first:], offset)
        if n == 0:
            return False
        offset += n
        while first < len(buffers) and n >= len(buffers[first]):
            n -= len(buffers[first])
            first += 1
        if n:
            buffers[first] = buffers[first][n:]
    return True


def _validate_metadata(path: str, meta: object) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ModelFormatError(f"{path}: safetensors __metadata__ must map strings to strings")
    return meta


def _validate_entry(path: str, name: str, spec: object, data_size: int) -> tuple[TensorEntry, int]:
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise ModelFormatError(f"{path}: tensor {name!r} has a malformed header entry (corrupt header)")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise UnsupportedModelError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ModelFormatError(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ModelFormatError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r}")
    entry = TensorEntry(name, dtype, tuple(shape))
    begin, end = offsets
    if not 0 <= begin <= end or end - begin != entry.nbytes:
        raise ModelFormatError(f"{path}: tensor {name!r} offsets {offsets} do not match its shape and dtype")
    if end > data_size:
        raise ModelFormatError(f"{path}: tensor {name!r} ends at byte {end} but the data holds {data_size}: "
                               "the file is truncated")
    return entry, begin


PAGE = 4096
PAD_PREFIX = "__pad."  # filler tensors that start a group of tensors on a page boundary


def write_safetensors(path: str | os.PathLike, entries: list[TensorEntry], arrays: Iterable[np.ndarray],
                      metadata: dict[str, str], progress=None, group_starts: set[str] = frozenset()) -> None:
    """Write tensors one at a time as `arrays` yields them, in the order of `entries`.

    The header is computed from `entries` first, so no tensor is held longer than its own write.
    Data starts on a page boundary, and so does each tensor named in `group_starts` (a filler U8
    tensor `__pad.N` goes before it): a group, such as a layer, is then one aligned sequential read.
    The file appears under `path` only when complete (temp file in the same folder, then rename).
    """
    path = os.fspath(path)
    header: dict[str, object] = {"__metadata__": metadata}
    fillers: dict[str, int] = {}  # tensor name -> bytes of filler written before it
    offset = 0
    for e in entries:
        if e.name in group_starts and offset % PAGE:
            fillers[e.name] = -offset % PAGE
            header[f"{PAD_PREFIX}{len(fillers)}"] = {"dtype": "U8", "shape": [fillers[e.name]],
                                                     "data_offsets": [offset, offset + fillers[e.name]]}
            offset += fillers[e.name]
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % (PAGE if group_starts else 8))  # data starts aligned
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            written = 0
            for entry, array in _zip_exact(entries, arrays):
                f.write(bytes(fillers.get(entry.name, 0)))
                array = np.ascontiguousarray(array)
                if array.shape != entry.shape or array.dtype != DTYPES[entry.dtype]:
                    raise ValueError(f"tensor {entry.name}: got {array.dtype}{array.shape}, "
                                     f"declared {entry.dtype}{entry.shape}")
                f.write(array.tobytes() if array.size == 0 else memoryview(array).cast("B"))  # (a headless shard)
                written += 1
                if progress:
                    progress(written, len(entries))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _zip_exact(entries: list[TensorEntry], arrays: Iterable[np.ndarray]) -> Iterator[tuple[TensorEntry, np.ndarray]]:
    it = iter(arrays)
    for entry in entries:
        try:
            yield entry, next(it)
        except StopIteration:
            raise ValueError(f"writer got no data for tensor {entry.name}") from None
