"""4/8-bit matrices in the single file: lossless from GGUF, round-to-nearest from floats, `convert --bits`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import edgeinfer_cli, write_gguf

from edgeinfer.model import Model
from edgeinfer.storage import open_model
from edgeinfer.storage.quantize import quantize_q4_1, quantize_q8_0
from edgeinfer.storage.single import convert
from edgeinfer.storage.tensor_names import ENDS

# write_gguf takes the first suffix that matches: attn_output.weight must come before output.weight.
MIXED = {"attn_q.weight": "Q4_0", "attn_k.weight": "Q4_1", "attn_v.weight": "Q8_0", "attn_output.weight": "Q4_1",
         "ffn_gate.weight": "Q4_0", "ffn_up.weight": "Q4_1", "ffn_down.weight": "Q4_0",
         "token_embd.weight": "Q8_0", "output.weight": "Q8_0"}


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory, tiny_hf, tokenizer_json):
    return write_gguf(tmp_path_factory.mktemp("mixed") / "mixed.gguf", tiny_hf, tokenizer_json, types=MIXED)


def test_rounding_to_nearest_stays_within_half_a_step():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((37, 320)) * rng.uniform(0.01, 3, (37, 1))).astype(np.float32)
    for m, steps in ((quantize_q4_1(w), 15), (quantize_q8_0(w), 254)):
        groups = w.reshape(37, -1, 32)
        span = (groups.max(axis=2) - groups.min(axis=2) if steps == 15 else 2 * np.abs(groups).max(axis=2))
        error = np.abs(m.dequantize() - w).reshape(37, -1, 32).max(axis=2)
        assert np.all(error <= span / steps * 0.5 * 1.01 + 1e-6)  # half a step (plus fp16 rounding of the step)


@pytest.mark.parametrize("bits", [None, 4])
def test_gguf_quantised_matrices_come_in_losslessly(mixed_gguf, tmp_path, bits):
    out = tmp_path / "q.safetensors"
    convert(open_model(str(mixed_gguf)), str(out), bits=bits)
    gguf, single = open_model(str(mixed_gguf)), open_model(str(out))
    for name in gguf.model_tensor_names():
        kind = gguf.stored_type(name)
        expected = kind if bits is None or kind != "Q8_0" or name in ENDS else "Q4_1"  # 4 bits: v_proj too
        assert single.stored_type(name) == (expected if kind != "F32" else "F32"), name
        if single.stored_type(name) == kind:
            np.testing.assert_array_equal(single.float32(name), gguf.float32(name))
    if bits is None:  # the same matrices: the same logits on the 4-bit path, bit for bit
        ids = np.arange(3, 40)
        a, b = Model(gguf, quantized=True), Model(single, quantized=True)
        np.testing.assert_array_equal(a.forward(ids, a.new_cache(48), all_logits=True),
                                      b.forward(ids, b.new_cache(48), all_logits=True))


def test_reconverting_a_quantised_file_keeps_its_bytes(mixed_gguf, tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    convert(open_model(str(mixed_gguf)), str(first), bits=4)
    convert(open_model(str(first)), str(second), bits=4)
    data = lambda raw: raw[8 + int.from_bytes(raw[:8], "little"):]  # noqa: E731 (after each header)
    assert data(first.read_bytes()) == data(second.read_bytes())


def test_a_file_of_another_format_is_refused_in_one_line(mixed_gguf, tmp_path, monkeypatch):
    # A single file stores the kernels' own arrays: one written with other layouts (an earlier
    # format) must be refused, not read as garbage, and the message says what to do.
    from edgeinfer.storage import single

    old = tmp_path / "old.safetensors"
    monkeypatch.setattr(single, "FORMAT_VERSION", "3")
    convert(open_model(str(mixed_gguf)), str(old), bits=4)
    monkeypatch.undo()
    r = edgeinfer_cli("run", str(old), "-p", "hello", "-n", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "format 3" in r.stderr and "convert its source again" in r.stderr


@pytest.mark.parametrize("bits,types", [(4, {"Q4_1", "Q8_0", "F32"}), (8, {"Q8_0", "F32"}), (16, {"F16", "F32"})])
def test_float_models_convert_to_each_width(tiny_hf, tokenizer_json, tmp_path, bits, types):
    out = tmp_path / f"b{bits}.safetensors"
    r = edgeinfer_cli("convert", str(tiny_hf), "-o", str(out), "--bits", str(bits))
    assert r.returncode == 0, r.stderr
    single = open_model(str(out))
    assert {single.stored_type(n) for n in single.model_tensor_names()} == types
    # The weights' rounding is bounded above; here the kernels against the float32 path over the
    # same dequantised weights (only the int8 activations differ).
    ids = np.arange(3, 40)
    exact, model = Model(single), Model(single, quantized=True, load_bits=None)  # F16 stays float: not rounded
    assert model.precision == {4: "q4", 8: "q8", 16: "f32"}[bits]
    reference = exact.forward(ids, exact.new_cache(48), all_logits=True)
    ours = model.forward(ids, model.new_cache(48), all_logits=True)
    assert np.abs(ours - reference).max() < 0.05 * np.abs(reference).max()
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.8
    run = edgeinfer_cli("run", str(out), "-p", "hello", "-n", "4", "--temp", "0")
    assert run.returncode == 0 and run.stdout.strip(), run.stderr


def test_a_malformed_quantised_index_is_one_clear_error(mixed_gguf, tmp_path):
    from edgeinfer.storage.safetensors import SafetensorsFile, write_safetensors

    good = tmp_path / "good.safetensors"
    convert(open_model(str(mixed_gguf)), str(good), bits=4)
    f = SafetensorsFile(good)
    index = json.loads(f.metadata["quantized"])
    name = next(iter(index))
    index[name][2] += 32  # columns that do not match the stored parts
    entries = list(f.entries.values())
    # a tensor's wrong shape; a list of pairs where the index is an object
    for i, (listed, named) in enumerate([(index, name), (list(index.items()), "malformed")]):
        bad = tmp_path / f"bad{i}.safetensors"
        write_safetensors(bad, entries, (f.array(e.name) for e in entries), {**f.metadata, "quantized": json.dumps(listed)})
        r = edgeinfer_cli("run", str(bad), "-p", "x", "-n", "1")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and named in r.stderr, r.stderr
