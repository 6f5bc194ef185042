"""GGUF importer: llama.cpp's file format, read with the `gguf` package.

Tensors are renamed to Hugging Face's names; quantised ones come in as the kernels' matrices
(gguf_quants.py), and any dequantises to float32 on request. llama.cpp's
converter permutes the Q and K rows of `llama` models for its RoPE layout; that is undone here so
the forward pass has one RoPE convention (rotate-half, as transformers).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import struct
from dataclasses import dataclass

import numpy as np

from ..config import GEMMA3_LOCAL_PATTERN, ModelConfig, longrope_attention
from ..errors import ModelFormatError, UnsupportedModelError
from ..tokenizer import FAMILY_TEMPLATES, TokenizerSpec
from ..vocab import GGUFVocab, spec_from_gguf_vocab
from .gguf_quants import DECODERS, gguf_matrix
from .quantize import GGUF_LAYOUTS, Matrix, part_entries
from .source import WeightSource
from .tensor_names import EMBEDDING_WEIGHT, FINAL_NORM_WEIGHT, LM_HEAD_WEIGHT, ROPE_FREQS, layer_prefix, split_fused

# Architectures we read from GGUF -> (HF model_type, whether Q/K rows were permuted by llama.cpp).
GGUF_ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
                      "gemma3": ("gemma3", False), "phi3": ("phi3", False)}
ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
GEMMA3_LOCAL_THETA = 10000.0  # not in gemma3 GGUF metadata: llama.cpp fixes it too
SUPPORTED_TYPES = {"F32", "F16", "BF16", *DECODERS}
_GLOBAL_NAMES = {"token_embd.weight": EMBEDDING_WEIGHT, "output_norm.weight": FINAL_NORM_WEIGHT,
                 "output.weight": LM_HEAD_WEIGHT, "rope_freqs.weight": ROPE_FREQS}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                "attn_qkv": "self_attn.qkv_proj"}
_SANDWICH_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm"}  # Gemma: the MLP's input norm
_FUSED_UP_NAMES = {**_LAYER_NAMES, "ffn_up": "mlp.gate_up_proj"}  # Phi-3: ffn_up holds gate and up
_LLAMA_GGUF_NAMES = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_LLAMA_GGUF_LAYER_NAMES = {hf: g for g, hf in _LAYER_NAMES.items() if g != "post_attention_norm"}  # (Gemma's)
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    names = {"gemma3": _SANDWICH_NAMES, "phi3": _FUSED_UP_NAMES}.get(arch, _LAYER_NAMES)
    if m and m.group(2) in names:
        return f"{layer_prefix(int(m.group(1)))}{names[m.group(2)]}.{m.group(3)}"
    return None


def gguf_name(name: str) -> str:
    """A `llama` model's tensor name in GGUF: hf_name's inverse for that architecture."""
    if name in _LLAMA_GGUF_NAMES:
        return _LLAMA_GGUF_NAMES[name]
    m = re.match(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _LLAMA_GGUF_LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LLAMA_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ModelFormatError(f"no GGUF name for tensor {name!r} in a llama model")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves (rows, or a bias vector)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class FileRows:
    """A tensor's bytes in its file as (rows, bytes per row), read when asked for (`rows[a:b]`,
    `read()`) with pread into arrays of the process's own, never mapped.

    Mapped, a tensor's file pages counted in the process's resident memory, and letting them go
    (MADV_DONTNEED) did not keep them out: once the page cache holds a file in large folios (as it
    does once the file has been read, and so on every start after the first), touching one byte maps
    its whole folio, 1-2 MB, the pages of tensors already let go included (measured: SmolLM2's Q4_1
    GGUF held 51 MB of its 94 in the process after loading, against 6 MB for a file freshly written).
    Read, the pages stay in the page cache and out of the process."""

    def __init__(self, file, offset: int, rows: int, row_bytes: int):
        self._file, self.offset, self.shape = file, offset, (rows, row_bytes)
        self.nbytes = rows * row_bytes

    def part(self, first: int, end: int) -> FileRows:
        """Rows first..end-1 as a tensor of their own, not read."""
        return FileRows(self._file, self.offset + first * self.shape[1], end - first, self.shape[1])

    def __getitem__(self, rows: slice) -> np.ndarray:
        first, end, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("FileRows reads a run of rows")
        return self.part(first, max(first, end)).read()

    def read(self) -> np.ndarray:
        out = np.empty(self.shape, np.uint8)
        view, got = memoryview(out.reshape(-1)), 0
        while got < out.size:  # (Linux reads at most 2 GB a call: an F16 embedding of a large model is more)
            step = os.preadv(self._file.fileno(), [view[got:]], self.offset + got)
            if step == 0:
                raise ModelFormatError(f"{self._file.name}: {out.size - got} bytes of a tensor at {self.offset} "
                                       f"cannot be read: the file changed or was truncated")
            got += step
        return out


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: "gguf.GGMLQuantizationType"  # noqa: F821
    shape: tuple[int, ...]  # GGUF order: ne0 (the row length) first
    data: FileRows  # (rows, bytes per row), read on demand; data.offset: where in the file


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")  # a string's byte count


class GGUFFile:
    """The header (metadata and tensor index) of a GGUF file, parsed with struct from a mapping of
    the file that is closed once it is parsed; tensor data read on demand (FileRows).

    gguf-py's GGUFReader builds a numpy view per metadata element, which takes seconds for a 50k-token
    vocabulary; this reads the same header in a fraction of that.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")
        try:
            file_size = os.fstat(self._file.fileno()).st_size
            if file_size < 4 or self._file.read(4) != b"GGUF":
                raise ModelFormatError(f"{path}: not a GGUF file")
            with mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) as header:
                # unmapped once parsed: its pages (a vocabulary: 1.7 MB of SmolLM2's file) leave the process
                with memoryview(header) as self._buf:
                    self._pos = 4
                    self._parse(file_size)
        except BaseException:
            self._file.close()
            raise

    def _parse(self, file_size: int) -> None:
        import gguf

        path = self.path
        version, n_tensors, n_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version not in (2, 3):
            raise UnsupportedModelError(f"{path}: GGUF version {version} (supported: 2, 3)")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name, ndim = self._string(), self._unpack("<I")
            shape = tuple(self._unpack("<Q") for _ in range(ndim))
            infos.append((name, self._unpack("<I"), shape, self._unpack("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // align) * align
        self.tensors = []
        for name, type_id, shape, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
                block, size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise UnsupportedModelError(f"{path}: tensor {name} has unknown type id {type_id}") from None
            rows = int(np.prod(shape[1:], dtype=np.int64))
            row_bytes = shape[0] // block * size
            begin = data_start + offset
            if begin + rows * row_bytes > file_size:
                raise ModelFormatError(f"{path}: tensor {name} lies past the end of the file: truncated")
            self.tensors.append(GGUFTensor(name, qtype, shape, FileRows(self._file, begin, rows, row_bytes)))

    def value(self, key: str, default=None):
        return self.metadata.get(key, default)

    def take_vocab(self) -> GGUFVocab:
        """The vocabulary, its arrays taken out of the metadata: built into a tokenizer, they are
        garbage (SmolLM2's tokens and merges: 6 MB of Python strings, held through a load's peak)."""
        vocab = self._vocab()
        for key in ("tokens", "token_type", "scores", "merges"):
            self.metadata.pop(f"tokenizer.ggml.{key}", None)
        return vocab

    def _vocab(self) -> GGUFVocab:
        v = lambda key, default=None: self.value(f"tokenizer.ggml.{key}", default)  # noqa: E731
        return GGUFVocab(
            model=v("model", ""), pre=v("pre", "default"), tokens=v("tokens", []), token_types=v("token_type", []),
            scores=v("scores"), merges=v("merges"), bos_id=v("bos_token_id"), eos_id=v("eos_token_id"),
            extra_eos_ids=[t for t in (v("eot_token_id"), v("eom_token_id")) if t is not None],
            unk_id=v("unknown_token_id"), pad_id=v("padding_token_id"), add_bos=v("add_bos_token"),
            add_space_prefix=v("add_space_prefix"), chat_template=self.value("tokenizer.chat_template"))

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self._pos + size > len(self._buf):
            raise ModelFormatError(f"{self.path}: GGUF header ends early: truncated or corrupt")
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        if self._pos + n > len(self._buf):
            raise ModelFormatError(f"{self.path}: GGUF header ends early: truncated or corrupt")
        raw = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _strings(self, count: int) -> list[str]:
        """An array of strings (a vocabulary: 50k-262k of them) in one tight loop."""
        buf, pos, end, length, out = self._buf, self._pos, len(self._buf), _LENGTH.unpack_from, []
        for _ in range(count):
            if pos + 8 > end or pos + 8 + (n := length(buf, pos)[0]) > end:
                raise ModelFormatError(f"{self.path}: GGUF header ends early: truncated or corrupt")
            out.append(str(buf[pos + 8:pos + 8 + n], "utf-8", "replace"))
            pos += 8 + n
        self._pos = pos
        return out

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._unpack("<I"), self._unpack("<Q")
            if etype in _SCALARS:  # one numpy read for a whole numeric array
                dtype = np.dtype(_SCALARS[etype])
                if self._pos + count * dtype.itemsize > len(self._buf):
                    raise ModelFormatError(f"{self.path}: GGUF header ends early: truncated or corrupt")
                values = np.frombuffer(self._buf, dtype, count, self._pos).tolist()
                self._pos += count * dtype.itemsize
                return values
            if etype == _STRING:
                return self._strings(count)
            return [self._value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ModelFormatError(f"{self.path}: GGUF metadata has unknown value type {vtype}")
        return self._unpack(_SCALARS[vtype])


def read_gguf_tokenizer(path: str) -> TokenizerSpec:
    """The tokenizer of any GGUF file, whether or not its architecture runs here."""
    return spec_from_gguf_vocab(GGUFFile(path).take_vocab())


class GGUFSource(WeightSource):
    format = "gguf"

    def __init__(self, path: str):
        self.path = path
        self._reader = GGUFFile(path)
        arch = self._reader.value("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r} "
                                        f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
        self._hf_arch, self._permuted = GGUF_ARCHITECTURES[arch]
        self._tensors = {}
        for t in self._reader.tensors:
            name = hf_name(t.name, arch)
            if name is None:
                continue
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise UnsupportedModelError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name} "
                                            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
            self._tensors[name] = t
        self.config = self._config(arch)
        self._split_fused()
        self.tokenizer = spec_from_gguf_vocab(self._reader.take_vocab())
        if self.tokenizer.chat_template is None and arch in FAMILY_TEMPLATES:
            self.tokenizer = dataclasses.replace(self.tokenizer, chat_template=FAMILY_TEMPLATES[arch])

    def _config(self, arch: str) -> ModelConfig:
        value = lambda key, default=None: self._reader.value(f"{arch}.{key}", default)  # noqa: E731

        def need(key: str):
            if (v := value(key)) is None:
                raise ModelFormatError(f"{self.path}: GGUF metadata lacks {arch}.{key}")
            return v

        heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        layers = int(need("block_count"))
        embed = self._tensors.get(EMBEDDING_WEIGHT)
        if embed is None:
            raise ModelFormatError(f"{self.path}: GGUF file has no token_embd.weight")
        return ModelConfig(
            architecture=self._hf_arch,
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(value("attention.head_count_kv", heads)),
            head_dim=int(value("attention.key_length", hidden // heads)),
            vocab_size=int(embed.shape[-1]),
            max_context=int(value("context_length", 4096)),
            rms_norm_eps=float(value("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(value("rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(arch),
            tie_embeddings=LM_HEAD_WEIGHT not in self._tensors,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in self._tensors,
            **self._family_options(arch, hidden, layers),
        )

    def _split_fused(self) -> None:
        """Phi-3's fused projections (tensor_names.FUSED) as their parts: rows of the blocks, which
        are whole per row, so each part is a tensor of its own type."""
        for name in [n for n in self._tensors if split_fused(n, self.config)]:
            t = self._tensors.pop(name)
            for part, r0, r1 in split_fused(name, self.config):
                self._tensors[part] = GGUFTensor(t.name, t.tensor_type, (t.shape[0], r1 - r0), t.data.part(r0, r1))

    def _family_options(self, arch: str, hidden: int, layers: int) -> dict:
        """Gemma 3's and Phi-3's options; Gemma's GGUF stores norm weights with the + 1 already added."""
        if arch == "phi3":
            head_dim = hidden // int(self._reader.value(f"{arch}.attention.head_count"))
            rotary = int(self._reader.value(f"{arch}.rope.dimension_count", head_dim))  # Phi-4-mini's partial rotary
            window = int(self._reader.value(f"{arch}.attention.sliding_window", 0) or 0)
            return dict(sliding_window=window, local_layers=tuple(range(layers)) if window else (),
                        rotary_dim=0 if rotary == head_dim else rotary)
        if arch != "gemma3":
            return {}
        window = int(self._reader.value(f"{arch}.attention.sliding_window", 0) or 0)
        return dict(sandwich_norms=True, hidden_act="gelu_tanh", embed_scale=float(np.float32(hidden ** 0.5)),
                    sliding_window=window, rope_local_theta=GEMMA3_LOCAL_THETA,
                    local_layers=tuple(i for i in range(layers) if (i + 1) % GEMMA3_LOCAL_PATTERN))

    def _rope_scaling(self, arch: str) -> dict | None:
        import gguf

        factors = {t.name: t for t in self._reader.tensors if t.name in (ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)}
        if factors:  # LongRoPE (Phi-3.5, Phi-4-mini): its factors are tensors, its attention factor a key
            if len(factors) != 2:
                raise ModelFormatError(f"{self.path}: LongRoPE needs both {ROPE_FACTORS_LONG} and {ROPE_FACTORS_SHORT}")
            scaling = {"rope_type": "longrope", "attention_factor": self._reader.value(f"{arch}.rope.scaling.attn_factor"),
                       **{key: gguf.quants.dequantize(factors[name].data.read(), factors[name].tensor_type).reshape(-1).tolist()
                          for key, name in (("long_factor", ROPE_FACTORS_LONG), ("short_factor", ROPE_FACTORS_SHORT))}}
            return {**scaling, **longrope_attention(scaling, self._reader.value(f"{arch}.context_length"),
                                                    self._reader.value(f"{arch}.rope.scaling.original_context_length"))}
        kind = self._reader.value(f"{arch}.rope.scaling.type")
        if kind in (None, "none"):
            return None
        if kind != "linear":
            raise UnsupportedModelError(f"{self.path}: unsupported GGUF RoPE scaling {kind!r}")
        return {"rope_type": "linear", "factor": float(self._reader.value(f"{arch}.rope.scaling.factor", 1.0))}

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def stored_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def float32(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        try:
            w = gguf.quants.dequantize(t.data.read(), t.tensor_type).reshape(self.stored_shape(name))
        except (ValueError, IndexError) as exc:
            raise ModelFormatError(f"{self.path}: tensor {t.name} data is corrupt ({exc})") from None
        return np.ascontiguousarray(self._in_hf_row_order(name, w), dtype=np.float32)

    def quantized(self, name: str) -> Matrix | None:
        t = self._tensors[name]
        kind = t.tensor_type.name
        if kind not in DECODERS or len(t.shape) != 2:
            return None
        rows, cols = self.stored_shape(name)
        data = self._in_hf_row_order(name, t.data.read()) if self._permutes(name) else t.data  # (whole, or by slabs)
        return gguf_matrix(kind, data, cols)

    def _permutes(self, name: str) -> bool:
        return self._permuted and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))

    def _in_hf_row_order(self, name: str, w: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's Q/K row permutation (of values, or of whole rows of blocks)."""
        if not self._permutes(name):
            return w
        return unpermute_rope_rows(w, self.config.num_heads if ".q_proj." in name else self.config.num_kv_heads)

    def storable_type(self, name: str) -> str:
        return "F16" if self.stored_type(name) == "F16" else "F32"

    def storable(self, name: str) -> np.ndarray:
        w = self.float32(name)
        return w.astype(np.float16) if self.storable_type(name) == "F16" else w  # f16 -> f32 -> f16 is exact

    def file_size(self) -> int:
        return os.path.getsize(self.path)

    def resident_bytes(self) -> int:
        """Quantised tensors in their kernels' layouts (a 5-bit type takes 6 bits), the rest as stored."""
        total = 0
        for name, t in self._tensors.items():
            if t.tensor_type.name in GGUF_LAYOUTS and len(t.shape) == 2:
                rows, cols = self.stored_shape(name)
                total += sum(e.nbytes for e in part_entries(name, GGUF_LAYOUTS[t.tensor_type.name], rows, cols))
            else:
                total += t.data.nbytes
        return total
