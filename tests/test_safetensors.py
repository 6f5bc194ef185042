"""The safetensors reader validates before trusting; the writer streams and never leaves a partial file."""

from __future__ import annotations

import json
import os
import re
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


@pytest.fixture(scope="module")
def tiny_4bit(tmp_path_factory, tiny_hf):
    """A single file with 4- and 8-bit matrices (their parts: packed integers, scales) between float norms."""
    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    out = tmp_path_factory.mktemp("tiny_4bit") / "tiny.safetensors"
    convert(open_model(str(tiny_hf)), str(out), bits=4)
    return out


def _matrix_parts(path) -> list[str]:
    from edgeinfer.storage import open_model

    source = open_model(str(path))
    return [e.name for n in source.model_tensor_names() if (q := source.quantized_parts(n)) for e in q[1]]


@pytest.mark.parametrize("limits", [None, (3, 1 << 30, 0), (1024, 4096, 1 << 20)],
                         ids=["default", "3 buffers a call, no gap read through", "4 KB a call"])
def test_read_ahead_hands_over_what_plain_reads_give(tiny_4bit, monkeypatch, limits):
    """The single file's matrices read ahead in a thread, in calls split by buffer count, bytes and gaps
    (its float tensors lie between them), equal the plain reads, each handed over once."""
    from edgeinfer.storage import safetensors

    if limits:
        for name, value in zip(("READ_BUFFERS", "READ_BYTES", "READ_THROUGH"), limits):
            monkeypatch.setattr(safetensors, name, value)
    names = _matrix_parts(tiny_4bit)
    plain, ahead = SafetensorsFile(tiny_4bit), SafetensorsFile(tiny_4bit)
    ends = sorted((plain.offset(n), plain.offset(n) + plain.entries[n].nbytes) for n in names)
    assert len(names) > 20 and any(end < start for (_, end), (start, _) in zip(ends, ends[1:]))  # gaps
    ahead.read_ahead(names)
    for name in reversed(names):  # in any order
        got = ahead.read(name)
        np.testing.assert_array_equal(got, plain.read(name))
        assert got.flags.writeable and got.base is None  # an array of its own, not a view of a shared block
    assert not ahead._ahead
    np.testing.assert_array_equal(ahead.read(names[0]), plain.read(names[0]))  # a second read reads again
    ahead.close()


def test_an_empty_tensor_reads_as_empty(tmp_path):
    """A cluster share can hold no rows of a matrix (a node without KV heads): its tensor reads as an
    empty array, alone or among others read ahead."""
    path = tmp_path / "t.safetensors"
    _write(path, {"a": np.ones((4, 8), np.float32), "empty": np.zeros((0, 8), np.float32),
                  "b": np.full((2, 8), 2, np.float32)})
    f = SafetensorsFile(path)
    assert f.read("empty").shape == (0, 8)
    f.read_ahead(["a", "empty", "b"])
    assert f.read("empty").shape == (0, 8) and f.read("b").sum() == 32 and f.read("a").sum() == 32


def test_read_ahead_of_a_file_cut_short_says_which_tensor(tiny_4bit, tmp_path):
    """A file that ends early under a read ahead (cut after it was opened): the tensors before the cut
    are handed over, the first past it gets the plain read's one-line error naming it."""
    path = tmp_path / "cut.safetensors"
    path.write_bytes(tiny_4bit.read_bytes())
    names = _matrix_parts(path)
    f = SafetensorsFile(path)
    cut = names[len(names) // 2]
    os.truncate(path, f.offset(cut) + 1)
    f.read_ahead(names)
    with pytest.raises(ModelFormatError, match=f"ends inside tensor '{re.escape(cut)}'"):
        for name in names:
            f.read(name)
    plain = SafetensorsFile(tiny_4bit)
    np.testing.assert_array_equal(f.read(names[0]), plain.read(names[0]))
