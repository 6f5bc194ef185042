"""The one home of tensor names (Hugging Face's, which every importer maps to) and of the units a
model file is stored and streamed in: the embedding, each layer, the head, LUT codebooks."""

from __future__ import annotations

from typing import Iterator

from ..config import ModelConfig

EMBEDDING_WEIGHT = "model.embed_tokens.weight"
LM_HEAD_WEIGHT = "lm_head.weight"  # absent when the head is tied to the embedding
FINAL_NORM_WEIGHT = "model.norm.weight"
ROPE_FREQS = "rope_freqs.weight"  # optional per-pair RoPE divisors (GGUF's Llama-3 scaling)
ENDS = (EMBEDDING_WEIGHT, LM_HEAD_WEIGHT)  # what a layers-only file (a cluster worker's share) leaves out

# A layer's tensors, after its prefix
ATTN_NORM, MLP_NORM = "input_layernorm.weight", "post_attention_layernorm.weight"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")

EMBEDDING, HEAD, LUT = "embedding", "head", "lut"  # the units besides the layers


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


def llama_tensor_shapes(c: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor a Llama-family model needs, in file order: layer by layer, each layer contiguous."""
    d, f = c.hidden_size, c.intermediate_size
    if not c.layers_only:
        yield EMBEDDING_WEIGHT, (c.vocab_size, d)
    for i in range(c.num_layers):
        p = layer_prefix(i)
        yield p + ATTN_NORM, (d,)
        for proj, rows in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
            yield p + f"self_attn.{proj}.weight", (rows, d)
            if c.attention_bias:
                yield p + f"self_attn.{proj}.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (d, c.q_size)
        yield p + MLP_NORM, (d,)
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
