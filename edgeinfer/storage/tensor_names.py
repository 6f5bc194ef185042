"""The one home of tensor names (Hugging Face's, which every importer maps to) and of the units a
model file is stored and streamed in: the embedding, each layer, the head, LUT codebooks."""

from __future__ import annotations

import re
from typing import Iterator

from ..config import ModelConfig

EMBEDDING_WEIGHT = "model.embed_tokens.weight"
LM_HEAD_WEIGHT = "lm_head.weight"  # absent when the head is tied to the embedding
FINAL_NORM_WEIGHT = "model.norm.weight"
ROPE_FREQS = "rope_freqs.weight"  # optional per-pair RoPE divisors (GGUF's Llama-3 scaling)
ENDS = (EMBEDDING_WEIGHT, LM_HEAD_WEIGHT)  # what a layers-only file (a cluster worker's share) leaves out

# A layer's tensors, after its prefix. The norm named post_attention_layernorm is the MLP's input
# norm in Llama, and the attention output's norm in Gemma 3 (whose MLP norm is pre_feedforward_).
ATTN_NORM, LLAMA_MLP_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"
Q_NORM, K_NORM = "self_attn.q_norm.weight", "self_attn.k_norm.weight"
POST_ATTN_NORM, PRE_MLP_NORM, POST_MLP_NORM = ("post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
                                               "post_feedforward_layernorm.weight")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")

EMBEDDING, HEAD, LUT = "embedding", "head", "lut"  # the units besides the layers

# Fused projections some families store (Phi-3): each is its parts' rows one after the other.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


_FUSED_NAME = re.compile(r"(model\.layers\.\d+\.)(%s)\.weight$" % "|".join(re.escape(f) for f in FUSED))


def split_fused(name: str, c: ModelConfig) -> list[tuple[str, int, int]]:
    """A fused projection's stored name -> its parts' names with their rows (first, end); [] for
    any other tensor."""
    m = _FUSED_NAME.match(name)
    return [(f"{m.group(1)}{part}.weight", r0, r1) for part, r0, r1 in _fused_parts(m.group(2), c)] if m else []


def _fused_parts(fused: str, c: ModelConfig) -> list[tuple[str, int, int]]:
    """A fused projection's parts (FUSED's key, after a layer prefix) as (name, first row, end row)."""
    rows = {"self_attn.q_proj": c.q_size, "self_attn.k_proj": c.kv_size, "self_attn.v_proj": c.kv_size,
            "mlp.gate_proj": c.intermediate_size, "mlp.up_proj": c.intermediate_size}
    parts, start = [], 0
    for part in FUSED[fused]:
        parts.append((part, start, start + rows[part]))
        start += rows[part]
    return parts


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def output_weight(config: ModelConfig) -> str:
    """The matrix the head multiplies by: the embedding's when tied."""
    return EMBEDDING_WEIGHT if config.tie_embeddings else LM_HEAD_WEIGHT


def codebook_name(layer: int) -> str:
    return f"lut.layers.{layer}.key_codebooks"


def unit_of(name: str) -> int | str:
    """Which unit a model tensor belongs to: the embedding, layer i, the head (final norm, output
    matrix and RoPE factors) or LUT attention's codebooks. A unit is stored contiguously and read as one."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    if name.startswith("lut."):
        return LUT
    return EMBEDDING if name == EMBEDDING_WEIGHT else HEAD


def layer_norm_names(c: ModelConfig) -> dict[str, str | None]:
    """A layer's norms by role (None where the family has none): before attention and MLP, of
    each query and key head, and of the attention's and MLP's outputs."""
    sandwich, qk = c.sandwich_norms, c.qk_norm
    return {"attn": ATTN_NORM, "mlp": PRE_MLP_NORM if sandwich else LLAMA_MLP_NORM,
            "q": Q_NORM if qk else None, "k": K_NORM if qk else None,
            "post_attn": POST_ATTN_NORM if sandwich else None, "post_mlp": POST_MLP_NORM if sandwich else None}


def model_tensor_shapes(c: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor a model needs, in file order: layer by layer, each layer contiguous."""
    d, f = c.hidden_size, c.intermediate_size
    if not c.layers_only:
        yield EMBEDDING_WEIGHT, (c.vocab_size, d)
    for i in range(c.num_layers):
        p = layer_prefix(i)
        norms = layer_norm_names(c)
        yield p + ATTN_NORM, (d,)
        for role in ("q", "k"):
            if norms[role]:
                yield p + norms[role], (c.head_dim,)
        for proj, rows in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
            yield p + f"self_attn.{proj}.weight", (rows, d)
            if c.attention_bias:
                yield p + f"self_attn.{proj}.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (d, c.q_size)
        for role in ("post_attn", "mlp", "post_mlp"):
            if norms[role]:
                yield p + norms[role], (d,)
        yield p + "mlp.gate_proj.weight", (f, d)
        yield p + "mlp.up_proj.weight", (f, d)
        yield p + "mlp.down_proj.weight", (d, f)
        if c.mlp_bias:
            yield p + "mlp.gate_proj.bias", (f,)
            yield p + "mlp.up_proj.bias", (f,)
            yield p + "mlp.down_proj.bias", (d,)
    yield FINAL_NORM_WEIGHT, (d,)
    if not c.tie_embeddings and not c.layers_only:
        yield LM_HEAD_WEIGHT, (c.vocab_size, d)
