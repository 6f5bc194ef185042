"""Which node computes which part of every layer (tensor parallelism, as TPI-LLM splits it).

Attention splits by KV heads: a node holds whole KV heads with their query heads (rows of q, k, v,
the matching columns of o) and its share of the KV cache. The MLP splits by intermediate columns
(rows of gate and up, columns of down). o and down then give partial sums of the hidden vector: two
all-reduces per layer. Shares follow each node's weight (its measured speed, capped by its memory);
any node count works, and a node can hold no heads (fewer KV heads than nodes) and still take MLP
columns. The embedding and the head stay on the master (node 0).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import EdgeInferError
from ..kernels.scales import SUPER  # a K-quant's super-block: its activations quantise per 256 columns

COLUMN_STEP = 128  # MLP columns go in whole 4-bit chunks, so every share is a kernel-sized matrix
log = logging.getLogger("edgeinfer.cluster")


@dataclass(frozen=True)
class Share:
    """One node's part: KV heads [kv_start, kv_end) and intermediate columns [col_start, col_end)."""

    kv_start: int
    kv_end: int
    col_start: int
    col_end: int

    @property
    def kv_heads(self) -> int:
        return self.kv_end - self.kv_start

    @property
    def columns(self) -> int:
        return self.col_end - self.col_start

    def to_dict(self) -> dict[str, int]:
        return {"kv": [self.kv_start, self.kv_end], "cols": [self.col_start, self.col_end]}

    @classmethod
    def parse(cls, d: dict) -> "Share":
        try:
            (k0, k1), (c0, c1) = d["kv"], d["cols"]
            return cls(int(k0), int(k1), int(c0), int(c1))
        except (KeyError, TypeError, ValueError):
            raise EdgeInferError(f"malformed share {d!r}") from None

    @classmethod
    def from_dict(cls, d: dict, config: ModelConfig) -> "Share":
        """The share in a message, checked against the model it is a share of."""
        share = cls.parse(d)
        if not (0 <= share.kv_start <= share.kv_end <= config.num_kv_heads
                and 0 <= share.col_start < share.col_end <= config.intermediate_size):
            raise EdgeInferError(f"share {d!r} does not fit the model")
        return share


def split(total: int, weights: list[float], step: int = 1, minimum: int = 0) -> list[tuple[int, int]]:
    """[start, end) ranges of `total` in multiples of `step` (the last range takes the remainder),
    each at least `minimum` steps, the rest proportional to `weights`, by largest remainders so the
    sizes add up exactly."""
    units = -(-total // step) - minimum * len(weights)
    ideal = [units * w / sum(weights) for w in weights]
    counts = [int(x) for x in ideal]
    for i in sorted(range(len(weights)), key=lambda i: ideal[i] - counts[i], reverse=True)[:units - sum(counts)]:
        counts[i] += 1
    ranges, start = [], 0
    for n in counts:
        end = min(total, start + (n + minimum) * step)
        ranges.append((start, end))
        start = end
    return ranges


def plan_shares(config: ModelConfig, weights: list[float], super_blocks: tuple[bool, bool] = (False, False)) -> list[Share]:
    """Node i's share, in proportion to weights[i] (> 0). Every node gets at least one block of MLP
    columns; heads may run out first. `super_blocks`: whether o_proj and down_proj are K-quants,
    whose inputs quantise per 256 columns; their shares' columns are then whole super-blocks where
    the model allows, so each node quantises its columns as one node would."""
    if not weights or min(weights) <= 0:
        raise EdgeInferError("every node needs a positive weight")
    if config.head_dim % 32:
        raise EdgeInferError(f"head dimension {config.head_dim} does not split on 32-wide quantisation groups")
    heads = split(config.num_kv_heads, weights, head_step(config, super_blocks[0]))
    step = column_step(config, len(weights), super_blocks[1])
    columns = split(config.intermediate_size, weights, step, minimum=1)
    return [Share(k0, k1, c0, c1) for (k0, k1), (c0, c1) in zip(heads, columns)]


def head_step(config: ModelConfig, super_blocks: bool) -> int:
    """KV heads per unit of the attention's split: one, or for a K-quant o_proj as many as make its
    columns (the heads' queries) whole super-blocks (Phi-3's 96-wide heads: 8 at a time)."""
    width = config.head_dim * (config.num_heads // config.num_kv_heads)
    return SUPER // math.gcd(width, SUPER) if super_blocks else 1


def column_step(config: ModelConfig, nodes: int, super_blocks: bool) -> int:
    """The MLP columns' unit: whole super-blocks for a K-quant down_proj while there are enough of
    them for every node, else whole 4-bit chunks (the nodes' sums then round slightly differently
    from one node's)."""
    size = config.intermediate_size
    if super_blocks and size % SUPER == 0 and size // SUPER >= nodes:
        return SUPER
    chunks = -(-size // COLUMN_STEP)
    if chunks < nodes:
        raise EdgeInferError(f"{nodes} nodes are more than the {chunks} MLP column blocks of this model")
    if super_blocks:
        log.info("down_proj's %d columns do not split into whole 256-column super-blocks over %d nodes: its "
                 "shares go in 128-column chunks, and their sums round slightly differently from one node's", size, nodes)
    return COLUMN_STEP


def node_weight(gemv_gbs: float, free_bytes: int, model_bytes: int, nodes: int) -> float:
    """A node's share weight: its measured matrix-vector speed, scaled down when its free memory
    could not hold an even share of the weights."""
    even = model_bytes / nodes
    return gemv_gbs * min(1.0, free_bytes / even) if even else gemv_gbs


def plan_around(config: ModelConfig, held: list[Share]) -> list[Share] | None:
    """[the master's share, *held] when the workers' shares leave the master one range of KV heads
    (maybe empty) and one of MLP columns, and cover the rest once: the same nodes keep the plan
    whose shards they hold. None when they do not fit together."""
    def gap(ranges: list[tuple[int, int]], total: int) -> tuple[int, int] | None:
        edge, gaps = 0, []
        for start, end in sorted(r for r in ranges if r[0] < r[1]):
            if start < edge:
                return None  # overlapping shares
            if start > edge:
                gaps.append((edge, start))
            edge = end
        if edge < total:
            gaps.append((edge, total))
        return gaps[0] if len(gaps) == 1 else (total, total) if not gaps else None

    heads = gap([(s.kv_start, s.kv_end) for s in held], config.num_kv_heads)
    columns = gap([(s.col_start, s.col_end) for s in held], config.intermediate_size)
    if heads is None or columns is None or columns[0] == columns[1]:
        return None
    return [Share(*heads, *columns), *held]
