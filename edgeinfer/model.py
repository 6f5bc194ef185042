"""The forward pass of every family we run (Llama 2/3, Mistral, SmolLM, Qwen2/3, Gemma 3):

    h = embed(tokens) * embed_scale
    for each layer:  h += [norm] attn(rmsnorm(h));  h += [norm] mlp(rmsnorm(h))
    logits = head(rmsnorm(h))

with the family's options from its config (config.py): the bracketed output norms, query/key norms,
the gate's activation, sliding-window layers with their own RoPE base; on the path chosen once for
the model (run_path.py): the fused 4/8-bit kernels, or float32 in numpy.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .config import rope_table
from .errors import EdgeInferError, UnsupportedModelError
from .kernels.decode_layer import (DecodeScratch, batch_scratch, decode_attention, decode_layer, decode_layer_batch,
                                   decode_mlp, decode_scratch)
from .kernels.lut_attention import attend_causal_lut
from .kernels.ops import LANES, attend_causal, gated_activation_rows, rmsnorm_into, rope_rows, round_rows_like
from .kernels.reference import GATED_ACTIVATIONS, apply_rope, causal_attention, rmsnorm, rmsnorm_heads, rope_tables
from .kernels.simd import partial_to_float
from .kv_cache import KVCache, SlotCaches
from .layers import apply_each
from .run_path import choose_path
from .storage.source import WeightSource
from .storage.tensor_names import FINAL_NORM_WEIGHT, HEAD, ROPE_FREQS
from .weights import LayerWeights, ResidentWeights, StreamedWeights

# A cluster node's half-layers give partial sums of the hidden vector, which the all-reduce adds
# over the nodes (cluster/allreduce.py) into the float32 vector every node adds.
AllReduce = Callable[[np.ndarray], np.ndarray]


class Model:
    def __init__(self, source: WeightSource, quantized: bool = False, window: int | None = None,
                 attention: str = "exact", pinned: tuple[int | str, ...] = (), load_bits: int | None = 8,
                 cache_type: str = "f16"):
        """quantized: run the weights the file stores in 4/8 bits with the kernels (run_path.py), and
        those it stores as floats too, quantized at load to `load_bits` (resident models only).
        window: stream layers through that many slots instead of holding them all (single file only),
        but for the `pinned` units (layer indices, or "head"), held across passes.
        cache_type: the fused path's KV cache, "f16", "q8_0" or "f32" (run_path.py).
        A layers-only source (a cluster worker's share) has no embedding or head."""
        self.config = c = source.config
        if c.head_dim % LANES:  # the attention kernels work in whole 16-lane vectors
            raise UnsupportedModelError(f"head dimension {c.head_dim} is not a multiple of {LANES}")
        source.model_tensor_names()  # every tensor present, with its shape
        if window is not None and not source.can_stream:
            raise EdgeInferError("streaming layers needs edgeinfer's single file: convert the model first")
        self.path = choose_path(source, quantized, attention, load_bits if window is None else None, cache_type)
        self.weights = ResidentWeights(source, self.path) if window is None else \
            StreamedWeights(source, self.path, window, pinned)
        self.embedding, self.precision = self.weights.embedding, self.path.precision
        self.codebooks = source.key_codebooks().layers if self.path.lut else None
        self.norm = np.array(source.float32(FINAL_NORM_WEIGHT))
        self.freq_factors = source.float32(ROPE_FREQS) if source.has(ROPE_FREQS) else None
        self._ropes: dict[int, list[np.ndarray]] = {}  # layer_ropes by context
        self.attend = self._attend_kernels if self.path.fused else self._attend_float
        self.scratch: DecodeScratch | None = None
        self.batch_scratch: dict[tuple[int, int], DecodeScratch] = {}  # by (rows, capacity)
        self.allreduce: AllReduce | None = None  # None: this node's partial sums are the whole sums

    def layer_ropes(self, context: int) -> list[np.ndarray]:
        """Each layer's RoPE table (config.rope_table; a local layer has its own base) for a cache of
        `context` positions: LongRoPE's factors depend on it (long beyond the original context, as
        llama.cpp chooses them), other models' do not."""
        if context not in self._ropes:
            c = self.config
            table = {local: rope_table(c, self.freq_factors, local, context) for local in (False, True)}
            self._ropes[context] = [table[i in c.local_layers] for i in range(c.num_layers)]
        return self._ropes[context]

    def new_cache(self, capacity: int, rings: bool = True) -> KVCache:
        """A KV cache of `capacity` positions; its local layers hold only their window unless not `rings`."""
        return KVCache(self.config, capacity, self.codebooks, cache_type=self.path.cache_type,
                       kernels=self.path.fused, rings=rings)

    def _scratch_for(self, cache: KVCache) -> DecodeScratch:
        """The fused path's buffers, whose attention scores are as long as the longest cache yet."""
        if self.scratch is None or self.scratch.scores.shape[1] < cache.capacity:
            c = self.config
            self.scratch = decode_scratch(c.hidden_size, c.q_size, c.kv_size, c.intermediate_size, c.num_heads,
                                          cache.capacity)
        return self.scratch

    def new_caches(self, capacity: int, slots: int) -> SlotCaches:
        """KV caches of `slots` sequences decoded together (decode_batch)."""
        if self.path.lut:
            raise EdgeInferError("sequences decoded together need exact attention, not LUT attention")
        return SlotCaches(self.config, capacity, slots, kernels=self.path.fused, cache_type=self.path.cache_type)

    def decode_batch(self, tokens: np.ndarray, caches: SlotCaches, slots: list[int]) -> np.ndarray:
        """Logits (rows, vocab) of one token for each of several sequences: tokens[r] is the next
        token of the sequence in cache slot slots[r]. On the fused path every weight is read once for
        all rows, and each row's logits equal, bit for bit, what forward() gives that sequence
        alone; on the float32 path the sequences run in turn."""
        if not self.path.fused:
            return np.stack([self.forward(tokens[r:r + 1], caches.slot(s)) for r, s in enumerate(slots)])
        c, rows = self.config, len(slots)
        positions = np.array([caches.slot(s).reserve(1) for s in slots], np.int64)
        key = (rows, caches.capacity)
        if key not in self.batch_scratch:
            self.batch_scratch[key] = batch_scratch(c.hidden_size, c.q_size, c.kv_size, c.intermediate_size,
                                                    c.num_heads, caches.capacity, rows)
        b, lut, slot_ids = self.batch_scratch[key], caches.slot(0).lut[0], np.asarray(slots, np.int64)
        ropes = self.layer_ropes(caches.capacity)
        h = np.ascontiguousarray(self.embed(np.asarray(tokens)))
        for i in range(c.num_layers):
            _, args = self.weights.layer(i)
            decode_layer_batch(h, args, caches.k[i], caches.v[i], lut, slot_ids, positions,
                               ropes[i], c.rms_norm_eps, b)
            self.weights.done(i)
        for s in slots:
            caches.slot(s).commit(1)
        return self.logits(h, all_logits=True)

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

    def prefill(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        """forward() for prompt tokens: the op-by-op path even for one token, whose rows do not depend
        on the tokens beside them, so a prompt's logits are the same bits however much of it was
        cached already (the fused decode step rounds differently)."""
        return self.logits(self.run_layers(self.embed(tokens), cache, fused=False))

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(self.embedding.rows(np.asarray(tokens)), dtype=np.float32)
        return rows * np.float32(self.config.embed_scale) if self.config.embed_scale != 1.0 else rows

    def logits(self, h: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """The last row's logits, or every row's (all_logits), in one block."""
        rows = h if all_logits else h[-1:]
        (logits,) = self.logit_blocks(rows, max(rows.shape[0], 1))
        return logits if all_logits else logits[0]

    def logit_blocks(self, h: np.ndarray, rows: int) -> Iterator[np.ndarray]:
        """The logits of h's rows, `rows` at a time, the head taken once (a streamed head is read
        once): every row's at once would take rows x vocabulary floats, 2 GB for a 2048-token
        window of Gemma's 262k pieces."""
        head = self.weights.head()
        try:
            for r in range(0, max(h.shape[0], 1), rows):  # no rows: one empty block
                yield head(rmsnorm(h[r:r + rows], self.norm, self.config.rms_norm_eps))
        finally:
            self.weights.done(HEAD)

    def run_layers(self, h: np.ndarray, cache: KVCache, fused: bool = True) -> np.ndarray:
        """The hidden vectors (count, hidden) of tokens at the cache's next positions through every
        layer; their keys and values go in the cache. The whole batch goes through a layer before
        the next, so streamed weights are read once. One token takes the fused decode layer unless
        `fused` is False."""
        start, count = cache.reserve(h.shape[0]), h.shape[0]
        if count == 1 and fused and self.path.fused:
            h = self._decode(h, cache)
        else:
            eps, positions = self.config.rms_norm_eps, np.arange(start, start + count)
            ropes = self.layer_ropes(cache.capacity)
            bases = {id(f): f for f in ropes}  # global and, for local layers, their own
            tables = {key: rope_tables(f, positions) for key, f in bases.items()}
            for i in range(self.config.num_layers):
                layer, _ = self.weights.layer(i)
                cos, sin = tables[id(ropes[i])]
                attn = self.attention(layer, rmsnorm(h, layer.attn_norm, eps), cache, i, cos, sin)
                h = h + self._output(self._sum(attn), layer.post_attn_norm)
                h = h + self._output(self._sum(self.mlp(layer, rmsnorm(h, layer.mlp_norm, eps))), layer.post_mlp_norm)
                self.weights.done(i)
        cache.commit(count)
        return h

    def _sum(self, partial: np.ndarray) -> np.ndarray:
        return partial_to_float(partial) if self.allreduce is None else self.allreduce(partial)

    def _output(self, y: np.ndarray, post_norm: np.ndarray | None) -> np.ndarray:
        """A half-layer's summed output as it is added to h: through its norm, for families with one."""
        return y if post_norm is None else rmsnorm(y, post_norm, self.config.rms_norm_eps)

    def _decoded_output(self, y: np.ndarray, post_norm: np.ndarray | None) -> np.ndarray:
        """_output for a cluster node's decode step, through the norm kernel the one-node step uses
        (decode_layer.add_output), so a cluster gives one node's bits."""
        if post_norm is not None:
            rmsnorm_into(y, post_norm, self.config.rms_norm_eps, y)
        return y

    def _decode(self, h: np.ndarray, cache: KVCache) -> np.ndarray:
        """One token (h of shape (1, hidden)) through the fused layers: one Numba call per layer,
        or per half-layer on a cluster node, whose halves' sums go through the all-reduce."""
        position, eps, s = cache.length, self.config.rms_norm_eps, self._scratch_for(cache)
        ropes = self.layer_ropes(cache.capacity)
        h = h[0].copy()
        for i in range(self.config.num_layers):
            layer, args = self.weights.layer(i)
            kv = cache.layer(i)
            if self.allreduce is None:
                decode_layer(h, args, kv.keys, kv.values, kv.lut, position, ropes[i], eps, s)
            else:
                if self.config.num_kv_heads:
                    decode_attention(h, args, kv.keys, kv.values, kv.lut, position, ropes[i], eps, s)
                else:  # a cluster node holding MLP columns only
                    s.fixed[:] = 0
                h += self._decoded_output(self.allreduce(s.fixed), layer.post_attn_norm)
                decode_mlp(h, args, eps, s)
                h += self._decoded_output(self.allreduce(s.fixed), layer.post_mlp_norm)
            self.weights.done(i)
        return h[None]

    def attention(self, w: LayerWeights, x: np.ndarray, cache: KVCache, layer: int,
                  cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Causal attention of the tokens at the cache's next positions, whose keys and values go
        in; o_proj's output as this node's partial sum."""
        if not self.config.num_kv_heads:  # a cluster node holding MLP columns only
            return w.o.zero_partial(x.shape[0])
        q, k, v = apply_each(x, w.q, w.k, w.v)
        if w.q_norm is not None:
            q, k = rmsnorm_heads(q, w.q_norm, self.config.rms_norm_eps), rmsnorm_heads(k, w.k_norm, self.config.rms_norm_eps)
        return w.o.partial(self.attend(q, k, v, cache, layer, cos, sin))

    def mlp(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        gate, up = apply_each(x, w.gate, w.up)
        if self.path.quantized:  # the kernel's activation (one pass, vectorised) where the path is not exact
            act = np.empty_like(gate)
            gated_activation_rows(gate, up, self.config.hidden_act == "gelu_tanh", act)
        else:
            act = GATED_ACTIVATIONS[self.config.hidden_act](gate, up)
        return w.down.partial(act)

    def _per_head(self, y: np.ndarray, heads: int) -> np.ndarray:
        """(count, heads * head_dim) -> (heads, count, head_dim)."""
        return y.reshape(y.shape[0], heads, self.config.head_dim).transpose(1, 0, 2)

    def _attend_kernels(self, q, k, v, cache: KVCache, layer: int, cos, sin) -> np.ndarray:
        """The 4/8-bit path: RoPE and attention in Numba, exact or LUT (kernels/lut_attention.py)."""
        q, k = np.ascontiguousarray(q), np.ascontiguousarray(k)
        rope_rows(q, cos, sin, self.config.head_dim)
        rope_rows(k, cos, sin, self.config.head_dim)
        start, kv_heads = cache.length, self.config.num_kv_heads
        new_keys = np.ascontiguousarray(self._per_head(k, kv_heads))
        new_values = self._per_head(v, kv_heads)
        out = np.empty_like(q)
        if self.path.lut:
            cache.append(layer, start, new_keys, new_values)
            keys, values, (books, codes, tables, sums) = cache.layer(layer)
            attend_causal_lut(q, new_keys, books, codes, keys, values, start, tables, sums,
                              self._scratch_for(cache).scores, out)
        else:
            keys, values, first = cache.add(layer, start, new_keys, new_values)
            round_rows_like(q, keys)  # to fp16 precision with an fp16 cache, as the fused step rounds them
            attend_causal(q, keys, values, start - first, self.config.window(layer), self.config.attention_scale, out)
        return out

    def _attend_float(self, q, k, v, cache: KVCache, layer: int, cos, sin) -> np.ndarray:
        """The float32 path, in numpy (OpenBLAS for its products: mixing its thread pool with
        Numba's on few cores makes both spin-wait)."""
        c, start, count = self.config, cache.length, q.shape[0]
        keys, values, first = cache.add(layer, start, apply_rope(self._per_head(k, c.num_kv_heads), cos, sin),
                                        self._per_head(v, c.num_kv_heads))
        out = causal_attention(apply_rope(self._per_head(q, c.num_heads), cos, sin), keys, values, start - first,
                               c.window(layer), c.attention_scale)
        return out.transpose(1, 0, 2).reshape(count, c.q_size)
