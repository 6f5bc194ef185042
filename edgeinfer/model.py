"""The Llama-family forward pass (Llama 2/3, Mistral, SmolLM, Qwen2): exact float32, or with the
projections a file stores in 4 bits run by the 4-bit kernels.

    h = embed(tokens)
    for each layer:  h += attn(rmsnorm(h));  h += mlp(rmsnorm(h))
    logits = head(rmsnorm(h))
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import ModelConfig, rope_inv_freq
from .errors import ContextOverflowError, EdgeInferError, UnsupportedModelError
from .kernels.block import decode_attention, decode_layer, decode_mlp, decode_scratch
from .kernels.lut_attention import EXACT_SLOTS, KEYS_PER_BLOCK, attend_causal_lut, encode_keys_into, lut_buffers
from .kernels.ops import LANES, attend_causal, rope_rows
from .kernels.reference import apply_rope, causal_attention, rmsnorm, rope_tables, silu_mul
from .kernels.simd import from_fixed, has_kernels
from .layers import DenseLinear, QuantLinear, load_linear
from .storage.quantize import TYPES as QUANTIZED_TYPES
from .storage.scheduler import LayerStream, StreamedRows
from .storage.single import SingleFileSource
from .storage.source import HEAD, ROPE_FREQS, WeightSource, layer_prefix

Linear = DenseLinear | QuantLinear


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    mlp_norm: np.ndarray
    gate: Linear
    up: Linear
    down: Linear

    @classmethod
    def load(cls, source: WeightSource, i: int, quantized: bool) -> "LayerWeights":
        p = layer_prefix(i)
        lin = lambda name: load_linear(source, f"{p}{name}.weight", quantized)  # noqa: E731
        return cls(attn_norm=source.float32(p + "input_layernorm.weight"),
                   q=lin("self_attn.q_proj"), k=lin("self_attn.k_proj"), v=lin("self_attn.v_proj"),
                   o=lin("self_attn.o_proj"), mlp_norm=source.float32(p + "post_attention_layernorm.weight"),
                   gate=lin("mlp.gate_proj"), up=lin("mlp.up_proj"), down=lin("mlp.down_proj"))

    def block_args(self) -> tuple | None:
        """The layer as the fused decode kernel takes it (kernels/block.py), or None when a projection
        is dense float32 (the exact path, or a type with no kernel yet)."""
        projections = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        if not all(isinstance(p, QuantLinear) for p in projections):
            return None
        bias = lambda p: p.bias if p.bias is not None else np.zeros(0, np.float32)  # noqa: E731
        return (self.attn_norm, self.mlp_norm, *(p.matrix.kernel_args() for p in projections),
                bias(self.q), bias(self.k), bias(self.v))


def projection_types(source: WeightSource) -> set[str]:
    """The types the file stores the layers' projections in: all of them 4/8-bit runs the fused path."""
    c = source.config
    return {source.stored_type(f"{layer_prefix(i)}{p}.weight") for i in range(c.num_layers) for p in PROJECTIONS}


def cache_size(source: WeightSource, capacity: int, quantized: bool, attention: str) -> int:
    """Bytes of the KV cache that Model(source, quantized, attention=...) makes for `capacity`
    positions, known before any weight is read (the memory plan's)."""
    fused = quantized and has_kernels() and projection_types(source) <= set(QUANTIZED_TYPES)
    books = source.key_codebooks() if attention == "lut" and fused else None
    return KVCache.size(source.config, capacity, books is not None, books.d_sub if books else None)


def lazy_zeros(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """Zeros whose pages become resident as they are written. numpy advises huge pages for large
    arrays, and with the cache's layout (each head's positions contiguous) the first token's keys
    would then make every head's whole 2 MB page resident: a 7B model's 4096-token cache took 4.3 GB
    of RSS before anything was cached. A plain anonymous mapping has no such advice."""
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1)), dtype, count).reshape(shape)


class KVCache:
    """Keys (after RoPE) and values of every layer, preallocated for `capacity` positions, and the
    decode step's buffers, whose attention scores are as long as the cache.

    With LUT attention a key is its codes (`lut`), `k` holds only EXACT_SLOTS float keys per layer
    and KV head (the first positions and a ring of the recent ones, which score exactly, kept by the
    LUT kernels themselves), and values are fp16 (uint16 bits), as NoMAD keeps them: at long contexts
    the value pass is then most of attention's reads. Exact attention keeps float32 keys and values
    (with fp16 values "hi" no longer got llama.cpp's greedy answer: a near tie)."""

    def __init__(self, config: ModelConfig, capacity: int, codebooks: list[np.ndarray] | None = None,
                 half_values: bool = False):
        """codebooks: per layer, for LUT attention."""
        key_positions = capacity if codebooks is None else EXACT_SLOTS
        self.k = lazy_zeros((config.num_layers, config.num_kv_heads, key_positions, config.head_dim))
        self.v = lazy_zeros((config.num_layers, config.num_kv_heads, capacity, config.head_dim),
                            np.uint16 if half_values else np.float32)
        self.capacity = capacity
        self.length = 0
        self.scratch = decode_scratch(config.hidden_size, config.q_size, config.num_kv_heads * config.head_dim,
                                      config.intermediate_size, config.num_heads, capacity)
        self.lut = [lut_buffers(books, config.num_heads, capacity) for books in codebooks or [None] * config.num_layers]

    @staticmethod
    def size(config: ModelConfig, capacity: int, half_values: bool, d_sub: int | None) -> int:
        """Bytes of the keys, codes and values of a cache as __init__ makes it (d_sub: LUT attention's)."""
        per_position = config.num_layers * config.num_kv_heads * config.head_dim
        values = per_position * capacity * (2 if half_values else 4)
        if d_sub is None:
            return values + per_position * capacity * 4
        blocks = -(-capacity // KEYS_PER_BLOCK)
        return values + per_position * (EXACT_SLOTS * 4 + blocks * KEYS_PER_BLOCK // (2 * d_sub))

    def store_values(self, layer: int, start: int, values: np.ndarray) -> None:
        """Values (kv_heads, count, head_dim) float32 of positions start.. into the cache."""
        self.v[layer, :, start:start + values.shape[1]] = \
            values.astype(np.float16).view(np.uint16) if self.v.dtype == np.uint16 else values

    def values(self, layer: int, end: int) -> np.ndarray:
        """Values (kv_heads, end, head_dim) of positions 0..end-1, float32 (for numpy)."""
        v = self.v[layer, :, :end]
        return v.view(np.float16).astype(np.float32) if v.dtype == np.uint16 else v

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


class ResidentWeights:
    """Every layer in memory, loaded once; without embedding and head when `ends` is false (a
    cluster worker: the master keeps them)."""

    def __init__(self, source: WeightSource, quantized: bool, ends: bool = True):
        c = source.config
        self.embedding = load_linear(source, "model.embed_tokens.weight", quantized) if ends else None
        self.layers = [LayerWeights.load(source, i, quantized) for i in range(c.num_layers)]
        self._head = None if not ends else self.embedding if c.tie_embeddings else \
            load_linear(source, "lm_head.weight", quantized)
        self._blocks = [layer.block_args() for layer in self.layers]
        self.fused = all(b is not None for b in self._blocks)
        bits = {lin.bits for layer in self.layers for lin in (layer.q, layer.gate, layer.down)}
        self.precision = "q4" if 4 in bits else "q8" if 8 in bits else "f32"

    def layer(self, i: int) -> tuple[LayerWeights, tuple | None]:
        return self.layers[i], self._blocks[i]

    def head(self) -> Linear:
        return self._head

    def done(self, key: int | str) -> None:
        pass


class StreamedWeights:
    """Layers and head read into a sliding window of slots as the forward pass reaches them
    (storage/scheduler.py); embedding rows read on demand."""

    def __init__(self, source: SingleFileSource, quantized: bool, window: int, ends: bool = True):
        c = source.config
        self.quantized, self.stream = quantized, LayerStream(source, window, head=ends)
        self.embedding = StreamedRows(source, "model.embed_tokens.weight") if ends else None
        self._head_name = "model.embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"
        types = projection_types(source)
        self.fused = quantized and types <= set(QUANTIZED_TYPES)
        self.precision = "f32" if not quantized else "q4" if types & {"Q4_0", "Q4_1"} else "q8" if "Q8_0" in types \
            else "f32"

    def layer(self, i: int) -> tuple[LayerWeights, tuple | None]:
        layer = LayerWeights.load(self.stream.acquire(i), i, self.quantized)
        return layer, layer.block_args()

    def head(self) -> Linear:
        return load_linear(self.stream.acquire(HEAD), self._head_name, self.quantized)

    def done(self, key: int | str) -> None:
        self.stream.release(key)


class Model:
    def __init__(self, source: WeightSource, quantized: bool = False, window: int | None = None,
                 attention: str = "exact", ends: bool = True):
        """quantized: run the weights the file stores as Q4_0/Q4_1/Q8_0 with the 4/8-bit kernels
        (on CPUs that have their instructions); otherwise (the exact path) everything is float32.
        window: stream layers through that many slots instead of holding them all (single file only).
        ends: load the embedding and head (a cluster worker runs only the layers)."""
        quantized = quantized and has_kernels()
        self.config = c = source.config
        if ends and c.layers_only:
            raise EdgeInferError(f"{source.path} holds a cluster worker's share of the layers, not a whole model")
        if c.head_dim % LANES:  # the attention kernels work in whole 16-lane vectors
            raise UnsupportedModelError(f"head dimension {c.head_dim} is not a multiple of {LANES}")
        source.model_tensor_names()  # every tensor present, with its shape
        if window is not None and not isinstance(source, SingleFileSource):
            raise EdgeInferError("streaming layers needs edgeinfer's single file: convert the model first")
        self.weights = ResidentWeights(source, quantized, ends) if window is None else \
            StreamedWeights(source, quantized, window, ends)
        self.embedding, self.precision = self.weights.embedding, self.weights.precision  # shown to the user
        self.fused = self.weights.fused  # every projection quantised: the Numba decode step and attention
        self.codebooks = self._codebooks(source, attention)
        self.norm = np.array(source.float32("model.norm.weight"))
        freq_factors = source.float32(ROPE_FREQS) if source.has(ROPE_FREQS) else None
        self.inv_freq = rope_inv_freq(c, freq_factors)
        # On a cluster node the layers' two halves give partial sums of the hidden vector, which this
        # sums over the nodes (cluster/allreduce.py) into the float32 vector every node adds; alone,
        # a node's sum is its own (own_sum). Partials of the 4/8-bit path are fixed point (int64).
        self.allreduce: Callable[[np.ndarray], np.ndarray] | None = None

    def _codebooks(self, source: WeightSource, attention: str) -> list[np.ndarray] | None:
        if attention == "exact":
            return None
        if attention != "lut":
            raise EdgeInferError(f"--attention is exact or lut, got {attention!r}")
        books = source.key_codebooks()
        if books is None:
            raise EdgeInferError(f"{source.path} has no LUT codebooks: run edgeinfer calibrate MODEL -f TEXT -o OUT "
                                 "and use OUT")
        if not self.fused:
            raise EdgeInferError("LUT attention runs on the 4/8-bit path (not with --exact or float weights)")
        return books.layers

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity, self.codebooks, half_values=self.codebooks is not None)

    def warm_up(self) -> None:
        """Run the prefill and decode kernels once, so that Numba compiles them (first run) or loads
        them from its cache now, not at the user's first token."""
        cache = self.new_cache(3)
        for count in (2, 1):
            h = self.run_layers(np.zeros((count, self.config.hidden_size), np.float32), cache)
            if self.embedding is not None:
                self.logits(h)

    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at the cache's next positions; logits of the last token, or of all of them."""
        return self.logits(self.run_layers(self.embed(tokens), cache), all_logits)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.embedding.rows(np.asarray(tokens)), dtype=np.float32)

    def logits(self, h: np.ndarray, all_logits: bool = False) -> np.ndarray:
        eps = self.config.rms_norm_eps
        h = h if all_logits else h[-1:]
        logits = self.weights.head()(rmsnorm(h, self.norm, eps))
        self.weights.done(HEAD)
        return logits if all_logits else logits[0]

    def run_layers(self, h: np.ndarray, cache: KVCache) -> np.ndarray:
        """The hidden vectors (count, hidden) of tokens at the cache's next positions through every
        layer; their keys and values go in the cache. The whole batch goes through a layer before
        the next, so streamed weights are read once."""
        start, count = cache.length, h.shape[0]
        if start + count > cache.capacity:
            raise ContextOverflowError(f"{start + count} tokens exceed the context of {cache.capacity}")
        if count == 1 and self.fused:
            return self.decode(h, cache)
        eps = self.config.rms_norm_eps
        cos, sin = rope_tables(self.inv_freq, np.arange(start, start + count))
        for i in range(self.config.num_layers):
            layer, _ = self.weights.layer(i)
            h = h + self._sum(self.attention(layer, rmsnorm(h, layer.attn_norm, eps), cache, i, cos, sin))
            h = h + self._sum(self.mlp(layer, rmsnorm(h, layer.mlp_norm, eps)))
            self.weights.done(i)
        cache.length = start + count
        return h

    def _sum(self, partial: np.ndarray) -> np.ndarray:
        return own_sum(partial) if self.allreduce is None else self.allreduce(partial)

    def decode(self, h: np.ndarray, cache: KVCache) -> np.ndarray:
        """One token (h of shape (1, hidden)) through the fused layers: one Numba call per layer,
        or per half-layer on a cluster node, whose halves' sums go through the all-reduce."""
        position, eps, s = cache.length, self.config.rms_norm_eps, cache.scratch
        h = h[0].copy()
        for i in range(self.config.num_layers):
            _, block = self.weights.layer(i)
            if self.allreduce is None:
                decode_layer(h, block, cache.k[i], cache.v[i], cache.lut[i], position, self.inv_freq, eps, s)
            else:
                if self.config.num_kv_heads:
                    decode_attention(h, block, cache.k[i], cache.v[i], cache.lut[i], position, self.inv_freq, eps, s)
                else:
                    s.fixed[:] = 0
                h += self.allreduce(s.fixed)
                decode_mlp(h, block, eps, s)
                h += self.allreduce(s.fixed)
            self.weights.done(i)
        cache.length = position + 1
        return h[None]

    def attention(self, w: LayerWeights, x: np.ndarray, cache: KVCache, layer: int,
                  cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Causal attention of the tokens at the cache's next positions; their keys and values go in.

        The 4/8-bit path runs RoPE and attention in Numba; the float32 path in numpy, which calls
        OpenBLAS for its products: mixing the two thread pools on few cores makes both spin-wait."""
        c = self.config
        count, start = x.shape[0], cache.length
        if not c.num_kv_heads:  # a cluster node holding MLP columns only
            return np.zeros(x.shape, np.int64 if isinstance(w.o, QuantLinear) else np.float32)  # as w.o.partial
        q, k = np.ascontiguousarray(w.q(x)), np.ascontiguousarray(w.k(x))
        kv_heads = lambda y: y.reshape(count, c.num_kv_heads, c.head_dim).transpose(1, 0, 2)  # noqa: E731
        cache.store_values(layer, start, kv_heads(w.v(x)))
        if self.fused:
            rope_rows(q, cos, sin)
            rope_rows(k, cos, sin)
            out = np.empty_like(q)
            if self.codebooks is None:
                cache.k[layer, :, start:start + count] = kv_heads(k)
                attend_causal(q, cache.k[layer], cache.v[layer], start, out)
            else:
                books, codes, tables, sums = cache.lut[layer]
                new_keys = np.ascontiguousarray(kv_heads(k))
                encode_keys_into(new_keys, books, codes, start)
                attend_causal_lut(q, new_keys, books, codes, cache.k[layer], cache.v[layer], start, tables, sums,
                                  cache.scratch.scores, out)
            return w.o.partial(out)
        per_head = q.reshape(count, c.num_heads, c.head_dim).transpose(1, 0, 2)
        cache.k[layer, :, start:start + count] = apply_rope(kv_heads(k), cos, sin)
        end = start + count
        out = causal_attention(apply_rope(per_head, cos, sin), cache.k[layer, :, :end], cache.values(layer, end), start)
        return w.o(out.transpose(1, 0, 2).reshape(count, c.q_size))

    def mlp(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        return w.down.partial(silu_mul(w.gate(x), w.up(x)))


def own_sum(partial: np.ndarray) -> np.ndarray:
    """A half-layer's output as the float32 vector to add, when this node's partial is the whole sum."""
    return from_fixed(partial) if partial.dtype == np.int64 else partial
