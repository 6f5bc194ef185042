"""A node's shard of a model, as a WeightSource: the same forward pass runs on it unchanged.

The shard's config has the node's heads and MLP columns; its projections are sliced from the full
file's matrices bit for bit (kernels' `select`), its KV cache holds only its heads. Norms are whole:
every node keeps the full hidden vector, which the all-reduces keep identical everywhere.
"""

from __future__ import annotations

import dataclasses
import glob
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ModelConfig
from ..kernels.scales import keeps_super_scales
from ..storage.quantize import plain_type
from ..storage.single import convert
from ..storage.source import KeyCodebooks, WeightSource
from ..storage.tensor_names import ENDS
from .node import fingerprint, log
from .plan import Share

ALL = slice(None)


def shard_config(config: ModelConfig, share: Share, layers_only: bool = False) -> ModelConfig:
    group = config.num_heads // config.num_kv_heads
    return dataclasses.replace(config, num_kv_heads=share.kv_heads, num_heads=share.kv_heads * group,
                               intermediate_size=share.columns, layers_only=config.layers_only or layers_only)


class ShardSource(WeightSource):
    def __init__(self, source: WeightSource, share: Share, layers_only: bool = False):
        """layers_only: without the embedding and head (a worker's share; the master keeps them)."""
        self.source, self.share = source, share
        self.config = shard_config(source.config, share, layers_only)
        self.tokenizer, self.path, self.format = source.tokenizer, source.path, source.format
        c, hd = source.config, source.config.head_dim
        q = slice(share.kv_start * hd * (c.num_heads // c.num_kv_heads), share.kv_end * hd * (c.num_heads // c.num_kv_heads))
        kv = slice(share.kv_start * hd, share.kv_end * hd)
        cols = slice(share.col_start, share.col_end)
        # (rows, columns) of each sliced tensor, by the name's ending
        self._slices = {
            "self_attn.q_proj.weight": (q, ALL), "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, ALL), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, ALL), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (ALL, q),
            "mlp.gate_proj.weight": (cols, ALL), "mlp.gate_proj.bias": (cols,),
            "mlp.up_proj.weight": (cols, ALL), "mlp.up_proj.bias": (cols,),
            "mlp.down_proj.weight": (ALL, cols),
        }

    def _slice(self, name: str) -> tuple | None:
        return self._slices.get(name.split(".", 3)[-1]) if name.startswith("model.layers.") else None

    def _held(self, name: str) -> bool:
        """Not the embedding and head of a layers-only share."""
        return not (self.config.layers_only and name in ENDS)

    def names(self) -> list[str]:
        return [n for n in self.source.names() if self._held(n)]

    def stored_type(self, name: str) -> str:
        """The source's type; a K-quant's columns sliced off its 256-column super-blocks come with
        plain float32 scales (the matrix's `select`)."""
        kind, where = self.source.stored_type(name), self._slice(name)
        if where is not None and len(where) == 2:
            c0, c1, _ = where[1].indices(self.source.stored_shape(name)[1])
            if not keeps_super_scales(c0, c1):
                return plain_type(kind)
        return kind

    def stored_shape(self, name: str) -> tuple[int, ...]:
        where, shape = self._slice(name), self.source.stored_shape(name)
        if where is None:
            return shape
        return tuple(len(range(*s.indices(n))) for s, n in zip(where, shape))

    def float32(self, name: str) -> np.ndarray:
        where = self._slice(name)
        full = self.source.float32(name)
        if name.endswith("mlp.down_proj.bias") and self.share.col_start != 0:
            return np.zeros_like(full)  # every node adds its partial: the bias counts on one node only
        return full if where is None else np.ascontiguousarray(full[where])

    def quantized(self, name: str):
        where, matrix = self._slice(name), self.source.quantized(name)
        return matrix if where is None or matrix is None else matrix.select(*where)

    def has(self, name: str) -> bool:
        return self._held(name) and self.source.has(name)

    def key_codebooks(self) -> KeyCodebooks | None:
        books = self.source.key_codebooks()
        if books is None:
            return None
        return KeyCodebooks(books.d_sub, [b[self.share.kv_start:self.share.kv_end] for b in books.layers])

    def file_size(self) -> int:
        return self.source.file_size()

    def close(self) -> None:
        self.source.close()


def shard_file(shard: ShardSource, folder: Path, stem: str,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """The share as a model file of its own (so that streaming reads only its slices), written once
    into `folder` (to a temporary name, then renamed) and reused while the plan gives the same share."""
    out = folder / shard_name(stem, shard.share, shard.config.layers_only)
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        log(f"writing the share's own model file {out.name}")
        convert(shard, str(out), progress=progress)
    return out


def shard_name(stem: str, share: Share, layers_only: bool) -> str:
    kind = ".layers" if layers_only else ""
    return f"{stem}.kv{share.kv_start}-{share.kv_end}.cols{share.col_start}-{share.col_end}{kind}.safetensors"


def remove_stale_shards(folder: Path, stem: str, keep: set[str]) -> None:
    """Remove the share files shard_file wrote into `folder` for `stem` but those named in `keep`:
    a new plan replaced the plans that used them."""
    for p in folder.glob(f"{glob.escape(stem)}.kv*.cols*.safetensors"):
        if p.name not in keep and re.fullmatch(rf"{re.escape(stem)}\.kv\d+-\d+\.cols\d+-\d+(\.layers)?\.safetensors",
                                               p.name):
            p.unlink(missing_ok=True)
            log(f"removed {p.name}, the share of an earlier plan")


def written_shards(folder: Path, stem: str) -> dict[str, Share]:
    """The workers' shares (layers only) shard_file wrote into `folder` for `stem`, by their files'
    fingerprints."""
    found = {}
    for p in folder.glob(f"{glob.escape(stem)}.kv*.cols*.layers.safetensors"):
        m = re.fullmatch(rf"{re.escape(stem)}\.kv(\d+)-(\d+)\.cols(\d+)-(\d+)\.layers\.safetensors", p.name)
        if m:
            found[fingerprint(str(p))] = Share(*map(int, m.groups()))
    return found
