"""ModelConfig: the shape of a model and its family's options, from HF config.json or GGUF metadata.

The families differ by options the forward pass and kernels take, not by code paths of their own:
Llama/Mistral/Qwen2 are the plain case; Qwen3 adds RMSNorm of each query and key head; Gemma 3 adds
that, norms of the attention and MLP outputs ("sandwich"), a GELU(tanh) gate, embeddings scaled by
sqrt(hidden), and local layers that attend over a sliding window with their own RoPE base.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelFormatError, UnsupportedModelError

# HF model_type values we run, and whether q/k/v carry biases by default.
ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True, "qwen3": False, "gemma3": False, "phi3": False}
ACTIVATIONS = ("silu", "gelu_tanh")
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
GEMMA3_LOCAL_PATTERN = 6  # Gemma 3: five local (sliding-window) layers, then one global, repeated


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    layers_only: bool = False  # a cluster worker's share: no embedding or head in the file
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # RMSNorm of the attention's and the MLP's outputs too (Gemma 3)
    hidden_act: str = "silu"  # the MLP gate's activation: silu or gelu_tanh
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden))
    query_scale: float = 0.0  # attention scores' scale; 0 means 1/sqrt(head_dim)
    sliding_window: int = 0  # a local layer attends over this many positions, its own included
    local_layers: tuple[int, ...] = ()  # the layers that attend over the sliding window
    rope_local_theta: float = 0.0  # RoPE base of the local layers (0: rope_theta, and their scaling)
    rotary_dim: int = 0  # the leading dims of each head RoPE rotates (0: all; Phi-4-mini's partial rotary)

    def __post_init__(self) -> None:
        object.__setattr__(self, "local_layers", tuple(int(i) for i in self.local_layers))  # JSON gives a list
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported activation {self.hidden_act!r} (supported: {', '.join(ACTIVATIONS)})")
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r} (supported: {', '.join(ARCHITECTURES)})"
            )
        dims = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
        headless = self.num_heads == self.num_kv_heads == 0  # a cluster node's shard without attention heads
        for name in dims:
            if int(getattr(self, name)) <= 0 and not (headless and name in ("num_heads", "num_kv_heads")):
                raise ModelFormatError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if not headless and self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"model config: {self.num_heads} attention heads do not divide into {self.num_kv_heads} KV heads"
            )
        if self.head_dim % 2:
            raise ModelFormatError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ModelFormatError(f"model config: rotary_dim {self.rotary_dim} must be even and at most "
                                   f"head_dim {self.head_dim}")

    @property
    def attention_scale(self) -> float:
        return self.query_scale or 1.0 / float(np.sqrt(self.head_dim))

    def window(self, layer: int) -> int:
        """How many positions layer `layer` attends over: the sliding window, or 0 for all."""
        return self.sliding_window if layer in self.local_layers else 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            data = json.loads(text)
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise ModelFormatError(f"model config in file metadata is invalid: {exc}") from None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """From a Hugging Face config.json (transformers 4 or 5 spelling of RoPE)."""
        arch = {"gemma3_text": "gemma3"}.get(cfg.get("model_type", ""), cfg.get("model_type", ""))
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} in config.json (supported: {', '.join(ARCHITECTURES)})"
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            layers = int(cfg["num_hidden_layers"])
            rope = dict(cfg.get("rope_parameters") or {})
            local_rope = dict(rope.pop("sliding_attention", None) or {})
            rope = dict(rope.pop("full_attention", None) or rope)  # transformers 5: one set per layer type
            scaling = cfg.get("rope_scaling") or None
            theta = cfg.get("rope_theta", rope.get("rope_theta", 1e6 if arch == "gemma3" else 10000.0))
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
                raise UnsupportedModelError("logit soft-capping (Gemma 2) is not supported")
            family = _family_options(arch, cfg, hidden, layers, local_rope)
            return cls(
                architecture=arch,
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                max_context=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=_normalise_rope_scaling(scaling, cfg),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),
                attention_bias=bool(cfg.get("attention_bias", ARCHITECTURES[arch])),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                **family,
            )
        except KeyError as exc:
            raise ModelFormatError(f"config.json lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(f"config.json has a bad value: {exc}") from None


def _family_options(arch: str, cfg: dict[str, Any], hidden: int, layers: int,
                    local_rope: dict[str, Any]) -> dict[str, Any]:
    """The options of a HF config that are not the Llama case."""
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in _HF_ACTIVATIONS:
        raise UnsupportedModelError(f"unsupported activation {act!r} (supported: {', '.join(_HF_ACTIVATIONS)})")
    options: dict[str, Any] = {"hidden_act": _HF_ACTIVATIONS[act], "qk_norm": arch in ("qwen3", "gemma3")}
    window = int(cfg.get("sliding_window") or 0)
    if arch == "gemma3":
        types = cfg.get("layer_types") or ["full_attention" if (i + 1) % GEMMA3_LOCAL_PATTERN == 0 else
                                           "sliding_attention" for i in range(layers)]
        options.update(sandwich_norms=True, embed_scale=float(np.float32(hidden ** 0.5)),
                       query_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5, sliding_window=window,
                       local_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
                       rope_local_theta=float(local_rope.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))))
    elif window and arch in ("mistral", "phi3") and cfg.get("use_sliding_window", True):
        options.update(sliding_window=window, local_layers=tuple(range(layers)))
    rotary = float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    if rotary != 1.0:
        head_dim = int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"]))
        options["rotary_dim"] = int(head_dim * rotary)  # as transformers rounds it
    return options


def _normalise_rope_scaling(scaling: dict[str, Any] | None, cfg: dict[str, Any]) -> dict[str, Any] | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = {"su": "longrope"}.get(kind, kind)  # Phi-3's first spelling
    if kind == "default":
        return None
    if kind not in ("linear", "llama3", "longrope"):
        raise UnsupportedModelError(f"unsupported RoPE scaling {kind!r} (supported: linear, llama3, longrope)")
    out = {"rope_type": kind, **{k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}}
    if kind == "longrope":
        out.update(longrope_attention(out, cfg.get("max_position_embeddings"),
                                      out.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))))
    return out


def longrope_attention(scaling: dict[str, Any], context: int | None, original: int | None) -> dict[str, Any]:
    """LongRoPE's context the short factors serve and its attention factor (transformers' rule: from
    the ratio of the extended to the original context, unless the file gives it)."""
    original = int(original or context or 4096)
    factor = float(scaling.get("factor") or (context or original) / original)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else float(np.sqrt(1 + np.log(factor) / np.log(original)))
    return {"original_max_position_embeddings": original, "attention_factor": float(attention)}


def rope_table(config: ModelConfig, freq_factors: np.ndarray | None = None, local: bool = False,
               context: int = 0) -> np.ndarray:
    """RoPE of a layer as (2, rotary pairs) float64: each pair's inverse frequency (rope_inv_freq)
    and amplitude, what its cos and sin are multiplied by (LongRoPE's attention factor; else 1)."""
    inv_freq = rope_inv_freq(config, freq_factors, local, context)
    scaling = {} if local and config.rope_local_theta else config.rope_scaling or {}
    return np.stack([inv_freq, np.full_like(inv_freq, float(scaling.get("attention_factor", 1.0)))])


def rope_inv_freq(config: ModelConfig, freq_factors: np.ndarray | None = None, local: bool = False,
                  context: int = 0) -> np.ndarray:
    """Inverse frequencies per rotary pair (rotary_dim / 2 of them), with the model's scaling
    applied (float64); of the local layers when `local` and they have a base of their own
    (unscaled, as Gemma 3's). LongRoPE divides by its long factors when `context` exceeds the
    original context, else by its short ones (as llama.cpp chooses by the context size)."""
    dim = config.rotary_dim or config.head_dim
    own = local and config.rope_local_theta
    theta = config.rope_local_theta if own else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = {} if own else config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif scaling.get("rope_type") == "longrope":
        long = context > int(scaling["original_max_position_embeddings"])
        factors = np.asarray(scaling["long_factor" if long else "short_factor"], np.float64)
        if factors.shape != inv_freq.shape:
            raise ModelFormatError(f"longrope: {factors.size} factors for {inv_freq.size} rotary pairs")
        inv_freq = inv_freq / factors
    if freq_factors is not None:
        # GGUF stores Llama-3 style scaling as a per-pair divisor tensor (rope_freqs.weight).
        inv_freq = inv_freq / np.asarray(freq_factors, dtype=np.float64)
    return inv_freq


def _llama3_inv_freq(inv_freq: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_context = float(s.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled)
