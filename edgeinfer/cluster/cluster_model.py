"""What the engine calls a model when it is the master of a cluster: the same forward pass as
model.Model, each half-layer's partial sums added over the nodes by the star all-reduce.

It owns the embedding and head and its own shard of every layer; workers compute theirs. Faults: a
worker that fails or sends nothing within the timeout is dropped; the master re-plans over the
nodes left (down to itself alone), and since every node's KV cache shard changes with the plan, the
caches are rebuilt by running the tokens they held again before the generation continues where it
was. Workers that join during a generation wait for the next prompt; before each prompt the master
pings its workers (the heartbeat between requests).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import ContextOverflowError
from ..kernels.simd import partial_to_float
from ..kv_cache import model_memory_plan
from ..model import Model
from ..paths import cluster_dir
from ..storage import open_model
from ..storage.memory_plan import available_memory
from ..storage.quantize import has_super_scales
from .allreduce import NodeLost
from .master import Master, WorkerInfo
from .node import fingerprint, gemv_speed, log
from .plan import Share, node_weight, plan_around, plan_shares
from .shard import ShardSource, remove_stale_shards, shard_file, shard_name, written_shards


class ClusterCache:
    """The engine's KV cache on a cluster: the tokens it holds, the forward calls that put them in,
    and the master's own shard of it. When the plan changes, the shards are rebuilt by the same
    calls again: a prompt as a batch, generated tokens one at a time (the batched and the fused
    decode paths round differently, and a rebuilt cache must be the very one a node alone holds)."""

    def __init__(self, model: "ClusterModel", capacity: int):
        self.capacity = capacity
        self.tokens: list[int] = []
        self.calls: list[int] = []  # tokens per forward call, in order
        self.local = model.local.new_cache(capacity)
        self.plan = model.plan_id

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> int:
        """Forget the tokens past `length`; the length kept, as the shards' caches keep it (a local
        layer's ring may keep less: kv_cache.KVCache.truncate, the same on every node)."""
        length = self.local.truncate(length)
        del self.tokens[length:]
        kept, total = [], 0
        for n in self.calls:
            if total >= length:
                break
            kept.append(min(n, length - total))
            total += kept[-1]
        self.calls = kept
        return length


class ClusterModel:
    """What the engine calls a model, computed by the master and its workers."""

    def __init__(self, master: Master, path: str, context: int, quantized: bool = True, attention: str = "exact",
                 mem_limit: int | None = None, cache_type: str = "f16"):
        """context: the KV cache capacity every node allocates for its shard, of cache_type. mem_limit:
        the master streams its own share within it (from a file of the share, as workers with
        --mem-limit do)."""
        self.master, self.path, self.quantized, self.attention = master, path, quantized, attention
        self.mem_limit, self.cache_type = mem_limit, cache_type
        source = open_model(path)
        self.config = source.config
        k_quant = lambda end: any(has_super_scales(source.stored_type(n)) for n in source.names()  # noqa: E731
                                  if n.endswith(end))
        self.super_blocks = (k_quant("self_attn.o_proj.weight"), k_quant("mlp.down_proj.weight"))
        self.fingerprint = fingerprint(path)
        self.size = os.path.getsize(path)
        self.weight = gemv_speed()
        self.context = context
        self.plan_id = 0
        self.local: Model | None = None
        self._planned: list[bytes] = []  # the workers in the current plan
        self._replan()

    @property
    def precision(self) -> str:
        return self.local.precision

    def _replan(self) -> None:
        """Shares over the master and its workers, loaded everywhere; retried without any worker
        that fails meanwhile."""
        while True:
            self.master.admit()
            workers = self.master.workers
            shares = self._held_plan(workers)
            if shares is None:  # in proportion to the nodes' speeds
                for w in workers:
                    w.weight = node_weight(w.hello["gemv_gbs"], w.hello["free_ram"], self.size, len(workers) + 1)
                own = node_weight(self.weight, min(available_memory(), self.mem_limit or 1 << 62), self.size, len(workers) + 1)
                # not less for the master for running the head: every half-layer's all-reduce waits
                # for the slowest node, and the head runs while the workers wait anyway
                shares = plan_shares(self.config, [own] + [w.weight for w in workers], self.super_blocks)
            self.local = None  # the previous plan's shard goes before the new one is loaded
            self.local = self._local_model(shares[0], alone=not workers)
            self.local.allreduce = partial_to_float  # compile both halves at load, not at a token
            self.local.warm_up()
            try:
                self.master.load(shares[1:], self.path, self.fingerprint, self.context, self.attention,
                                 not self.quantized, self.cache_type)
            except NodeLost as e:
                self.master.drop(e.identity, str(e))
                continue
            self.local.allreduce = self.master.hub.allreduce if workers else None
            if workers:  # alone after losing them all, keep their shards: they may rejoin
                remove_stale_shards(cluster_dir(), self.fingerprint, {shard_name(self.fingerprint, shares[0], False)}
                                    | {shard_name(self.fingerprint, s, True) for s in shares[1:]})
            self.plan_id += 1
            self._planned = [w.identity for w in workers]
            parts = [f"master KV heads {shares[0].kv_start}-{shares[0].kv_end} columns "
                     f"{shares[0].col_start}-{shares[0].col_end}"]
            parts += [f"{w.name} KV heads {s.kv_start}-{s.kv_end} columns {s.col_start}-{s.col_end}"
                      for w, s in zip(workers, shares[1:])]
            log(f"plan {self.plan_id} over {len(workers) + 1} nodes: " + "; ".join(parts))
            return

    def _held_plan(self, workers: list[WorkerInfo]) -> list[Share] | None:
        """The plan the workers' held shards make, when each holds one of this model's (the shares
        pulled from here before) and they fit together: the same nodes keep their shards, which a
        plan by measured speed, noisy by a tenth, would change and send again."""
        if not workers:
            return None
        written = written_shards(cluster_dir(), self.fingerprint)
        held = [next((written[m] for m in w.hello["models"] if m in written), None) for w in workers]
        if None in held:
            return None
        shares = plan_around(self.config, held)
        if shares is not None:
            log("plan: the shards the workers hold")
        return shares

    def _local_model(self, share: Share, alone: bool) -> Model:
        source = open_model(self.path)
        if self.mem_limit is None:
            return Model(source if alone else ShardSource(source, share), quantized=self.quantized,
                         attention=self.attention, cache_type=self.cache_type)
        if not alone:
            source = open_model(str(shard_file(ShardSource(source, share), cluster_dir(), self.fingerprint)))
        plan = model_memory_plan(source, self.context, self.mem_limit, self.quantized, self.attention,
                                 cache_type=self.cache_type)
        log(plan.describe())
        return Model(source, quantized=self.quantized, window=plan.window, attention=self.attention,
                     pinned=plan.pinned, cache_type=self.cache_type)

    def new_cache(self, capacity: int) -> ClusterCache:
        if capacity > self.context:  # the workers' caches are made at load: reload with this size
            self.context = capacity
            self._replan()
        return ClusterCache(self, capacity)

    def warm_up(self) -> None:
        pass  # every load warms the local shard up

    def prefill(self, tokens: np.ndarray, cache: ClusterCache) -> np.ndarray:
        return self.forward(tokens, cache)

    def forward(self, tokens: np.ndarray, cache: ClusterCache, all_logits: bool = False) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        start = cache.length
        if start + len(tokens) > cache.capacity:
            raise ContextOverflowError(f"{start + len(tokens)} tokens exceed the context of {cache.capacity}")
        if len(tokens) > 1:  # a new prompt: check on the workers, let new ones in
            self.master.heartbeat()
            self.master.poll()
            if self.master.waiting or [w.identity for w in self.master.workers] != self._planned:
                self._replan()
        while True:
            try:
                if cache.plan != self.plan_id:  # the shards moved: rebuild them by the same calls
                    cache.local, cache.plan = self.local.new_cache(cache.capacity), self.plan_id
                    done = 0
                    for n in cache.calls:
                        self._run(cache.tokens[done:done + n], done, cache.local, False)
                        done += n
                logits = self._run(tokens, start, cache.local, all_logits)
                cache.tokens[start:] = tokens
                cache.calls.append(len(tokens))
                return logits
            except NodeLost as e:
                self.master.drop(e.identity, str(e))
                self._replan()

    def _run(self, tokens: list[int], start: int, local, all_logits: bool) -> np.ndarray:
        local.truncate(start)
        h = self.local.embed(np.asarray(tokens))
        self.master.step(start, h)
        return self.local.logits(self.local.run_layers(h, local), all_logits)

