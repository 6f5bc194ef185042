"""GGUF importer: llama.cpp's file format, read with the `gguf` package.

Tensors are renamed to Hugging Face's names and dequantised to float32 on request. llama.cpp's
converter permutes the Q and K rows of `llama` models for its RoPE layout; that is undone here so
the forward pass has one RoPE convention (rotate-half, as transformers).
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError, UnsupportedModelError
from ..tokenizer import TokenizerSpec
from ..vocab import GGUFVocab, spec_from_gguf_vocab
from .source import ROPE_FREQS, WeightSource

# Architectures we read from GGUF -> (HF model_type, whether Q/K rows were permuted by llama.cpp).
GGUF_ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight", "rope_freqs.weight": ROPE_FREQS}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves (rows, or a bias vector)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # gguf raises ValueError/struct errors/IndexError on bad files
        raise ModelFormatError(f"{path}: GGUF file is truncated or corrupt ({exc})") from None


class GGUFMetadata:
    """Typed access to a GGUF file's key-value metadata."""

    def __init__(self, reader, path: str):
        self._fields, self.path = reader.fields, path

    def value(self, key: str, default=None):
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as exc:
            raise ModelFormatError(f"{self.path}: GGUF metadata {key} is corrupt ({exc})") from None

    def vocab(self) -> GGUFVocab:
        v = lambda key, default=None: self.value(f"tokenizer.ggml.{key}", default)  # noqa: E731
        return GGUFVocab(
            model=v("model", ""), pre=v("pre", "default"), tokens=v("tokens", []), token_types=v("token_type", []),
            scores=v("scores"), merges=v("merges"), bos_id=v("bos_token_id"), eos_id=v("eos_token_id"),
            extra_eos_ids=[t for t in (v("eot_token_id"), v("eom_token_id")) if t is not None],
            unk_id=v("unknown_token_id"), pad_id=v("padding_token_id"), add_bos=v("add_bos_token"),
            add_space_prefix=v("add_space_prefix"), chat_template=self.value("tokenizer.chat_template"))


def read_gguf_tokenizer(path: str) -> TokenizerSpec:
    """The tokenizer of any GGUF file, whether or not its architecture runs here."""
    return spec_from_gguf_vocab(GGUFMetadata(_read(path), path).vocab())


class GGUFSource(WeightSource):
    format = "gguf"

    def __init__(self, path: str):
        self.path = path
        self._reader = _read(path)
        self._meta = GGUFMetadata(self._reader, path)
        arch = self._meta.value("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r} "
                                        f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
        self._hf_arch, self._permuted = GGUF_ARCHITECTURES[arch]
        self._tensors = {}
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise UnsupportedModelError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name} "
                                            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
            self._tensors[name] = t
        self.config = self._config(arch)
        self.tokenizer = spec_from_gguf_vocab(self._meta.vocab())

    def _config(self, arch: str) -> ModelConfig:
        value = lambda key, default=None: self._meta.value(f"{arch}.{key}", default)  # noqa: E731

        def need(key: str):
            if (v := value(key)) is None:
                raise ModelFormatError(f"{self.path}: GGUF metadata lacks {arch}.{key}")
            return v

        heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        embed = self._tensors.get("model.embed_tokens.weight")
        if embed is None:
            raise ModelFormatError(f"{self.path}: GGUF file has no token_embd.weight")
        return ModelConfig(
            architecture=self._hf_arch,
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(value("attention.head_count_kv", heads)),
            head_dim=int(value("attention.key_length", hidden // heads)),
            vocab_size=int(embed.shape[-1]),
            max_context=int(value("context_length", 4096)),
            rms_norm_eps=float(value("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(value("rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(arch),
            tie_embeddings="lm_head.weight" not in self._tensors,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
        )

    def _rope_scaling(self, arch: str) -> dict | None:
        kind = self._meta.value(f"{arch}.rope.scaling.type")
        if kind in (None, "none"):
            return None
        if kind != "linear":
            raise UnsupportedModelError(f"{self.path}: unsupported GGUF RoPE scaling {kind!r}")
        return {"rope_type": "linear", "factor": float(self._meta.value(f"{arch}.rope.scaling.factor", 1.0))}

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
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(self.stored_shape(name))
        except (ValueError, IndexError) as exc:
            raise ModelFormatError(f"{self.path}: tensor {t.name} data is corrupt ({exc})") from None
        return np.ascontiguousarray(self._in_hf_row_order(name, w), dtype=np.float32)

    def quantized(self, name: str) -> tuple[np.ndarray, str] | None:
        t = self._tensors[name]
        if t.tensor_type.name not in ("Q4_0", "Q4_1", "Q8_0"):
            return None
        blocks = np.asarray(t.data).reshape(self.stored_shape(name)[0], -1)
        return self._in_hf_row_order(name, blocks), t.tensor_type.name

    def _in_hf_row_order(self, name: str, w: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's Q/K row permutation (of values, or of whole rows of blocks)."""
        if self._permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            return unpermute_rope_rows(w, self.config.num_heads)
        if self._permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            return unpermute_rope_rows(w, self.config.num_kv_heads)
        return w

    def storable_type(self, name: str) -> str:
        return "F16" if self.stored_type(name) == "F16" else "F32"

    def storable(self, name: str) -> np.ndarray:
        w = self.float32(name)
        return w.astype(np.float16) if self.storable_type(name) == "F16" else w  # f16 -> f32 -> f16 is exact

    def file_size(self) -> int:
        return os.path.getsize(self.path)
