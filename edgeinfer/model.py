"""The Llama-family forward pass (Llama 2/3, Mistral, SmolLM, Qwen2), exact float32.

    h = embed(tokens)
    for each layer:  h += attn(rmsnorm(h));  h += mlp(rmsnorm(h))
    logits = head(rmsnorm(h))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig, rope_inv_freq
from .errors import ContextOverflowError
from .kernels.reference import apply_rope, causal_attention, linear, rmsnorm, rope_tables, silu_mul
from .storage.source import ROPE_FREQS, WeightSource, layer_prefix


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    mlp_norm: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    b_gate: np.ndarray | None
    b_up: np.ndarray | None
    b_down: np.ndarray | None

    @classmethod
    def load(cls, source: WeightSource, i: int) -> "LayerWeights":
        p = layer_prefix(i)
        get = source.float32
        opt = lambda name: get(p + name) if source.has(p + name) else None  # noqa: E731
        return cls(attn_norm=get(p + "input_layernorm.weight"),
                   wq=get(p + "self_attn.q_proj.weight"), wk=get(p + "self_attn.k_proj.weight"),
                   wv=get(p + "self_attn.v_proj.weight"), wo=get(p + "self_attn.o_proj.weight"),
                   bq=opt("self_attn.q_proj.bias"), bk=opt("self_attn.k_proj.bias"), bv=opt("self_attn.v_proj.bias"),
                   mlp_norm=get(p + "post_attention_layernorm.weight"),
                   w_gate=get(p + "mlp.gate_proj.weight"), w_up=get(p + "mlp.up_proj.weight"),
                   w_down=get(p + "mlp.down_proj.weight"), b_gate=opt("mlp.gate_proj.bias"),
                   b_up=opt("mlp.up_proj.bias"), b_down=opt("mlp.down_proj.bias"))


class KVCache:
    """Keys (after RoPE) and values of every layer, preallocated for `capacity` positions."""

    def __init__(self, config: ModelConfig, capacity: int):
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.capacity = capacity
        self.length = 0

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


class Model:
    precision = "f32"  # what the weights are computed in (shown to the user)

    def __init__(self, source: WeightSource):
        self.config = c = source.config
        source.model_tensor_names()  # every tensor present, with its shape
        self.embed = source.float32("model.embed_tokens.weight")
        self.layers = [LayerWeights.load(source, i) for i in range(c.num_layers)]
        self.norm = source.float32("model.norm.weight")
        self.lm_head = self.embed if c.tie_embeddings else source.float32("lm_head.weight")
        freq_factors = source.float32(ROPE_FREQS) if source.has(ROPE_FREQS) else None
        self.inv_freq = rope_inv_freq(c, freq_factors)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity)

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at the cache's next positions; logits of the last token, or of all of them."""
        start, count = cache.length, len(tokens)
        if start + count > cache.capacity:
            raise ContextOverflowError(f"{start + count} tokens exceed the context of {cache.capacity}")
        eps = self.config.rms_norm_eps
        cos, sin = rope_tables(self.inv_freq, np.arange(start, start + count))
        h = self.embed[np.asarray(tokens)]
        for i, layer in enumerate(self.layers):
            h = h + self.attention(layer, rmsnorm(h, layer.attn_norm, eps), cache, i, cos, sin)
            h = h + self.mlp(layer, rmsnorm(h, layer.mlp_norm, eps))
        cache.length = start + count
        h = h if all_logits else h[-1:]
        logits = rmsnorm(h, self.norm, eps) @ self.lm_head.T
        return logits if all_logits else logits[0]

    def attention(self, w: LayerWeights, x: np.ndarray, cache: KVCache, layer: int,
                  cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        c = self.config
        count, start = x.shape[0], cache.length
        heads = lambda y, n: y.reshape(count, n, c.head_dim).transpose(1, 0, 2)  # noqa: E731
        q = apply_rope(heads(linear(x, w.wq, w.bq), c.num_heads), cos, sin)
        k = apply_rope(heads(linear(x, w.wk, w.bk), c.num_kv_heads), cos, sin)
        cache.k[layer, :, start:start + count] = k
        cache.v[layer, :, start:start + count] = heads(linear(x, w.wv, w.bv), c.num_kv_heads)
        end = start + count
        out = causal_attention(q, cache.k[layer, :, :end], cache.v[layer, :, :end], start)
        return linear(out.transpose(1, 0, 2).reshape(count, c.q_size), w.wo)

    def mlp(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        return linear(silu_mul(linear(x, w.w_gate, w.b_gate), linear(x, w.w_up, w.b_up)), w.w_down, w.b_down)
