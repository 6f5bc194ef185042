"""Random-weight models with real shapes, for memory and speed tests (never for quality).

`synth` writes edgeinfer's single file tensor by tensor through the converter: the matrices are
made directly in the kernels' layout from random bytes (nothing float, nothing whole in memory),
with small fp16 scales so the activations stay finite. The tokenizer is byte-level BPE over the 256
bytes, no merges, so the file runs end to end.

`synth_gguf` writes the same kind of model as a `llama` GGUF that llama.cpp loads as well (so both
engines can run the very same file): Q4_0 or Q8_0 blocks made from random bytes in ggml's layout,
and a byte-level BPE vocabulary padded to the shape's size with unused pieces.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from ..config import ModelConfig
from ..errors import EdgeInferError
from ..kernels.q4 import Q4Matrix
from ..kernels.q8 import Q8Matrix
from ..tokenizer import TokenizerSpec
from .source import WeightSource
from .tensor_names import ENDS, model_tensor_shapes

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, rope theta, tied embeddings
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, 10000.0, False),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000, 10000.0, False),
    "llama2-70b": (8192, 28672, 80, 64, 8, 32000, 10000.0, False),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 500000.0, False),
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 128256, 500000.0, True),  # (without llama3 RoPE scaling: same cost)
}
# A block's step, times 1 / sqrt(columns), so that a row's products stay near unit size whatever its width.
STEP = {"Q4_0": 0.5, "Q8_0": 0.06}


def synth_config(shape: str) -> ModelConfig:
    if shape not in SHAPES:
        raise EdgeInferError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")
    hidden, ffn, layers, heads, kv_heads, vocab, theta, tied = SHAPES[shape]
    return ModelConfig("llama", hidden, ffn, layers, heads, kv_heads, hidden // heads, vocab, 4096, 1e-5, theta,
                       tie_embeddings=tied)


def byte_pieces() -> list[str]:
    """The 256 bytes as byte-level BPE spells them (GPT-2's byte alphabet), in byte order."""
    alphabet = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = dict(zip(alphabet, alphabet)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return [chr(chars[b]) for b in range(256)]


def byte_tokenizer() -> TokenizerSpec:
    """Byte-level BPE over the 256 bytes (GPT-2's byte alphabet), no merges, and an end token."""
    vocab = {piece: b for b, piece in enumerate(byte_pieces())}
    data = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": 256, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True}],
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                                  "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {**vocab, "</s>": 256}, "merges": []}}
    return TokenizerSpec("hf", json.dumps(data).encode(), None, (256,), False)


class SynthSource(WeightSource):
    """Random tensors of a real shape, made when asked: 4-bit (Q4_0) or 8-bit (Q8_0) matrices, unit norms."""

    def __init__(self, shape: str, bits: int, seed: int = 0):
        if bits not in (4, 8):
            raise EdgeInferError(f"synth writes 4- or 8-bit models, got --bits {bits}")
        self.config, self.tokenizer = synth_config(shape), byte_tokenizer()
        self.path, self.format, self.bits, self.seed = f"synth:{shape}", "synth", bits, seed
        self._shapes = dict(model_tensor_shapes(self.config))

    def names(self) -> list[str]:
        return list(self._shapes)

    def has(self, name: str) -> bool:
        return name in self._shapes

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def stored_type(self, name: str) -> str:
        if len(self._shapes[name]) == 1:
            return "F32"
        return "Q8_0" if self.bits == 8 or name in ENDS else "Q4_0"

    def file_size(self) -> int:
        return 0

    def rng(self, name: str) -> np.random.Generator:
        """A tensor's own random stream: the same bytes whichever file it is written to."""
        return np.random.default_rng([self.seed, sum(map(ord, name)), len(name)])

    def float32(self, name: str) -> np.ndarray:
        matrix = self.quantized(name)
        return np.ones(self._shapes[name], np.float32) if matrix is None else matrix.dequantize()

    def quantized(self, name: str) -> Q4Matrix | Q8Matrix | None:
        kind = self.stored_type(name)
        if kind == "F32":
            return None
        rows, cols = self._shapes[name]
        rng = self.rng(name)
        packed_shape, (blocks, groups) = (Q4Matrix.array_shapes(rows, cols) if kind == "Q4_0"
                                          else Q8Matrix.array_shapes(rows, cols, 32))
        packed = np.frombuffer(rng.bytes(packed_shape[0] * packed_shape[1]), np.uint8).reshape(packed_shape)
        scale = STEP[kind] / np.sqrt(cols)
        scales = (rng.random((blocks, groups), np.float32) * scale + scale / 2).astype(np.float16).view(np.uint16)
        if kind == "Q8_0":
            return Q8Matrix(packed, scales, scales, -128.0, rows, cols)
        return Q4Matrix(packed, scales, scales, -8.0, rows, cols)


def synth(shape: str, bits: int, out_path: str, progress: Callable[[int, int], None] | None = None) -> None:
    from .single import convert

    convert(SynthSource(shape, bits), out_path, progress, bits=bits)


# A few merges, so the vocabulary is a BPE llama.cpp accepts (it wants at least one; gguf writes no
# empty array): byte-level spellings of common English pairs, each merged piece appended in order.
_MERGES = ("Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s", "r e", "a n")


def _gguf_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str], int]:
    """Pieces, their GGUF types, merges and the end token's id: the 256 bytes, the merged pieces,
    an end token, then unused pieces up to the shape's vocabulary size."""
    from ..vocab import CONTROL, NORMAL, UNUSED

    pieces = byte_pieces() + [m.replace(" ", "") for m in _MERGES]
    end = len(pieces)
    pieces.append("</s>")
    types = [NORMAL] * end + [CONTROL]
    if vocab_size < len(pieces):
        raise EdgeInferError(f"a GGUF vocabulary needs at least {len(pieces)} pieces, the shape has {vocab_size}")
    types += [UNUSED] * (vocab_size - len(pieces))
    pieces += [f"<unused{i}>" for i in range(vocab_size - len(pieces))]
    return pieces, types, list(_MERGES), end


def _ggml_blocks(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    """A (rows, bytes per row) matrix of ggml Q4_0 or Q8_0 blocks: an fp16 step then the quants,
    random, with steps as SynthSource's."""
    import gguf

    size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
    blocks = rng.integers(0, 256, (rows, cols // 32, size), np.uint8)
    step = STEP[kind] / np.sqrt(cols)
    steps = (rng.random((rows, cols // 32), np.float32) * step + step / 2).astype(np.float16)
    blocks[:, :, :2] = steps[..., None].view(np.uint8)
    return blocks.reshape(rows, cols // 32 * size)


def synth_gguf(shape: str, bits: int, out_path: str, progress: Callable[[int, int], None] | None = None) -> None:
    """Write a random model of `shape` as a `llama` GGUF: matrices Q4_0 (`bits` 4) or Q8_0, the
    embedding and any separate head Q8_0 (as edgeinfer's own 4-bit files; llama.cpp's quantizer
    would pick Q6_K), norms F32. One tensor in memory at a time; the file appears only when whole."""
    import gguf

    from .gguf import gguf_name

    source = SynthSource(shape, bits)
    c = source.config
    pieces, types, merges, end = _gguf_vocab(c.vocab_size)
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(f"edgeinfer synth {shape}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if bits == 4 else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_context_length(c.max_context)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_layers)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(end)
    w.add_eos_token_id(end)
    w.add_add_bos_token(False)
    names = source.model_tensor_names()
    kinds = {n: source.stored_type(n) for n in names}
    for n in names:
        shape_n = source.stored_shape(n)
        if kinds[n] == "F32":
            w.add_tensor_info(gguf_name(n), shape_n, np.dtype(np.float32), 4 * shape_n[0])
        else:
            kind = gguf.GGMLQuantizationType[kinds[n]]
            byte_shape = gguf.quant_shape_to_byte_shape(shape_n, kind)
            w.add_tensor_info(gguf_name(n), byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, n in enumerate(names):
            if kinds[n] == "F32":
                w.write_tensor_data(np.ones(source.stored_shape(n), np.float32))
            else:
                w.write_tensor_data(_ggml_blocks(source.rng(n), *source.stored_shape(n), kinds[n]))
            if progress:
                progress(i + 1, len(names))
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        os.replace(tmp, out_path)
    finally:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
