"""ModelConfig: the shape of a Llama-family model, from HF config.json or GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelFormatError, UnsupportedModelError

# HF model_type values we run, and whether q/k/v carry biases by default.
ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True}


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

    def __post_init__(self) -> None:
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
        arch = cfg.get("model_type", "")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} in config.json (supported: {', '.join(ARCHITECTURES)})"
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope = dict(cfg.get("rope_parameters") or {})
            scaling = cfg.get("rope_scaling") or None
            theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
            if scaling is None and rope.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            return cls(
                architecture=arch,
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                max_context=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=_normalise_rope_scaling(scaling),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", ARCHITECTURES[arch])),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
            )
        except KeyError as exc:
            raise ModelFormatError(f"config.json lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(f"config.json has a bad value: {exc}") from None


def _normalise_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise UnsupportedModelError(f"unsupported RoPE scaling {kind!r} (supported: linear, llama3)")
    return {"rope_type": kind, **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")}}


def rope_inv_freq(config: ModelConfig, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Inverse frequencies per rotary pair, with the model's scaling applied (float64)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
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
