"""Each model input (HF folder, GGUF, single file) gives the model transformers defines."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import hf_logits, make_hf_model, permute_rope_rows, varied_lines, write_gguf

from edgeinfer.model import Model
from edgeinfer.session import open_engine
from edgeinfer.storage import open_model
from edgeinfer.storage.tensor_names import unit_of
from edgeinfer.tokenizer import Tokenizer

TOL = 1e-4  # tiny models, float32 on both sides


def our_logits(path, ids) -> np.ndarray:
    model = Model(open_model(str(path)))
    return model.forward(np.asarray(ids), model.new_cache(len(ids)), all_logits=True)


def prompt_ids(tokenizer_json: str) -> list[int]:
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(tokenizer_json).encode(" ".join(varied_lines(12, seed=5))).ids[:100]


@pytest.mark.oracle
@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 500.0}),
    ("mistral", {}),
    ("qwen2", {}),
    ("mistral", {"sliding_window": 24}),
    ("qwen3", {"head_dim": 32}),
    ("gemma3", {"sliding_window": 24, "layer_types": ["sliding_attention", "full_attention"],
                "query_pre_attn_scalar": 24, "head_dim": 32, "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}}}),
    ("phi3", {"pad_token_id": 0, "sliding_window": 24}),
    ("phi3", {"pad_token_id": 0, "original_max_position_embeddings": 128, "rope_scaling": {
        "rope_type": "longrope", "short_factor": [1 + i / 4 for i in range(8)], "long_factor": [1.0] * 8}}),
    ("phi3", {"pad_token_id": 0, "original_max_position_embeddings": 64, "partial_rotary_factor": 0.75,
              "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 6,
                               "long_factor": [1 + i / 2 for i in range(6)]}}),
], ids=["llama", "llama-tied", "llama3-rope", "linear-rope", "mistral", "qwen2-bias", "mistral-window", "qwen3",
        "gemma3", "phi3", "phi3.5-longrope-short", "phi4-mini-longrope-long-partial-rotary"])
def test_hf_folder_matches_transformers(tmp_path, tokenizer_json, arch, overrides):
    """Every family on the float32 path, against transformers: a sliding window of 24 over 100 tokens;
    LongRoPE's short factors within its original context (128), its long ones beyond it (64), with
    Phi-4-mini's partial rotary (12 of 16 dims)."""
    folder = make_hf_model(tmp_path / arch, tokenizer_json, arch, **overrides)
    ids = prompt_ids(tokenizer_json)
    source = open_model(str(folder))
    assert source.config.architecture == arch
    assert source.config.attention_bias == (arch == "qwen2")
    if "sliding_window" in overrides:
        assert source.config.sliding_window == 24 and source.config.local_layers
    np.testing.assert_allclose(our_logits(folder, ids), hf_logits(folder, ids), atol=TOL, rtol=0)


@pytest.mark.oracle
def test_sharded_hf_folder(tmp_path, tokenizer_json):
    folder = make_hf_model(tmp_path / "sharded", tokenizer_json, shards=3)
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 1
    ids = prompt_ids(tokenizer_json)
    np.testing.assert_allclose(our_logits(folder, ids), hf_logits(folder, ids), atol=TOL, rtol=0)


@pytest.mark.oracle
def test_gguf_undoes_rope_permutation(tiny_gguf, tiny_hf, tokenizer_json):
    """A float32 GGUF with llama.cpp's Q/K row order gives the HF model's logits, as transformers reads it."""
    ids = prompt_ids(tokenizer_json)
    ours = our_logits(tiny_gguf, ids)
    np.testing.assert_allclose(ours, hf_logits(tiny_hf, ids), atol=TOL, rtol=0)
    np.testing.assert_allclose(ours, hf_logits(tiny_gguf.parent, ids, gguf_file=tiny_gguf.name), atol=TOL, rtol=0)


def _dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (d * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)


def _dequant_q4(raw: np.ndarray, with_min: bool) -> np.ndarray:
    size = 20 if with_min else 18
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32) if with_min else None
    qs = blocks[:, size - 16:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)  # low nibbles first, then high
    return (d * q + m if with_min else d * (q - 8)).reshape(-1)


@pytest.mark.parametrize("qtype,dequant", [
    ("Q8_0", _dequant_q8_0),
    ("Q4_0", lambda r: _dequant_q4(r, False)),
    ("Q4_1", lambda r: _dequant_q4(r, True)),
])
def test_gguf_quantised_values_equal_the_files(tmp_path, tiny_hf, tokenizer_json, qtype, dequant):
    """Dequantised weights equal the block formula applied to the file's own bytes (and Q/K are unpermuted)."""
    import gguf

    path = write_gguf(tmp_path / f"{qtype}.gguf", tiny_hf, tokenizer_json, types={".weight": qtype})
    source = open_model(str(path))
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: t for t in reader.tensors}
    heads = source.config.num_heads
    for gname, hname in [("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                         ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                         ("token_embd.weight", "model.embed_tokens.weight")]:
        t = raw[gname]
        assert t.tensor_type.name == qtype
        in_file_order = dequant(np.asarray(t.data).reshape(-1)).reshape(source.stored_shape(hname))
        ours = source.float32(hname)
        if gname.endswith("attn_q.weight"):  # ours is in HF row order; llama.cpp's order is the file's
            ours = permute_rope_rows(ours, heads)
        np.testing.assert_array_equal(ours, in_file_order)
    logits = our_logits(path, prompt_ids(tokenizer_json))
    assert np.isfinite(logits).all()


def _k_quant_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: str) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (gguf-py cannot quantise K types)."""
    size = {"Q4_K": 144, "Q6_K": 210}[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    scale = np.array([0.01], dtype=np.float16).view(np.uint8)
    if qtype == "Q4_K":
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale  # dmin
    else:
        blocks[:, -2:] = scale
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "F16", "BF16"])
def test_gguf_other_types_load_and_run(tmp_path, tiny_hf, tokenizer_json, qtype):
    import gguf

    name = "model.layers.0.mlp.down_proj.weight"
    hf_w = open_model(str(tiny_hf)).float32(name)
    if qtype in ("Q4_K", "Q6_K"):  # gguf-py cannot quantise K types: random blocks with sane scales
        blocks = _k_quant_blocks(np.random.default_rng(0), *hf_w.shape, qtype)
        path = write_gguf(tmp_path / "t.gguf", tiny_hf, tokenizer_json, raw={"blk.0.ffn_down.weight": (blocks, qtype)})
    else:
        path = write_gguf(tmp_path / "t.gguf", tiny_hf, tokenizer_json, types={"ffn_down.weight": qtype})
    source = open_model(str(path))
    assert source.stored_type(name) == qtype
    w = source.float32(name)
    assert w.dtype == np.float32 and w.shape == hf_w.shape and np.isfinite(w).all()
    if qtype in ("Q4_K", "Q6_K"):
        expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(w.shape)
        np.testing.assert_array_equal(w, expected)
    elif qtype == "F16":  # exactly numpy's float16 rounding of the original
        np.testing.assert_array_equal(w, hf_w.astype(np.float16).astype(np.float32))
    else:  # bfloat16 keeps float32's range: within one rounding (8 significant bits)
        np.testing.assert_allclose(w, hf_w, rtol=2 ** -8, atol=0)
    assert np.isfinite(our_logits(path, prompt_ids(tokenizer_json))).all()


def test_gguf_tokenizer_matches_trained_tokenizer(tiny_gguf, tokenizer_json):
    from tokenizers import Tokenizer as HFTokenizer

    ref = HFTokenizer.from_str(tokenizer_json)
    source = open_model(str(tiny_gguf))
    assert source.tokenizer.built is not None  # built once, from the vocabulary: Tokenizer takes it as it is
    assert not {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"} & set(source._reader.metadata)  # not held twice
    tok = Tokenizer(source.tokenizer)
    rebuilt = Tokenizer(replace(source.tokenizer, built=None))  # as a converted file's start builds it
    assert source.tokenizer.eos_ids[0] == 2 and source.tokenizer.add_bos is False
    for line in varied_lines(300, seed=9) + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(line) == rebuilt.encode(line) == ref.encode(line, add_special_tokens=False).ids, line
        assert tok.decode(tok.encode(line)) == rebuilt.decode(tok.encode(line)) == ref.decode(ref.encode(line).ids)


@pytest.mark.parametrize("fixture", ["tiny_hf", "tiny_gguf"])
def test_convert_to_single_file_keeps_everything(request, tmp_path, tokenizer_json, fixture):
    from edgeinfer.storage.single import convert

    src_path = request.getfixturevalue(fixture)
    out = tmp_path / "model.safetensors"
    convert(open_model(str(src_path)), str(out))
    src, single = open_model(str(src_path)), open_model(str(out))
    assert single.format == "edgeinfer" and single.config == src.config
    # the same tokenizer; its merges stored as lines (tests/test_tokenizer.py)
    assert replace(single.tokenizer, data=src.tokenizer.data) == src.tokenizer
    text = "\n".join(varied_lines(200, seed=3))
    assert Tokenizer(single.tokenizer).encode(text) == Tokenizer(src.tokenizer).encode(text)
    for name in src.model_tensor_names():
        np.testing.assert_array_equal(single.float32(name), src.float32(name))
    ids = prompt_ids(tokenizer_json)
    np.testing.assert_array_equal(our_logits(out, ids), our_logits(src_path, ids))
    # Tensors are stored layer by layer: embeddings, layer 0, layer 1, ..., final norm; each of
    # these units starts on a 4 KiB page of the file (fillers named __pad.N in between).
    header_len = int.from_bytes(out.read_bytes()[:8], "little")
    header = json.loads(out.read_bytes()[8:8 + header_len])
    order = [k for k in header if k != "__metadata__" and not k.startswith("__pad.")]
    assert order == src.model_tensor_names()
    starts = [n for i, n in enumerate(order) if i == 0 or unit_of(n) != unit_of(order[i - 1])]
    assert len(starts) == src.config.num_layers + 2
    assert all((8 + header_len + header[n]["data_offsets"][0]) % 4096 == 0 for n in starts)


def test_single_file_runs_alone(tiny_single):
    engine = open_engine(str(tiny_single))
    ids = engine.prompt_ids("hello", raw=False)
    assert engine.tokenizer.decode(ids, skip_special=False).startswith("<|im_start|>user\nhello<|im_end|>")
    text = engine.generate(ids, max_tokens=8).run()
    assert isinstance(text, str) and engine.cache.length > len(ids)


@pytest.mark.oracle
def test_qwen2_gguf_keeps_row_order_and_biases(tmp_path, tokenizer_json):
    """llama.cpp does not permute Qwen2's Q/K rows; the q/k/v biases come along."""
    folder = make_hf_model(tmp_path / "qwen2", tokenizer_json, "qwen2")
    path = write_gguf(tmp_path / "qwen2.gguf", folder, tokenizer_json, arch="qwen2")
    source = open_model(str(path))
    assert source.config.architecture == "qwen2" and source.config.attention_bias
    ids = prompt_ids(tokenizer_json)
    np.testing.assert_allclose(our_logits(path, ids), hf_logits(folder, ids), atol=TOL, rtol=0)


@pytest.mark.oracle
def test_gguf_rope_freqs_tensor_carries_llama3_scaling(tmp_path, tokenizer_json):
    """llama.cpp stores Llama-3 RoPE scaling as per-pair divisors (rope_freqs.weight), not metadata."""
    import torch
    import transformers

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    folder = make_hf_model(tmp_path / "llama3", tokenizer_json, rope_scaling=scaling)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    scaled = hf.model.rotary_emb.inv_freq.double().numpy()
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    base = 1.0 / (hf.config.rope_parameters["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim))
    factors = (base / scaled).astype(np.float32)
    path = write_gguf(tmp_path / "llama3.gguf", folder, tokenizer_json, raw={"rope_freqs.weight": (factors, "F32")})
    source = open_model(str(path))
    assert source.config.rope_scaling is None and source.has("rope_freqs.weight")
    ids = prompt_ids(tokenizer_json)
    np.testing.assert_allclose(our_logits(path, ids), hf_logits(folder, ids), atol=TOL, rtol=0)


def test_hf_folder_with_sentencepiece_model(tmp_path, tokenizer_json):
    """A HF folder whose tokenizer is a tokenizer.model (sentencepiece) instead of tokenizer.json."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(varied_lines(2000, seed=6)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    folder = make_hf_model(tmp_path / "spm_model", tokenizer_json, vocab_size=600)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    source = open_model(str(folder))
    assert source.tokenizer.kind == "spm" and source.tokenizer.add_bos
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert source.tokenizer.bos_id == sp.bos_id() and sp.eos_id() in source.tokenizer.eos_ids
    tok = Tokenizer(source.tokenizer)
    for line in varied_lines(200, seed=8):
        assert tok.encode(line) == [sp.bos_id(), *sp.EncodeAsIds(line)]
    engine = open_engine(str(folder))
    gen = engine.generate(engine.prompt_ids("hello", raw=True), max_tokens=5)
    assert gen.run() == tok.decode(gen.token_ids)
    assert len(gen.token_ids) == 5 or gen.stats.finish_reason == "stop"


@pytest.mark.oracle
@pytest.mark.parametrize("arch,overrides", [
    ("gemma3", {"sliding_window": 24, "layer_types": ["sliding_attention", "full_attention"], "head_dim": 32}),
    ("qwen3", {"head_dim": 32}),
    ("llama", {"tie_word_embeddings": True}),
    ("phi3", {"pad_token_id": 0, "partial_rotary_factor": 0.75, "original_max_position_embeddings": 64,
              "rope_scaling": {"rope_type": "longrope", "short_factor": [1 + i / 8 for i in range(6)],
                               "long_factor": [1 + i / 2 for i in range(6)]},
              "initializer_range": 0.1}),  # LongRoPE's amplitude (1.15) sharpens the loud logits: quieter weights
], ids=["gemma3", "qwen3", "llama-tied", "phi4-mini-longrope"])
def test_families_fast_path_tracks_the_exact_path(tmp_path, tokenizer_json, arch, overrides):
    """The HF folder quantized at load (8 bits) runs the fused path, a sliding window included: its
    next tokens agree with the float32 path's but at near ties (these tiny random models' logits are
    loud: 8-bit weights and activations move them by up to 9% of their range, and 0.93-0.99 of the
    tokens agree), and each fused decode step continues the prefill."""
    folder = make_hf_model(tmp_path / arch, tokenizer_json, arch, **overrides)
    ids = np.asarray(prompt_ids(tokenizer_json))
    source = open_model(str(folder))
    exact, fast = Model(source), Model(source, quantized=True)
    assert fast.path.fused and fast.precision == "q8, quantized on load"
    lf = exact.forward(ids, exact.new_cache(len(ids)), all_logits=True)
    lq = fast.forward(ids, fast.new_cache(len(ids)), all_logits=True)
    top2 = np.sort(lf, axis=-1)[:, -2:]
    margin, flipped = top2[:, 1] - top2[:, 0], lq.argmax(-1) != lf.argmax(-1)
    assert flipped.mean() <= 0.1 and (margin[flipped] < np.median(margin) / 3).all()
    cache = fast.new_cache(len(ids))
    fast.forward(ids[:60], cache)
    steps = np.stack([fast.forward(ids[t:t + 1], cache) for t in range(60, len(ids))])  # past the window
    assert np.abs(steps - lq[60:]).max() < 0.02 * np.abs(lq).max()


@pytest.mark.oracle
def test_phi3_gguf_splits_its_fused_projections(tmp_path, tokenizer_json):
    """Phi-3 as llama.cpp writes it (attn_qkv, and ffn_up holding gate and up), F32 and Q8_0:
    read as separate projections, the float32 path gives transformers' logits; each part keeps its
    blocks losslessly."""
    folder = make_hf_model(tmp_path / "phi3", tokenizer_json, "phi3", pad_token_id=0, sliding_window=24)
    ids = prompt_ids(tokenizer_json)
    path = write_gguf(tmp_path / "phi3.gguf", folder, tokenizer_json, arch="phi3")
    np.testing.assert_allclose(our_logits(path, ids), hf_logits(folder, ids), atol=TOL, rtol=0)
    q8 = open_model(str(write_gguf(tmp_path / "phi3-q8.gguf", folder, tokenizer_json, arch="phi3",
                                   types={"attn_qkv.weight": "Q8_0", "ffn_up.weight": "Q8_0"})))
    assert q8.config.sliding_window == 24 and q8.stored_type("model.layers.1.mlp.up_proj.weight") == "Q8_0"
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        np.testing.assert_array_equal(q8.quantized(name).dequantize(), q8.float32(name))
    fast = Model(q8, quantized=True)
    assert fast.path.fused


@pytest.mark.parametrize("bits", [4, 8])
def test_synth_writes_a_gguf_of_its_shape(tmp_path, monkeypatch, bits):
    """`edgeinfer synth -o FILE.gguf`: a llama GGUF of the shape (tied head, the vocabulary's size)
    whose blocks gguf's own reader decodes to the values we load, whose vocabulary spells any text,
    and that runs on the 4/8-bit path."""
    import dataclasses

    import gguf

    from edgeinfer.storage import synth

    monkeypatch.setitem(synth.SHAPES, "tiny-llama", (64, 128, 2, 4, 2, 300, 10000.0, True))
    path = tmp_path / "tiny.gguf"
    synth.synth_gguf("tiny-llama", bits, str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]
    source, expected = open_model(str(path)), synth.synth_config("tiny-llama")
    assert dataclasses.replace(source.config, rms_norm_eps=expected.rms_norm_eps) == expected
    assert source.config.rms_norm_eps == pytest.approx(expected.rms_norm_eps)
    raw = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in raw  # tied
    for gname, hname, kind in [("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight", f"Q{bits}_0"),
                               ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", f"Q{bits}_0"),
                               ("token_embd.weight", "model.embed_tokens.weight", "Q8_0")]:
        t = raw[gname]
        assert t.tensor_type.name == kind
        ours = source.float32(hname)
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type))
        y = ours @ np.random.default_rng(0).standard_normal(ours.shape[1]).astype(np.float32)
        assert np.abs(y).max() > 0.1 and np.abs(y).max() < 50  # small steps: activations stay finite
    tok = Tokenizer(source.tokenizer)
    text = "the weather is fine, ünïcode too"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 300 and len(ids) < len(text.encode())  # merges apply
    model = Model(source, quantized=True)
    logits = model.forward(np.asarray(ids), model.new_cache(len(ids)), all_logits=True)
    assert logits.shape == (len(ids), 300) and np.isfinite(logits).all()


def test_synth_of_an_unknown_shape_is_one_line(tmp_path):
    from conftest import edgeinfer_cli

    r = edgeinfer_cli("synth", "--shape", "llama9-1t", "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 2 and r.stderr.strip() == ("edgeinfer: error: unknown shape 'llama9-1t' (known: llama2-7b, "
                                                      "llama2-13b, llama2-70b, llama3-8b, llama3.2-1b)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.oracle
def test_phi_longrope_and_partial_rotary_gguf(tmp_path, tokenizer_json):
    """Phi-3.5 / Phi-4-mini as llama.cpp writes them: LongRoPE's factors as two tensors, its
    attention factor and original context as keys, the rotary dims as rope.dimension_count (12 of
    16): the float32 path gives transformers' logits past the original context (long factors)."""
    import math

    short, long = [1 + i / 8 for i in range(6)], [1 + i / 2 for i in range(6)]
    folder = make_hf_model(tmp_path / "phi4", tokenizer_json, "phi3", pad_token_id=0, partial_rotary_factor=0.75,
                           original_max_position_embeddings=64,
                           rope_scaling={"rope_type": "longrope", "short_factor": short, "long_factor": long})
    attn_factor = math.sqrt(1 + math.log(256 / 64) / math.log(64))  # transformers' and llama.cpp's converter's rule
    path = write_gguf(tmp_path / "phi4.gguf", folder, tokenizer_json, arch="phi3",
                      raw={"rope_factors_long.weight": (np.array(long, np.float32), "F32"),
                           "rope_factors_short.weight": (np.array(short, np.float32), "F32")},
                      keys={"rope.dimension_count": 12, "rope.scaling.attn_factor": attn_factor,
                            "rope.scaling.original_context_length": 64})
    source = open_model(str(path))
    assert source.config.rotary_dim == 12 and source.config.rope_scaling["rope_type"] == "longrope"
    assert source.config.rope_scaling["attention_factor"] == pytest.approx(attn_factor, rel=1e-6)
    ids = prompt_ids(tokenizer_json)
    assert len(ids) > 64  # past the original context: the long factors, on both sides
    expected = hf_logits(folder, ids)
    np.testing.assert_allclose(our_logits(path, ids), expected, atol=TOL, rtol=0)
    model = Model(source)  # as a session: its cache, then the warm-up's small one; each keeps its factors
    cache = model.new_cache(len(ids))
    model.warm_up()
    np.testing.assert_allclose(model.forward(np.asarray(ids), cache, all_logits=True), expected, atol=TOL, rtol=0)
