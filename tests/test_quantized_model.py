"""The forward pass with 4-bit projections: same model, int8-activation noise, chosen unless --exact."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import edgeinfer_cli, write_gguf

from edgeinfer.layers import QuantLinear
from edgeinfer.model import Model
from edgeinfer.storage import open_model

# write_gguf takes the first suffix that matches: attn_output.weight must come before output.weight.
PROJECTIONS = {"attn_q.weight": "Q4_0", "attn_k.weight": "Q4_1", "attn_v.weight": "Q4_0",
               "attn_output.weight": "Q4_1", "ffn_gate.weight": "Q4_0", "ffn_up.weight": "Q4_1",
               "ffn_down.weight": "Q4_0", "token_embd.weight": "Q8_0", "output.weight": "Q8_0"}


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory, tiny_hf, tokenizer_json):
    return write_gguf(tmp_path_factory.mktemp("q4") / "q4.gguf", tiny_hf, tokenizer_json, types=PROJECTIONS)


def test_four_bit_projections_track_the_exact_path(q4_gguf):
    source = open_model(str(q4_gguf))
    exact, quant = Model(source), Model(source, quantized=True)
    assert exact.precision == "f32" and quant.precision == "q4"
    assert all(getattr(layer, n).bits == 4 for layer in quant.weights.layers for n in ("q", "k", "v", "o", "gate", "up", "down"))
    assert isinstance(quant.weights.head(), QuantLinear) and quant.weights.head().bits == 8  # output.weight stored Q8_0
    ids = np.arange(5, 69)
    lf = exact.forward(ids, exact.new_cache(64), all_logits=True)
    lq = quant.forward(ids, quant.new_cache(64), all_logits=True)
    assert np.abs(lq - lf).max() < 0.05 * np.abs(lf).max()
    assert (lq.argmax(-1) == lf.argmax(-1)).mean() >= 0.8


def test_cli_runs_four_bit_unless_exact(q4_gguf):
    fast = edgeinfer_cli("run", str(q4_gguf), "-p", "x", "-n", "4", "--temp", "0", "-v")
    exact = edgeinfer_cli("run", str(q4_gguf), "-p", "x", "-n", "4", "--temp", "0", "-v", "--exact")
    assert fast.returncode == exact.returncode == 0, fast.stderr + exact.stderr
    assert "weights: q4" in fast.stderr and "weights: f32" in exact.stderr


@pytest.mark.real_model
def test_smollm2_four_bit_path_agrees_with_float32(smollm2_gguf):
    """Next-token agreement of the 4-bit path (int8 activations) with float32 over real text."""
    from edgeinfer.tokenizer import Tokenizer

    source = open_model(str(smollm2_gguf))
    ids = np.asarray(Tokenizer(source.tokenizer).encode(open("/usr/share/common-licenses/GPL-3").read()[:1500]))
    exact, quant = Model(source), Model(source, quantized=True)
    lf = exact.forward(ids, exact.new_cache(len(ids)), all_logits=True)
    lq = quant.forward(ids, quant.new_cache(len(ids)), all_logits=True)
    agreement = float((lf.argmax(-1) == lq.argmax(-1)).mean())
    print(f"top-1 agreement of the 4-bit path with float32: {agreement:.3f} over {len(ids)} tokens")
    assert agreement >= 0.9


@pytest.mark.parametrize("arch,cache_type", [("llama", "f16"), ("qwen2", "f16"), ("llama", "q8_0")])  # qwen2: biases
def test_fused_decode_step_equals_the_layer_by_layer_path(tmp_path, tokenizer_json, arch, cache_type):
    """Decoding token by token through kernels/decode_layer.py gives the logits of the op-by-op 4-bit
    path, over either KV cache type of the 4-bit path."""
    from conftest import make_hf_model

    heads = {"num_attention_heads": 2, "num_key_value_heads": 1} if cache_type == "q8_0" else {}  # q8_0: 32 per head
    hf = make_hf_model(tmp_path / arch, tokenizer_json, arch=arch, **heads)
    model = Model(open_model(str(write_gguf(tmp_path / f"{arch}.gguf", hf, tokenizer_json, PROJECTIONS, arch))),
                  quantized=True, cache_type=cache_type)
    assert model.path.fused
    fused_path, by_op_path = model.path, dataclasses.replace(model.path, fused=False)
    ids = np.arange(5, 29)
    fused, by_op = model.new_cache(32), model.new_cache(32)
    model.forward(ids[:4], fused)
    model.forward(ids[:4], by_op)
    for token in ids[4:]:
        a = model.forward(np.array([token]), fused)
        model.path = by_op_path
        b = model.forward(np.array([token]), by_op)
        model.path = fused_path
        # int8 activations: the two paths' float rounding can flip a value by one step
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * np.abs(b).max())
    keys = lambda cache: np.stack([cache.float_keys(i, 0, cache.length)  # noqa: E731
                                   for i in range(model.config.num_layers)])
    np.testing.assert_allclose(keys(fused), keys(by_op), rtol=0, atol=2e-3 * np.abs(keys(by_op)).max())


@pytest.mark.parametrize("bits", [8, 4])
def test_float_models_are_quantized_at_load_as_convert_would(tiny_hf, tmp_path, bits):
    """A HF folder (float32) runs on the fused path, its matrices quantized at load exactly as
    `convert --bits` quantizes them: the same logits, bit for bit, as the converted file's."""
    from edgeinfer.storage.single import convert

    source = open_model(str(tiny_hf))
    loaded = Model(source, quantized=True, load_bits=bits)
    assert loaded.path.fused and loaded.precision == f"q{bits}, quantized on load"
    assert isinstance(loaded.weights.head(), QuantLinear) and loaded.weights.head().bits == 8
    convert(source, str(tmp_path / "c.safetensors"), bits=bits)
    converted = Model(open_model(str(tmp_path / "c.safetensors")), quantized=True)
    ids = np.arange(3, 40)
    np.testing.assert_array_equal(loaded.forward(ids, loaded.new_cache(48), all_logits=True),
                                  converted.forward(ids, converted.new_cache(48), all_logits=True))
    exact = edgeinfer_cli("run", str(tiny_hf), "-p", "x", "-n", "2", "--temp", "0", "-v", "--bits", str(bits))
    assert exact.returncode == 0 and f"weights: q{bits}, quantized on load" in exact.stderr, exact.stderr
