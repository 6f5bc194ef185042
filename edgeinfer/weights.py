"""A model's weights as the forward pass takes them, on the path chosen for it (run_path.py): every
layer resident, or layers read into a sliding window of slots as the pass reaches them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import typeof

from .layers import Linear, QuantLinear, load_linear, owned
from .run_path import RunPath
from .storage.layer_stream import LayerStream, StreamedRows
from .storage.quantize import empty_matrix
from .storage.single import SingleFileSource
from .storage.source import WeightSource
from .storage.tensor_names import EMBEDDING_WEIGHT, HEAD, layer_norm_names, layer_prefix, output_weight

_NONE = np.zeros(0, np.float32)  # what the fused kernel takes for a norm or bias the layer lacks
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")  # the decode kernel's order


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
    q_norm: np.ndarray | None = None  # of each query head (Qwen3, Gemma 3)
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # of the attention's output (Gemma 3)
    post_mlp_norm: np.ndarray | None = None
    window: int = 0  # a local layer's sliding window; 0 for all positions
    gelu: bool = False  # the MLP's gate activation: GELU (tanh) or SiLU
    attention_scale: float = 0.0

    @classmethod
    def load(cls, source: WeightSource, i: int, quantized: bool, load_bits: int | None = None) -> "LayerWeights":
        c, p = source.config, layer_prefix(i)
        q, k, v, o, gate, up, down = (load_linear(source, f"{p}{name}.weight", quantized, load_bits)
                                      for name in PROJECTIONS)
        norm = lambda role: owned(source.float32(p + n)) if (n := layer_norm_names(c)[role]) else None  # noqa: E731
        return cls(attn_norm=norm("attn"), q=q, k=k, v=v, o=o, mlp_norm=norm("mlp"), gate=gate, up=up, down=down,
                   q_norm=norm("q"), k_norm=norm("k"), post_attn_norm=norm("post_attn"), post_mlp_norm=norm("post_mlp"),
                   window=c.window(i), gelu=c.hidden_act == "gelu_tanh", attention_scale=c.attention_scale)

    def decode_args(self) -> tuple | None:
        """The layer as the fused decode kernel takes it (kernels/decode_layer.py): norms, matrices,
        biases, options; or None when a projection runs in float32."""
        projections = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        if not all(isinstance(p, QuantLinear) for p in projections):
            return None
        given = lambda a: _NONE if a is None else a  # noqa: E731
        norms = (self.attn_norm, self.mlp_norm, given(self.q_norm), given(self.k_norm), given(self.post_attn_norm),
                 given(self.post_mlp_norm))
        biases = tuple(given(p.bias) for p in (self.q, self.k, self.v))
        return (norms, tuple(p.matrix.kernel_args() for p in projections), biases,
                (self.window, self.gelu, float(self.attention_scale)))


def one_decode_type(layers: list[tuple | None]) -> list[tuple | None]:
    """The layers' fused-kernel arguments (decode_args) with each matrix slot whose type differs
    between layers (a file mixing quant types by layer) as its alternatives: a tuple of one matrix
    per type, the layer's own in its place and the others empty (kernels/decode_layer.each_matrix).
    Then every layer has one type, and one decode layer is compiled and loaded for the model."""
    if not layers or any(args is None for args in layers):
        return layers
    types = [[typeof(m) for m in args[1]] for args in layers]
    slots, choices = _alternatives(types, lambda i, j: _no_rows(layers[i][1][j]))
    return [in_slots(args, slots, choice) for args, choice in zip(layers, choices)]


def _alternatives(types: list[list], empty) -> tuple[list[list], list[tuple[int, ...]]]:
    """From each layer's matrix types: per slot, a matrix with no rows of each of its types, in the
    order first met (empty(layer, slot) makes one); per layer, the index of its own type in each slot."""
    seen = [{} for _ in types[0]]  # per slot: type -> (index, empty matrix)
    for i, row in enumerate(types):
        for j, t in enumerate(row):
            if t not in seen[j]:
                seen[j][t] = (len(seen[j]), empty(i, j))
    slots = [[m for _, m in kinds.values()] for kinds in seen]
    return slots, [tuple(seen[j][t][0] for j, t in enumerate(row)) for row in types]


def in_slots(args: tuple | None, slots: list[list], choice: tuple[int, ...]) -> tuple | None:
    """A layer's decode_args with each slot of more than one type as its alternatives, the layer's
    own matrix at its index (`choice`), chosen without typing anything: a streamed layer passes here
    at every token, and Numba's typeof takes 0.1 ms a matrix."""
    if args is None or all(len(empties) == 1 for empties in slots):
        return args
    norms, matrices, biases, options = args
    pick = lambda m, empties, own: m if len(empties) == 1 else tuple(  # noqa: E731
        m if k == own else e for k, e in enumerate(empties))
    return norms, tuple(pick(m, e, own) for m, e, own in zip(matrices, slots, choice)), biases, options


def stored_alternatives(source: SingleFileSource) -> tuple[list[list], list[tuple[int, ...]]]:
    """one_decode_type's alternatives from the file's index, before any layer is read (a streamed
    model's layers arrive one at a time): the slots and each layer's choices (_alternatives); none
    when a projection is not quantised."""
    by_kind = {}  # layout -> (Numba type, kernel arguments of a matrix with no rows)
    kinds = []
    for i in range(source.config.num_layers):
        row = []
        for name in PROJECTIONS:
            stored = source.quantized_parts(f"{layer_prefix(i)}{name}.weight")
            if stored is None:
                return [], []
            (kind, _, cols), _ = stored
            if kind not in by_kind:
                empty = empty_matrix(kind, cols).kernel_args()
                by_kind[kind] = (typeof(empty), empty)
            row.append(kind)
        kinds.append(row)
    return _alternatives([[by_kind[k][0] for k in row] for row in kinds], lambda i, j: by_kind[kinds[i][j]][1])


def _no_rows(value):
    """A matrix's kernel arguments with every array cut to no rows (its other fields as they are):
    the same Numba type as the matrix's."""
    if isinstance(value, np.ndarray) and value.ndim:
        return value[:0]
    if isinstance(value, tuple):
        return type(value)(*map(_no_rows, value)) if hasattr(value, "_fields") else tuple(map(_no_rows, value))
    return value


class ResidentWeights:
    """Every layer in memory, loaded once; without embedding and head for a layers-only source (a
    cluster worker's share: the master keeps them)."""

    def __init__(self, source: WeightSource, path: RunPath):
        c, q, bits = source.config, path.quantized, path.load_bits
        self.embedding = None if c.layers_only else load_linear(source, EMBEDDING_WEIGHT, q, bits)
        self.layers = [LayerWeights.load(source, i, q, bits) for i in range(c.num_layers)]
        self._head = None if c.layers_only else self.embedding if c.tie_embeddings else \
            load_linear(source, output_weight(c), q, bits)
        self._decode_args = one_decode_type([layer.decode_args() for layer in self.layers])

    def layer(self, i: int) -> tuple[LayerWeights, tuple | None]:
        return self.layers[i], self._decode_args[i]

    def head(self) -> Linear:
        return self._head

    def done(self, key: int | str) -> None:
        pass


class StreamedWeights:
    """Layers and head read into a sliding window of slots as the forward pass reaches them, but for
    the pinned ones, read once (storage/layer_stream.py); embedding rows read on demand."""

    def __init__(self, source: SingleFileSource, path: RunPath, window: int, pinned: tuple[int | str, ...] = ()):
        c = source.config
        self.quantized, self.stream = path.quantized, LayerStream(source, window, c.layers_only, pinned)
        self.embedding = None if c.layers_only else StreamedRows(source, EMBEDDING_WEIGHT)
        self._head_name = output_weight(c)
        self._slots, self._choices = stored_alternatives(source) if self.quantized else ([], [])

    def layer(self, i: int) -> tuple[LayerWeights, tuple | None]:
        layer = LayerWeights.load(self.stream.acquire(i), i, self.quantized)
        return layer, in_slots(layer.decode_args(), self._slots, self._choices[i] if self._choices else ())

    def head(self) -> Linear:
        return load_linear(self.stream.acquire(HEAD), self._head_name, self.quantized)

    def done(self, key: int | str) -> None:
        self.stream.release(key)
