"""Every GGUF type in scope comes in losslessly (against gguf's own dequantisation) and runs on the
4/8-bit kernels: GEMV and GEMM against the numpy reference, shards that add up bit for bit, the
single file's layouts, and a model mixing the types whose fast path agrees with its float32 path."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.kernels.activations import quantize_activations
from edgeinfer.kernels.q4 import Q4Matrix, gemv_reference
from edgeinfer.kernels.q6 import Q2Matrix, Q3Matrix, Q5Matrix, Q6Matrix
from edgeinfer.kernels.q8 import Q8Matrix, gemv8_reference
from edgeinfer.storage.gguf_quants import DECODERS, gguf_matrix
from edgeinfer.kernels.scales import SuperScales, activation_span
from edgeinfer.storage.quantize import (GGUF_LAYOUTS, MATRIX_TYPES, fits, layout_of, matrix_from_parts, matrix_parts, part_entries,
                                        plain_type)

# Where each type keeps its fp16 fields (d, and dmin or m): random bytes anywhere else are a valid block.
HALVES = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0], "IQ4_XS": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
          "Q3_K": [108], "Q2_K": [80, 82]}


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, bytes per row) of valid random blocks, scales small enough for unit-sized products."""
    per, size, _, _ = DECODERS[kind]
    rng = np.random.default_rng([seed, sum(map(ord, kind))])
    b = rng.integers(0, 256, (rows * cols // per, size), dtype=np.uint8)
    for at in HALVES[kind]:
        b[:, at:at + 2] = (rng.random(len(b)) * 0.02 / np.sqrt(cols)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_every_type_dequantises_to_ggufs_values(kind):
    import gguf

    data = random_blocks(kind, 9, 512)
    expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).reshape(9, 512)
    m = gguf_matrix(kind, data, 512)
    np.testing.assert_array_equal(m.dequantize(), expected)
    np.testing.assert_array_equal(m.dequantize(np.array([8, 0, 3])), expected[[8, 0, 3]])
    assert fits(m, GGUF_LAYOUTS[kind]) and m.bits == layout_of(GGUF_LAYOUTS[kind]).bits


@pytest.mark.parametrize("kind", ["Q6_K", "Q4_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_slabs_join_into_the_same_matrix(monkeypatch, kind):
    """A tensor decoded a slab of rows at a time (filling one array) is the matrix decoded at once:
    blocks, scales, minima, and Q4_0/Q8_0's offsets that are their scales."""
    from edgeinfer.storage import gguf_quants

    data = random_blocks(kind, 37, 256, seed=1)
    whole = gguf_matrix(kind, data, 256)
    monkeypatch.setattr(gguf_quants, "SLAB_WEIGHTS", 1)  # one block of rows a slab (kernels/q4.py ROWS)
    slabbed = gguf_matrix(kind, data, 256)
    assert type(whole) is type(slabbed) and (whole.rows, whole.cols) == (slabbed.rows, slabbed.cols)
    assert (whole.offsets is whole.scales) == (slabbed.offsets is slabbed.scales)
    np.testing.assert_array_equal(whole.packed, slabbed.packed)
    for a, b in ((whole.scales, slabbed.scales), (whole.offsets, slabbed.offsets)):
        assert isinstance(a, SuperScales) == isinstance(b, SuperScales)
        if isinstance(a, SuperScales):
            assert a.shift == b.shift
            np.testing.assert_array_equal(a.d, b.d)
            np.testing.assert_array_equal(a.q, b.q)
        else:
            np.testing.assert_array_equal(a, b)


# Bits per weight held, by type (rows in whole blocks of 16): the integers in as many bits as the
# file's (2 to 6, or bytes), and the scales: fp16 per 32 for the plain types; the K-quants' own int8
# per group and fp16 d per 256. Each type's file holds as many but for Q3_K (3.4375) and Q2_K
# (2.625), whose 6- and 4-bit scales take a byte here.
HELD_BITS = {"Q4_0": 4.5, "Q4_1": 5, "Q4_K": 4 + 8 / 32 * 2 + 16 / 256 * 2, "Q6_K": 6 + 8 / 16 + 16 / 256,
             "Q5_0": 5.5, "Q5_1": 6, "Q5_K": 5 + (8 / 32 + 16 / 256) * 2, "Q3_K": 3 + 8 / 16 + 16 / 256,
             "Q2_K": 2 + (8 / 16 + 16 / 256) * 2, "IQ4_NL": 4.5, "IQ4_XS": 4 + 8 / 32 + 16 / 256}


@pytest.mark.parametrize("kind", sorted(HELD_BITS))
def test_k_quants_keep_their_two_level_scales(kind):
    rows, cols = 32, 1024
    m = gguf_matrix(kind, random_blocks(kind, rows, cols, seed=7), cols)
    assert m.nbytes * 8 / (rows * cols) == pytest.approx(HELD_BITS[kind])


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_kernels_equal_the_reference_for_every_type(kind):
    rows, cols = 37, 768
    m = gguf_matrix(kind, random_blocks(kind, rows, cols, seed=2), cols)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    one = quantize_activations(x[0])
    ref = (gemv_reference if m.bits == 4 else gemv8_reference)(m, one)  # the 8-bit reference reads any group size
    out = m.matmul(one, np.empty(rows, np.float32))
    np.testing.assert_allclose(out, ref, rtol=0, atol=np.abs(ref).max() * 2e-5)
    batch = m.matmul(quantize_activations(x), np.empty((3, rows), np.float32))
    np.testing.assert_array_equal(batch[0], out)  # the GEMM runs the GEMV's block per token
    exact = m.dequantize() @ x[0]  # int8 activations: within a percent of the float product
    assert np.abs(out - exact).max() < 0.02 * np.abs(exact).max()


def test_k_quants_take_activations_per_256_as_llama_cpps_q8_k():
    """llama.cpp quantises the activations of a K-quant's (and IQ4_XS's) dot products per 256 values
    (Q8_K), of the other types' per 32 (Q8_0). Each matrix takes its input so, in a prompt's
    products and in the fused decode step, which quantises an input once for the projections that
    share its span (q, k, v) and again where their types differ."""
    from edgeinfer.kernels.decode_layer import activation_buffers, project
    from edgeinfer.layers import QuantLinear

    rows, cols = 21, 768
    x = (np.random.default_rng(8).standard_normal(cols) * np.repeat([1, 5, 0.1], 256)).astype(np.float32)
    a = quantize_activations(x, span=256)
    d = np.abs(x).reshape(3, 256).max(axis=1) / np.float32(127)
    np.testing.assert_array_equal(a.scales[:24], np.repeat(d, 8))  # each group of 32 holds its block's scale
    np.testing.assert_array_equal(a.flat[:cols], np.rint(x / np.repeat(d, 256)).astype(np.int8))
    fine = quantize_activations(x)
    assert not np.array_equal(fine.scales, a.scales)

    xq, held = activation_buffers(cols), 0
    for kind in ["Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "Q5_0", "IQ4_NL", "Q2_K"]:
        m = gguf_matrix(kind, random_blocks(kind, rows, cols, seed=9), cols)
        span = activation_span(m.scales)
        assert span == (256 if kind.endswith("_K") or kind == "IQ4_XS" else 32)
        expected = m.matmul(quantize_activations(x, span=span), np.empty(rows, np.float32))
        np.testing.assert_array_equal(QuantLinear(m, None)(x[None])[0], expected)
        out = np.empty(rows, np.float32)
        held = project(m.kernel_args(), x, xq, held, out)
        assert held == span
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("kind", ["Q6_K", "Q2_K", "Q4_K", "Q5_1", "IQ4_XS"])
def test_column_shards_add_up_bit_for_bit(kind):
    """A cluster splits o_proj/down_proj by columns: the nodes' fixed-point partials add up to one
    node's sums exactly, whatever the groups (16 or 32) and scale types."""
    rows, cols = 12, 768
    m = gguf_matrix(kind, random_blocks(kind, rows, cols, seed=4), cols)
    x = np.random.default_rng(5).standard_normal(cols).astype(np.float32)
    whole = m.matmul(quantize_activations(x), np.empty(rows, np.int64))
    for cut in (288, 256):  # off and on the K-quants' 256-column super-blocks
        parts = [m.select(slice(0, rows), slice(a, b)) for a, b in ((0, cut), (cut, 768))]
        sums = sum(p.matmul(quantize_activations(x[a:b]), np.empty(rows, np.int64))
                   for p, (a, b) in zip(parts, ((0, cut), (cut, 768))))
        np.testing.assert_array_equal(sums, whole)
        np.testing.assert_array_equal(np.concatenate([p.dequantize() for p in parts], axis=1), m.dequantize())
        # a shard's file layout: the type's own on whole super-blocks, else plain float32 scales
        kept = isinstance(m.scales, SuperScales) and cut == 256
        assert all(isinstance(p.scales, SuperScales) == kept for p in parts)
        assert all(fits(p, GGUF_LAYOUTS[kind] if kept else plain_type(kind)) for p in parts)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_the_single_files_layout_round_trips(kind):
    rows, cols = 6, 512
    m = gguf_matrix(kind, random_blocks(kind, rows, cols, seed=6), cols)
    layout = GGUF_LAYOUTS[kind]
    parts = matrix_parts(m, layout)
    entries = part_entries("w", layout, rows, cols)
    assert [(p.shape, p.dtype.name) for p in parts] == [(e.shape, {"U8": "uint8", "I8": "int8", "F16": "float16",
                                                                                       "F32": "float32"}[e.dtype])
                                                         for e in entries]
    back = matrix_from_parts(layout, rows, cols, parts)
    assert isinstance(back, {2: Q2Matrix, 3: Q3Matrix, 4: Q4Matrix, 5: Q5Matrix, 6: Q6Matrix, 8: Q8Matrix}[m.bits])
    np.testing.assert_array_equal(back.dequantize(), m.dequantize())


@pytest.mark.parametrize("kind", ["Q6_K", "Q5_0", "Q5_K", "Q3_K", "Q2_K"])
def test_a_share_holding_no_rows_of_a_matrix_gets_an_empty_one(kind):
    """A cluster node without KV heads takes none of k_proj's and v_proj's rows (tests/test_cluster.py)."""
    m = gguf_matrix(kind, random_blocks(kind, 32, 256, seed=3), 256)
    empty = m.select(slice(0, 0), slice(0, 256))
    assert type(empty) is type(m) and (empty.rows, empty.cols, empty.packed.shape[0]) == (0, 256, 0)
    assert empty.dequantize().shape == (0, 256)


def test_format_6_files_name_their_2_and_3_bit_layouts_as_held_in_nibbles():
    import json

    from edgeinfer.storage.quantize import read_index

    index = {"a": ["q3g16-sk", 32, 256], "b": ["q2g16-sk-mk", 32, 256], "c": ["q6g16-sk", 32, 256]}
    for version, expected in (("6", ["q3g16-sk-w4", "q2g16-sk-mk-w4", "q6g16-sk"]), ("7", ["q3g16-sk", "q2g16-sk-mk", "q6g16-sk"])):
        read = read_index({"format_version": version, "quantized": json.dumps(index)}, "f")
        assert [read[n][0] for n in "abc"] == expected
        assert [e.shape for e in part_entries("a", read["a"][0], 32, 256)][0] == (2, 8 * 64 * (4 if version == "6" else 3))


def test_unknown_layouts_are_not_quantised():
    assert layout_of("IQ2_XXS") is None and layout_of("q4g16-s32") is None and layout_of("q8g16-s32-m16")


# One type per projection (and the embedding, tied head), as llama.cpp's Q4_K_M mixes them.
MIX = {"attn_q.weight": "Q4_K", "attn_k.weight": "Q5_0", "attn_v.weight": "Q6_K", "attn_output.weight": "Q5_K",
       "ffn_gate.weight": "Q3_K", "ffn_up.weight": "IQ4_XS", "ffn_down.weight": "Q2_K", "token_embd.weight": "Q6_K"}


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory, tokenizer_json):
    """A 256-wide model (K-quants need rows of 256) whose projections are random blocks of the MIX types."""
    from conftest import make_hf_model, write_gguf
    from safetensors.numpy import load_file

    # Trained norms: with transformers' unit ones, the first layer's inputs are the embedding's
    # integers times one factor, whose 256-value activation blocks meet exact rounding ties (e.g.
    # 127 * 16 / 32 = 63.5) that a prompt's norm and the decode step's, a last bit apart, break
    # either way. A trained model's norm weights leave no such ties.
    folder = make_hf_model(tmp_path_factory.mktemp("kquant_hf"), tokenizer_json, random_norms=True, hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    shapes = {k: v.shape for k, v in load_file(folder / "model.safetensors").items()}
    raw = {}
    for i in range(2):
        for suffix, hf in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                           ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                           ("ffn_down", "mlp.down_proj")):
            rows, cols = shapes[f"model.layers.{i}.{hf}.weight"]
            raw[f"blk.{i}.{suffix}.weight"] = (random_blocks(MIX[suffix + ".weight"], rows, cols, seed=i),
                                               MIX[suffix + ".weight"])
    rows, cols = shapes["model.embed_tokens.weight"]
    raw["token_embd.weight"] = (random_blocks("Q6_K", rows, cols, seed=9), "Q6_K")
    return write_gguf(tmp_path_factory.mktemp("kquant") / "mix.gguf", folder, tokenizer_json, raw=raw)


def test_a_model_mixing_the_types_runs_fused_and_tracks_float32(kquant_gguf):
    from edgeinfer.model import Model
    from edgeinfer.storage import open_model

    source = open_model(str(kquant_gguf))
    exact, quant = Model(source), Model(source, quantized=True)
    assert quant.path.fused and quant.precision == "q2" and exact.precision == "f32"  # its narrowest: Q2_K
    ids = np.arange(5, 37)
    lf = exact.forward(ids, exact.new_cache(40), all_logits=True)
    lq = quant.forward(ids, quant.new_cache(40), all_logits=True)
    assert np.abs(lq - lf).max() < 0.05 * np.abs(lf).max()
    assert (lq.argmax(-1) == lf.argmax(-1)).mean() >= 0.8
    cache = quant.new_cache(40)  # the fused decode step: token by token, as the prefill's last rows
    quant.forward(ids[:-1], cache)
    np.testing.assert_allclose(quant.forward(ids[-1:], cache), lq[-1], rtol=0, atol=1e-3 * np.abs(lq).max())


def test_convert_keeps_every_type_losslessly(kquant_gguf, tmp_path):
    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    source = open_model(str(kquant_gguf))
    out = tmp_path / "mix.safetensors"
    convert(source, str(out))
    back = open_model(str(out))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight"):
        assert back.stored_type(name) == GGUF_LAYOUTS[source.stored_type(name)]
        np.testing.assert_array_equal(back.float32(name), source.float32(name))


def test_a_format_6_file_with_2_and_3_bit_rows_in_nibbles_loads_and_converts_to_their_own_width(kquant_gguf, tmp_path):
    """Format 6 held Q3_K and Q2_K in nibbles under the names format 7 gives their own widths: such a
    file (made here from a conversion, its 2/3-bit rows written again in nibbles) loads them repacked,
    the very matrices, and converts into the file a GGUF converts into."""
    import json

    from edgeinfer.kernels.q6 import Q6Matrix
    from edgeinfer.storage import open_model
    from edgeinfer.storage.safetensors import SafetensorsFile, TensorEntry, write_safetensors
    from edgeinfer.storage.single import convert

    new = tmp_path / "v7.safetensors"
    convert(open_model(str(kquant_gguf)), str(new))
    f = SafetensorsFile(new)
    index = json.loads(f.metadata["quantized"])
    narrow = {name: (k, r, c) for name, (k, r, c) in index.items() if layout_of(k).bits in (2, 3)}
    assert {layout_of(k).bits for k, _, _ in narrow.values()} == {2, 3}
    source = open_model(str(new))
    nibbles = {}
    for name in narrow:
        m = source.quantized(name)
        nibbles[f"{name}.packed"] = type(m).from_values(*m.row_major(raw=True), width=4).packed
    entries = [TensorEntry(e.name, e.dtype, nibbles[e.name].shape) if e.name in nibbles else e for e in f.entries.values()]
    old = tmp_path / "v6.safetensors"
    write_safetensors(old, entries, (nibbles.get(e.name, f.array(e.name)) for e in entries),
                      {**f.metadata, "format_version": "6"})
    legacy = open_model(str(old))
    again = tmp_path / "v7-again.safetensors"
    convert(legacy, str(again))
    back = open_model(str(again))
    for name, (kind, _, _) in narrow.items():
        assert legacy.stored_type(name) == f"{kind}-w4" and back.stored_type(name) == kind
        for m in (legacy.quantized(name), back.quantized(name)):
            assert isinstance(m, Q6Matrix) and m.width == m.bits
            np.testing.assert_array_equal(m.packed, source.quantized(name).packed)
        np.testing.assert_array_equal(legacy.float32(name), source.float32(name))


def test_a_cluster_share_of_k_quants_converts_losslessly(kquant_gguf, tmp_path):
    """A node's share file (cluster/shard.py): columns cut off the 256-column super-blocks take plain
    float32 scales, whole super-blocks keep the type's own; every value as the source's."""
    from edgeinfer.cluster.plan import Share
    from edgeinfer.cluster.shard import ShardSource
    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    source = open_model(str(kquant_gguf))
    down, o_proj = "model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    for share, down_kept in ((Share(0, 1, 0, 128), False), (Share(1, 2, 256, 512), True)):
        shard = ShardSource(source, share)
        out = tmp_path / f"share{share.col_start}.safetensors"
        convert(shard, str(out))
        back = open_model(str(out))
        assert back.stored_type(down) == (GGUF_LAYOUTS["Q2_K"] if down_kept else plain_type("Q2_K"))
        assert back.stored_type(o_proj) == plain_type("Q5_K")  # a KV head's 128 query columns
        for name in (down, o_proj, "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
            np.testing.assert_array_equal(back.float32(name), shard.float32(name))


def test_the_memory_plan_counts_what_the_types_expand_to(kquant_gguf):
    """The preflight counts the matrices as loaded (Q3_K's and Q2_K's scales in bytes, the padding
    to whole blocks), not the file."""
    from edgeinfer.storage import open_model

    source = open_model(str(kquant_gguf))
    held = sum(m.nbytes if (m := source.quantized(n)) is not None else source.float32(n).nbytes
               for n in source.names())
    assert source.resident_bytes() == held > source.file_size()


@pytest.mark.parametrize("kind", ["Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q3_K", "Q2_K"])
def test_six_bit_layout_is_as_close_to_the_exact_product_as_the_bytes_layout(kind):
    """These types were held in bytes (q8.py) before the 5- and 6-bit layouts: the same integers'
    dots, but a signed type's offset term is -32 times the activations' sum here against -128 times
    there, so the float rounding differs: measured against the float64 reference, never worse
    (closer for the signed types: less cancellation); a batch's row is the single token's bits."""
    rows, cols = 40, 1280
    m = gguf_matrix(kind, random_blocks(kind, rows, cols, seed=9), cols)
    assert type(m) is {"Q5": Q5Matrix, "Q3": Q3Matrix, "Q2": Q2Matrix}.get(kind[:2], Q6Matrix)
    values, scales, minima = m.row_major(raw=True)
    as_bytes = Q8Matrix.from_values(values, scales, minima)
    rng = np.random.default_rng(10)
    errors = {"6": [], "8": []}
    for _ in range(8):
        x = quantize_activations(rng.standard_normal(cols).astype(np.float32))
        ref = gemv8_reference(m, x)
        for name, matrix in (("6", m), ("8", as_bytes)):
            errors[name].append(np.abs(matrix.matmul(x, np.empty(rows, np.float32)) - ref).max() / np.abs(ref).max())
    assert np.mean(errors["6"]) <= np.mean(errors["8"]) * 1.01 and max(errors["6"]) < 2e-6, errors
    x = rng.standard_normal((5, cols)).astype(np.float32)
    np.testing.assert_array_equal(m.matmul(quantize_activations(x), np.empty((5, rows), np.float32))[0],
                                  m.matmul(quantize_activations(x[0]), np.empty(rows, np.float32)))
    np.testing.assert_array_equal(m.dequantize(np.array([39, 2])), as_bytes.dequantize(np.array([39, 2])))


@pytest.mark.parametrize("kind,old", [("Q5_0", "q6g32-s16"), ("Q5_1", "q6g32-s16-m16"), ("Q5_K", "q6g32-sk-mk"),
                                      ("Q3_K", "q6g16-sk"), ("Q2_K", "q8g16-sk-mk"), ("Q3_K", "q3g16-sk-w4"),
                                      ("Q2_K", "q2g16-sk-mk-w4")])
def test_narrow_types_held_wider_before_still_load_and_agree(kind, old):
    """Single files converted before the narrower layouts hold Q5_0/Q5_1/Q5_K and Q3_K in 6 bits,
    Q2_K in bytes: they load as such, with the same integers and values as the narrower matrix, and
    the two give the same products bit for bit (a signed type's integers are moved to the 6-bit
    range in the kernel; the bytes' kernel adds its units' terms in the same order), in the GEMV and
    the GEMM. Format 6's Q3_K and Q2_K in nibbles (-w4) are repacked at load into the very matrix a
    conversion now gives."""
    rows, cols = 40, 1280
    five = gguf_matrix(kind, random_blocks(kind, rows, cols, seed=4), cols)
    values, scales, minima = five.row_major(raw=True)
    wide = layout_of(old)
    held = {"width": wide.width} if wide.width else {}
    stored = MATRIX_TYPES[wide.bits].from_values(values, scales, minima, **held)
    assert fits(stored, old) and not fits(five, old)
    back = matrix_from_parts(old, rows, cols, matrix_parts(stored, old))
    if wide.width:
        assert stored.nbytes > five.nbytes and back.width == back.bits == five.bits
        np.testing.assert_array_equal(back.packed, five.packed)
    else:
        assert back.bits == wide.bits and back.nbytes > five.nbytes
    np.testing.assert_array_equal(back.dequantize(), five.dequantize())
    np.testing.assert_array_equal(back.row_major()[0], five.row_major()[0])
    x = np.random.default_rng(5).standard_normal((5, cols)).astype(np.float32)
    for q in (quantize_activations(x), quantize_activations(x[0])):
        shape = (5, rows) if q.flat.ndim == 2 else rows
        np.testing.assert_array_equal(five.matmul(q, np.empty(shape, np.float32)),
                                      back.matmul(q, np.empty(shape, np.float32)))


def test_a_gguf_tensor_is_read_slab_by_slab_and_never_mapped(monkeypatch, kquant_gguf):
    """A GGUF's tensors are read (pread) a slab of rows at a time as they convert, and the file is
    not mapped once its header is parsed: a large tensor is never all in the process beside its
    converted copy (Gemma 3's 170 MB embedding), and no file page stays in it (mapped, a tensor's
    pages stayed once the page cache held the file in large folios: 51 of SmolLM2's Q4_1 file's
    94 MB after a load)."""
    from conftest import mappings
    from edgeinfer.storage import gguf_quants, open_model
    from edgeinfer.storage.gguf import FileRows
    from edgeinfer.storage.tensor_names import EMBEDDING_WEIGHT

    monkeypatch.setattr(gguf_quants, "SLAB_WEIGHTS", 1)  # one block of rows a slab
    source = open_model(str(kquant_gguf))
    rows, cols = source.stored_shape(EMBEDDING_WEIGHT)
    assert rows > 32 and not [path for path, _, _ in mappings() if path == str(kquant_gguf)]
    reads, read = [], FileRows.read
    monkeypatch.setattr(FileRows, "read", lambda self: (reads.append(self.shape[0]), read(self))[1])
    slabbed = source.quantized(EMBEDDING_WEIGHT)
    assert reads == [16] * (rows // 16) + ([rows % 16] if rows % 16 else [])
    whole = source._tensors[EMBEDDING_WEIGHT].data.read()
    assert whole.shape == (rows, cols // 256 * 210) and whole.any()
    np.testing.assert_array_equal(slabbed.packed, gguf_matrix("Q6_K", whole, cols).packed)
    for name in source.names():
        assert source.quantized(name) is not None or source.float32(name).size
    assert not [path for path, _, _ in mappings() if path == str(kquant_gguf)]
