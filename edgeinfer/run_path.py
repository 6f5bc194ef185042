"""Which path runs a model, decided once, before any weight is read, from the types the file stores
its projections in, the CPU, and the user's options: the fused 4/8-bit path, the float32 path, or
in between (a file whose projections are only partly in 4/8 bits); and exact or LUT attention."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EdgeInferError
from .kernels.activations import GROUP
from .kernels.kv_rows import CACHE_TYPES, Q8_BLOCK
from .kernels.simd import has_kernels
from .storage.quantize import is_quantized_type, layout_of
from .storage.source import WeightSource
from .storage.tensor_names import PROJECTIONS, layer_prefix

ATTENTION_KINDS = ("exact", "lut")


FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class RunPath:
    quantized: bool  # matrices stored in 4/8 bits run in 4/8 bits (int8 activations); others in float32
    fused: bool  # every projection runs in 4/8 bits: one Numba call per decoded layer, Numba attention
    lut: bool  # LUT attention over the file's key codebooks (fused only)
    precision: str  # "q4", "q8" or "f32" (and whether quantized on load), shown to the user
    load_bits: int | None = None  # float matrices are quantized to this many bits at load; None: float32
    cache_type: str = "f32"  # the KV cache's keys and values: "f16", "q8_0" or "f32" (kv_rows.py); LUT: fp16 values


def projection_types(source: WeightSource) -> set[str]:
    """The types the file stores the layers' projections in."""
    return {source.stored_type(name) for name in _projections(source)}


def _projections(source: WeightSource) -> list[str]:
    return [f"{layer_prefix(i)}{p}.weight" for i in range(source.config.num_layers) for p in PROJECTIONS]


def quantizable_at_load(source: WeightSource, name: str) -> bool:
    """Whether a matrix the file stores as floats can be quantized at load (whole groups of 32)."""
    return source.stored_type(name) in FLOAT_TYPES and source.stored_shape(name)[-1] % GROUP == 0


def choose_path(source: WeightSource, quantized: bool, attention: str = "exact", load_bits: int | None = None,
                cache_type: str = "f16") -> RunPath:
    """quantized: run what the file stores in a quantised type with the 4/8-bit kernels (on CPUs
    that have their instructions), and with `load_bits` (4 or 8) quantize what it stores as floats
    (F32/F16/BF16) at load, to run alike; otherwise (--exact) everything is float32, the KV cache
    too (the reference path); `cache_type` is the fused path's KV cache (fp16 by default, as
    llama.cpp's)."""
    if attention not in ATTENTION_KINDS:
        raise EdgeInferError(f"--attention is exact or lut, got {attention!r}")
    if cache_type not in CACHE_TYPES:
        raise EdgeInferError(f"--cache-type is one of {', '.join(CACHE_TYPES)}, got {cache_type!r}")
    quantized = quantized and has_kernels()
    load_bits = load_bits if quantized else None
    names = _projections(source)
    types = {source.stored_type(n) for n in names}
    floats = {n for n in names if quantizable_at_load(source, n)} if load_bits else set()
    fused = quantized and all(is_quantized_type(source.stored_type(n)) or n in floats for n in names)
    bits = {layout_of(t).bits for t in types if is_quantized_type(t)} | ({load_bits} if floats else set())
    precision = "f32" if not quantized else f"q{min(bits)}" if bits else "f32"
    if floats:
        precision += ", quantized on load"
    if attention == "lut":
        if source.key_codebooks() is None:
            raise EdgeInferError(f"{source.path} has no LUT codebooks: run edgeinfer calibrate MODEL -f TEXT -o OUT "
                                 "and use OUT")
        if not fused:
            raise EdgeInferError("LUT attention runs on the 4/8-bit path (not with --exact or float weights)")
        if source.config.local_layers:
            raise EdgeInferError("LUT attention does not run sliding-window layers yet (Gemma 3, Mistral's window)")
    cache_type = "f16" if attention == "lut" else cache_type if fused else "f32"
    if cache_type == "q8_0" and source.config.head_dim % Q8_BLOCK:
        raise EdgeInferError(f"--cache-type q8_0 needs a head size that is a multiple of {Q8_BLOCK}; "
                             f"this model's is {source.config.head_dim} (use f16)")
    return RunPath(quantized, fused, attention == "lut", precision, load_bits if floats else None, cache_type)
