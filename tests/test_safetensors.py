"""The safetensors reader validates before trusting; the writer streams and never leaves a partial file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edgeinfer.errors import ModelFormatError, UnsupportedModelError
from edgeinfer.storage.safetensors import (SafetensorsFile, TensorEntry, bf16_from_float32, to_float32,
                                           write_safetensors)


def _write(path, tensors: dict[str, np.ndarray], metadata=None) -> None:
    entries = [TensorEntry(n, {np.float32: "F32", np.float16: "F16", np.int8: "I8"}[a.dtype.type], a.shape)
               for n, a in tensors.items()]
    write_safetensors(path, entries, tensors.values(), metadata or {})


def test_round_trip_and_compatibility_with_the_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float16),
               "c": rng.integers(-128, 127, (2, 2, 2), dtype=np.int8)}
    ours = tmp_path / "ours.safetensors"
    _write(ours, tensors, {"k": "v"})
    for name, arr in load_file(ours).items():  # the reference library reads what we write
        np.testing.assert_array_equal(arr, tensors[name])
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, theirs, metadata={"x": "y"})
    f = SafetensorsFile(theirs)  # and we read what it writes
    assert f.metadata == {"x": "y"}
    for name, arr in tensors.items():
        np.testing.assert_array_equal(f.array(name), arr)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_bfloat16_round_trip_is_exact_on_representable_values():
    x = np.array([1.0, -2.5, 3.140625, 1e-3, 65504.0, -0.0], dtype=np.float32)
    bits = bf16_from_float32(x)
    back = to_float32(bits, "BF16")
    np.testing.assert_allclose(back, x, rtol=2 ** -8)
    np.testing.assert_array_equal(to_float32(bf16_from_float32(back), "BF16"), back)


def _header_file(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case,error", [
    ("empty", "shorter than"),
    ("huge_length", "exceeds the file"),
    ("bad_json", "not valid JSON"),
    ("not_object", "not a JSON object"),
    ("bad_dtype", "unsupported dtype"),
    ("bad_shape", "malformed shape"),
    ("offsets_mismatch", "do not match"),
    ("truncated_data", "truncated"),
    ("bad_metadata", "__metadata__"),
])
def test_corrupt_files_are_named_not_crashed(tmp_path, case, error):
    p = tmp_path / f"{case}.safetensors"
    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "empty":
        p.write_bytes(b"\x01\x02")
    elif case == "huge_length":
        p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif case == "bad_json":
        p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    elif case == "not_object":
        _header_file(p, [1, 2])  # type: ignore[arg-type]
    elif case == "bad_dtype":
        _header_file(p, {"t": {**ok, "dtype": "F8_E9"}}, b"\0" * 8)
    elif case == "bad_shape":
        _header_file(p, {"t": {**ok, "shape": [-1]}}, b"\0" * 8)
    elif case == "offsets_mismatch":
        _header_file(p, {"t": {**ok, "data_offsets": [0, 4]}}, b"\0" * 8)
    elif case == "truncated_data":
        _header_file(p, {"t": ok}, b"\0" * 5)
    elif case == "bad_metadata":
        _header_file(p, {"__metadata__": {"k": 1}, "t": ok}, b"\0" * 8)
    expected = UnsupportedModelError if case == "bad_dtype" else ModelFormatError
    with pytest.raises(expected, match=error):
        SafetensorsFile(p)


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    out = tmp_path / "m.safetensors"
    entries = [TensorEntry("a", "F32", (4,)), TensorEntry("b", "F32", (4,))]

    def arrays():
        yield np.zeros(4, np.float32)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_safetensors(out, entries, arrays(), {})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="declared"):
        write_safetensors(out, entries, [np.zeros(4, np.float32), np.zeros(5, np.float32)], {})
    assert list(tmp_path.iterdir()) == []
