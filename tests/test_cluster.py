"""The home cluster: the plan, the wire protocol, and real master and worker processes on loopback
running the real SmolLM2, whose greedy tokens must equal a single node's.

The processes run the 4-bit path (the default), one thread each (they share this machine's cores).
Its o_proj and down_proj partials are fixed point (kernels/simd.py), which add up over any split
exactly as one node's sums: the outputs are the same bit for bit, not only the same tokens. The
exact float32 path adds float partials in node order; its text is checked on 2 nodes."""

from __future__ import annotations

import logging
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import edgeinfer_cli

from edgeinfer.cluster.plan import Share, column_step, head_step, plan_shares, split
from edgeinfer.cluster.protocol import MAX_HEADER, ProtocolError, decode, encode
from edgeinfer.cluster.sockets import curve_client, curve_server
from edgeinfer.config import ModelConfig
from edgeinfer.errors import EdgeInferError
from edgeinfer.kernels.q4 import Q4Matrix
from edgeinfer.kernels.q8 import Q8Matrix

TOKEN = "loopback-test-token"
PROMPT = ["-p", "Name three colours.", "-n", "24", "--temp", "0", "-t", "1"]


def smol_config(**kw) -> ModelConfig:
    base = dict(architecture="llama", hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                num_kv_heads=3, head_dim=64, vocab_size=49152, max_context=2048, rms_norm_eps=1e-5,
                rope_theta=1e5)
    return ModelConfig(**{**base, **kw})


def test_plan_covers_every_head_and_column_once():
    c = smol_config()
    for weights in ([1.0], [1.0, 1.0], [3.0, 1.0], [1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 0.5], [1.0] * 7):
        shares = plan_shares(c, weights)
        assert [s.kv_start for s in shares[1:]] == [s.kv_end for s in shares[:-1]]
        assert [s.col_start for s in shares[1:]] == [s.col_end for s in shares[:-1]]
        assert shares[0].kv_start == 0 and shares[-1].kv_end == 3
        assert shares[0].col_start == 0 and shares[-1].col_end == 1536
        assert all(s.columns > 0 and s.col_start % 128 == 0 for s in shares)
    four = plan_shares(c, [1.0] * 4)
    assert sorted(s.kv_heads for s in four) == [0, 1, 1, 1]  # more nodes than KV heads: one holds none
    uneven = plan_shares(c, [3.0, 1.0])
    assert uneven[0].columns == 3 * uneven[1].columns  # shares follow the weights
    assert split(10, [1.0, 1.0, 1.0]) == [(0, 4), (4, 7), (7, 10)]


def test_k_quant_projections_split_on_whole_super_blocks(caplog):
    """A K-quant's activations quantise per 256 columns: the shares of a K-quant down_proj are whole
    256-column super-blocks while there are enough for every node (otherwise, and for the other
    types, whole 128-column chunks), and those of a K-quant o_proj hold as many KV heads at a time
    as make its columns whole super-blocks, so each node quantises its columns as one node would."""
    c = smol_config()  # 1536 MLP columns: 6 super-blocks; 192 o_proj columns per KV head
    caplog.set_level(logging.INFO, logger="edgeinfer.cluster")
    assert [column_step(c, n, True) for n in (1, 2, 6, 7)] == [256, 256, 256, 128]
    assert caplog.text.count("128-column chunks") == 1 and "over 7 nodes" in caplog.text  # the fallback is said
    assert column_step(c, 2, False) == 128 and column_step(smol_config(intermediate_size=1664), 2, True) == 128
    with pytest.raises(EdgeInferError, match="13 nodes are more than the 12 MLP column blocks"):
        plan_shares(c, [1.0] * 13)
    phi3 = smol_config(hidden_size=3072, intermediate_size=8192, num_heads=32, num_kv_heads=32, head_dim=96)
    llama1b = smol_config(hidden_size=2048, intermediate_size=8192, num_heads=32, num_kv_heads=8, head_dim=64)
    assert head_step(phi3, True) == 8 and head_step(phi3, False) == 1 and head_step(llama1b, True) == 1
    for config, kv_heads in ((llama1b, 8), (phi3, 32)):
        for weights in ([1.0, 1.0], [3.0, 1.0], [1.0, 2.0, 1.0, 0.5]):
            shares = plan_shares(config, weights, (True, True))
            width = config.head_dim * config.num_heads // config.num_kv_heads
            assert all(s.columns > 0 and s.col_start % 256 == 0 for s in shares)
            assert all(s.kv_start * width % 256 == 0 for s in shares) and shares[-1].kv_end == kv_heads
            assert shares[-1].col_end == config.intermediate_size


def test_a_plan_around_held_shards_gives_the_master_the_rest():
    from edgeinfer.cluster.plan import plan_around

    c = smol_config()
    for weights in ([1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 3.0]):
        shares = plan_shares(c, weights)
        assert plan_around(c, shares[1:]) == shares  # the same workers get the same plan back
    assert plan_around(c, [Share(0, 1, 0, 256), Share(2, 3, 1280, 1536)]) == \
        [Share(1, 2, 256, 1280), Share(0, 1, 0, 256), Share(2, 3, 1280, 1536)]
    assert plan_around(c, [Share(0, 3, 0, 1280)]) == [Share(3, 3, 1280, 1536), Share(0, 3, 0, 1280)]
    assert plan_around(c, [Share(0, 1, 0, 256), Share(1, 2, 256, 512)]) == \
        [Share(2, 3, 512, 1536), Share(0, 1, 0, 256), Share(1, 2, 256, 512)]
    for held in ([Share(0, 2, 0, 768), Share(1, 3, 768, 1536)],  # overlapping heads
                 [Share(0, 3, 0, 1536)],  # nothing left for the master
                 [Share(0, 1, 0, 256), Share(2, 3, 512, 1280)]):  # two gaps in the columns
        assert plan_around(c, held) is None, held


def test_matrix_shards_are_bit_exact():
    rng = np.random.default_rng(1)
    rows, cols = 36, 320
    q4 = Q4Matrix.from_rows(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                            rng.random((rows, cols // 32)).astype(np.float32),
                            rng.standard_normal((rows, cols // 32)).astype(np.float32))
    q4_0 = Q4Matrix.from_rows(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8),
                              rng.random((rows, cols // 32)).astype(np.float32))
    q8 = Q8Matrix.from_values(rng.integers(-128, 128, (rows, cols)), rng.random((rows, cols // 32)).astype(np.float16))
    q8_16 = Q8Matrix.from_values(rng.integers(0, 256, (rows, cols)), rng.random((rows, cols // 16)).astype(np.float32),
                                 rng.standard_normal((rows, cols // 16)).astype(np.float32))
    for m in (q4, q4_0, q8, q8_16):
        full = m.dequantize()
        for r, c in ((slice(4, 20), slice(None)), (slice(None), slice(64, 256)), (slice(8, 12), slice(288, 320))):
            np.testing.assert_array_equal(m.select(r, c).dequantize(), full[r, c])
    with pytest.raises(ValueError):
        q4.select(slice(None), slice(16, 64))


def test_valid_messages_round_trip():
    m = decode(encode("echo", b"\1\2\3", seq=7))
    assert m.kind == "echo" and m.fields["seq"] == 7 and m.payload == b"\1\2\3"
    assert decode(encode("ready", rss=5)).fields == {"rss": 5}
    assert decode(encode("ping")).kind == "ping"


def link_pair() -> tuple:
    """The master's and a worker's ends of one link over TCP on loopback, and its key."""
    from edgeinfer.cluster.link import Link, new_link_keys

    with socket.create_server(("127.0.0.1", 0)) as server:
        b = socket.create_connection(server.getsockname())
        a = server.accept()[0]
    key = new_link_keys()[1]
    return Link(a, key, master=True), Link(b, key, master=False), key


def take(link, timeout: float = 5.0):
    """The next message on a link, waiting for it."""
    while (m := link.take()) is None:
        assert select.select([link.sock], [], [], timeout)[0], "nothing arrived"
    return m


def test_partials_and_sums_round_trip_on_a_link():
    from edgeinfer.cluster.link import PARTIAL, STEP, as_array

    master, worker, _ = link_pair()
    h = np.arange(12, dtype=np.float32).reshape(2, 6)
    master.send(STEP, 9, h, "f4", arg=40)
    m = take(worker)
    assert (m.kind, m.seq, m.arg) == (STEP, 9, 40) and np.array_equal(as_array(m.data, m.wire, (2, 6)), h)
    fixed = np.array([-(1 << 40), 3, 1 << 50], np.int64)  # a 4-bit node's partial: int64, not rounded to float
    worker.send(PARTIAL, 2, fixed, "i8")
    kind, seq, wire, data, _ = take(master)
    got = as_array(data, wire, (3,))
    assert (kind, seq, wire) == (PARTIAL, 2, "i8") and got.dtype == np.int64 and np.array_equal(got, fixed)
    small = np.array([-(1 << 31), 5, (1 << 31) - 1], np.int32)  # fits int32: sent in half the bytes
    worker.send(PARTIAL, 3, small, "i4")
    kind, seq, wire, data, _ = take(master)
    assert len(data) == 12 and as_array(data, wire, (3,)).dtype == np.int64
    assert np.array_equal(as_array(data, wire, (3,)), small) and as_array(data, wire, (4,)) is None
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    master.send(PARTIAL, 3, a.astype(np.float16), "f2", arg=2)
    kind, seq, wire, data, node = take(worker)
    assert (kind, seq, node) == (PARTIAL, 3, 2) and np.array_equal(as_array(data, wire, (3, 4)), a)
    big = np.arange(3 << 20, dtype=np.int64)  # a prefill's partial: more than the socket buffers hold
    import threading
    sender = threading.Thread(target=worker.send, args=(PARTIAL, 4, big, "i8"))
    sender.start()
    assert np.array_equal(as_array(take(master)[3], "i8", big.shape), big)
    sender.join()
    got = {}  # both ends send one at once (every node sends its partial when it has it): neither waits for ever

    def exchange(end, name):
        end.send(PARTIAL, 5, big + len(name), "i8", timeout=60)
        got[name] = as_array(take(end, 60).data, "i8", big.shape)
    both = [threading.Thread(target=exchange, args=(end, name)) for end, name in ((master, "m"), (worker, "wk"))]
    for t in both:
        t.start()
    for t in both:
        t.join(120)
    assert np.array_equal(got["m"], big + 2) and np.array_equal(got["wk"], big + 1)


def test_a_link_refuses_what_does_not_open_under_its_key():
    from edgeinfer.cluster.link import PARTIAL, Link, LinkClosed, new_link_keys

    master, worker, key = link_pair()
    sent = []  # three messages as they go on the wire, read raw at the master's end
    for seq in range(3):
        worker.send(PARTIAL, seq, np.ones(4, np.int64), "i8")
        master.sock.setblocking(True)
        length = int.from_bytes(master.sock.recv(4, socket.MSG_WAITALL), "little")
        sent.append(length.to_bytes(4, "little") + master.sock.recv(length, socket.MSG_WAITALL))
    for forged in [sent[1] + sent[0],  # out of order
                   sent[0] + sent[0],  # replayed
                   sent[0][:-1] + bytes([sent[0][-1] ^ 1]),  # one bit flipped
                   (1 << 31).to_bytes(4, "little"),  # longer than any message may be
                   (3).to_bytes(4, "little")]:  # shorter than a sealed header
        a, b = socket.socketpair()
        end = Link(a, key, master=True)
        b.sendall(forged)
        with pytest.raises(LinkClosed):
            while True:
                take(end, 1.0)
        a.close(), b.close()
    a, b = socket.socketpair()
    other = Link(a, new_link_keys()[1], master=True)  # the wrong key
    b.sendall(sent[0])
    with pytest.raises(LinkClosed):
        take(other, 1.0)
    rng = random.Random(0)
    for _i in range(300):  # mutated messages: refused with LinkClosed, never anything else
        data = bytearray(sent[0])
        for _j in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        a, b = socket.socketpair()
        end = Link(a, key, master=True)
        b.sendall(bytes(data))
        b.close()
        try:
            while True:
                end.take() or select.select([a], [], [], 1.0)
        except LinkClosed:
            pass
        a.close()


def test_malformed_messages_raise_protocol_error_only():
    good = [encode("echo", b"\0" * 40, seq=3), encode("ready", rss=5), encode("need", fingerprint="b" * 64, offset=7),
            encode("load", fingerprint="a" * 64, size=10, shard_fingerprint="", shard_size=0,
                   share={"kv": [0, 1], "cols": [0, 128]}, context=8, attention="exact", exact=False, sync="f4",
                   cache_type="f16", link_id="00" * 16, link_key="00" * 32, rank=1, nodes=2)]
    bad = [[b"not json"], [b"[1, 2]"], [b'{"kind": "nope", "v": 1}'], [b"{}"], [b"x" * (MAX_HEADER + 1)],
           [b'{"kind": "ping", "v": 99}'], [b'{"kind": "ready", "v": 1, "rss": "5"}'],
           [b'{"kind": "ready", "v": 1, "rss": true}'], [b'{"kind": "ready", "v": 1}'],
           encode("ping") + [b"extra payload"], [encode("echo", b"x", seq=1)[0]],  # an echo without its bytes
           [b'{"kind": "sum", "v": 4}'], [b'{"kind": "step", "v": 4}'],  # the steps' arrays go on the links
           [], [b"a", b"b", b"c"]]
    for frames in bad:
        with pytest.raises(ProtocolError):
            decode(frames)
    for frames in good:
        decode(frames)
    rng = random.Random(0)
    for _ in range(3000):  # mutated valid messages: decoded or refused, never anything else
        frames = [bytearray(f) for f in rng.choice(good)]
        target = frames[rng.randrange(len(frames))]
        for _ in range(rng.randrange(1, 4)):
            if target and rng.random() < 0.7:
                target[rng.randrange(len(target))] = rng.randrange(256)
            else:
                del target[rng.randrange(len(target) + 1):]
        try:
            decode([bytes(f) for f in frames])
        except ProtocolError:
            pass


def test_ring_allreduce_sums_like_the_star():
    import importlib.util
    import queue
    import threading

    bench_file = Path(__file__).parent.parent / "bench" / "cluster.py"  # the ring is the bench's, for comparison
    spec = importlib.util.spec_from_file_location("bench_cluster", bench_file)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ring_allreduce = bench.ring_allreduce

    for nodes, size in ((2, 576), (3, 577), (4, 10)):
        inboxes = [queue.Queue() for _ in range(nodes)]
        xs = [np.random.default_rng(r).standard_normal(size).astype(np.float32) for r in range(nodes)]
        out = [None] * nodes

        def run(r: int) -> None:
            out[r] = ring_allreduce(xs[r], r, nodes, lambda b: inboxes[(r + 1) % nodes].put(b), inboxes[r].get)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        for o in out:
            np.testing.assert_allclose(o, np.sum(xs, axis=0), rtol=1e-5, atol=1e-6)


def test_a_down_proj_bias_counts_on_one_node_only():
    """Every node adds its down_proj partial: with an MLP bias, only the share whose columns start at
    0 keeps it, so the nodes' sum holds it once; the other partial biases are cut by column."""
    from types import SimpleNamespace

    from edgeinfer.cluster.shard import ShardSource

    c = smol_config(mlp_bias=True)
    tensors = {"model.layers.0.mlp.down_proj.bias": np.arange(576, dtype=np.float32),
               "model.layers.0.mlp.up_proj.bias": np.arange(1536, dtype=np.float32)}
    source = SimpleNamespace(config=c, tokenizer=None, path="stub", format="stub", float32=tensors.__getitem__)
    shares = plan_shares(c, [1.0, 1.0, 1.0])
    down = [ShardSource(source, s).float32("model.layers.0.mlp.down_proj.bias") for s in shares]
    np.testing.assert_array_equal(sum(down), tensors["model.layers.0.mlp.down_proj.bias"])
    up = [ShardSource(source, s).float32("model.layers.0.mlp.up_proj.bias") for s in shares]
    np.testing.assert_array_equal(np.concatenate(up), tensors["model.layers.0.mlp.up_proj.bias"])


def test_share_from_the_wire_is_checked_against_the_model():
    c = smol_config()
    assert Share.from_dict({"kv": [1, 3], "cols": [0, 512]}, c) == Share(1, 3, 0, 512)
    from edgeinfer.errors import EdgeInferError
    for bad in ({"kv": [0, 4], "cols": [0, 128]}, {"kv": [0, 1]}, {"kv": "x", "cols": [0, 1]},
                {"kv": [0, 1], "cols": [128, 128]}):
        with pytest.raises(EdgeInferError):
            Share.from_dict(bad, c)


@pytest.mark.real_model
def test_four_bit_shards_add_up_to_the_whole_layer(smollm2_single):
    """Four 4-bit shards (one without heads: SmolLM2 has 3 KV heads) each give a layer's partial
    sums; added, they are the whole model's attention and MLP outputs bit for bit (fixed point)."""
    from edgeinfer.cluster.shard import ShardSource
    from edgeinfer.kernels.reference import rmsnorm, rope_tables
    from edgeinfer.model import Model
    from edgeinfer.storage import open_model

    full = Model(open_model(str(smollm2_single)), quantized=True)
    assert full.path.fused  # the 4-bit path, whatever this CPU (AVX-512 VNNI or AVX2)
    shares = plan_shares(full.config, [1.0] * 4)
    shards = [Model(ShardSource(open_model(str(smollm2_single)), s, layers_only=True), quantized=True) for s in shares]
    assert [m.config.num_kv_heads for m in shards] == [1, 1, 1, 0] and all(m.path.fused for m in shards)
    h = full.embed(np.array([1, 504, 3458, 282, 4193, 314, 1345, 47]))
    cos, sin = rope_tables(full.layer_ropes(8)[0], np.arange(len(h)))
    layer, _ = full.weights.layer(3)
    x = rmsnorm(h, layer.attn_norm, full.config.rms_norm_eps)
    whole = full.attention(layer, x, full.new_cache(8), 3, cos, sin), full.mlp(layer, x)
    parts = [(m.attention(m.weights.layer(3)[0], x, m.new_cache(8), 3, cos, sin), m.mlp(m.weights.layer(3)[0], x))
             for m in shards]
    for k in range(2):
        assert whole[k].dtype == np.int64 and whole[k].any()
        np.testing.assert_array_equal(sum(p[k] for p in parts), whole[k])


@pytest.mark.real_model
def test_a_shard_written_as_its_own_file_streams_to_the_same_partial_sums(smollm2_single, tmp_path):
    """What `worker --mem-limit` runs: the share converted into a file of its own, its layers (and no
    head) streamed through a window of 2 slots, gives the resident shard's sums exactly."""
    from edgeinfer.cluster.shard import ShardSource
    from edgeinfer.errors import EdgeInferError
    from edgeinfer.kernels.simd import partial_to_float
    from edgeinfer.model import Model
    from edgeinfer.session import open_engine
    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    share = plan_shares(open_model(str(smollm2_single)).config, [1.0, 1.0])[1]
    out = tmp_path / "shard.safetensors"
    convert(ShardSource(open_model(str(smollm2_single)), share, layers_only=True), str(out))
    resident = Model(ShardSource(open_model(str(smollm2_single)), share, layers_only=True), quantized=True)
    streamed = Model(open_model(str(out)), quantized=True, window=2)
    assert streamed.weights.stream.window == 2 and len(streamed.weights.stream.units) == 30  # no head unit
    assert "model.embed_tokens.weight" not in open_model(str(out)).names()  # the master keeps the embedding
    with pytest.raises(EdgeInferError, match="share of the layers"):
        open_engine(str(out))  # not a whole model
    h = np.random.default_rng(3).standard_normal((5, 576)).astype(np.float32)
    sums = []
    for m in (resident, streamed):
        m.allreduce = partial_to_float  # each node's own partial sums, as if it were alone
        cache = m.new_cache(16)
        prefill = m.run_layers(h[:4], cache)
        sums.append((prefill, m.run_layers(h[4:], cache)))
    for a, b in zip(*sums):
        np.testing.assert_array_equal(a, b)


# --- real processes on loopback ------------------------------------------------------------------

def free_port() -> int:
    """A free port, and the next one free too (a master's links, link.py), below the kernel's
    ephemeral range (32768 and up here): a port from that range (bind to 0) can be the very source
    port a reconnecting worker's socket is given, so that it connects to itself while no master
    listens (a TCP self-connect). Users' ports (7433 by default) are not in it either."""
    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low - 1)
        with socket.socket() as s, socket.socket() as s2:
            try:
                s.bind(("0.0.0.0", port))
                s2.bind(("0.0.0.0", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def spawn(*args: str, env: dict | None = None, text: bool = True) -> subprocess.Popen:
    """An edgeinfer process as a terminal starts it, whose Ctrl+C (SIGINT) ends it: a suite started
    in the background (`pytest &`, nohup) passes SIGINT on ignored, and Python keeps it ignored."""
    return subprocess.Popen([sys.executable, "-m", "edgeinfer.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=text, env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def worker(port: int, cache_dir: Path, token: str = TOKEN, env: dict | None = None) -> subprocess.Popen:
    return spawn("worker", "--join", f"127.0.0.1:{port}", "--token", token, "--cache-dir", str(cache_dir),
                 "--timeout", "120", "-t", "1", env=env)


def held_model_dir(tmp_path: Path, model: Path, name: str) -> Path:
    """A worker cache dir that already holds the model (a hard link named by its fingerprint)."""
    from edgeinfer.cluster.node import fingerprint

    folder = tmp_path / name
    folder.mkdir()
    os.link(model, folder / f"{fingerprint(str(model))}.safetensors")
    return folder


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def alone(smollm2_single):
    """One node's output for a prompt (run once per prompt)."""
    outputs: dict[tuple, str] = {}

    def run(*prompt: str) -> str:
        if prompt not in outputs:
            r = edgeinfer_cli("run", str(smollm2_single), *prompt)
            assert r.returncode == 0, r.stderr
            outputs[prompt] = r.stdout
        return outputs[prompt]
    return run


@pytest.fixture(scope="module")
def single_node(alone) -> str:
    return alone(*PROMPT)


@pytest.mark.real_model
@pytest.mark.parametrize("workers,path", [(0, ()), (1, ()), (2, ()), (3, ()), (1, ("--exact",)),
                                          (1, ("--cache-type", "q8_0"))])
def test_greedy_tokens_equal_single_node(smollm2_single, alone, tmp_path, workers, path):
    port = free_port()
    master = spawn("run", str(smollm2_single), *PROMPT, *path, "--listen", str(port), "--token", TOKEN,
                   "--workers", str(workers), "--wait", "120")
    # the first worker pulls a file of its share alone from the master; the others hold the model
    dirs = [tmp_path / "pulled"] + [held_model_dir(tmp_path, smollm2_single, f"w{i}") for i in range(1, workers)]
    procs = [worker(port, d) for d in dirs[:workers]]
    code, out, err = finish(master)
    assert code == 0, err
    assert out == alone(*PROMPT, *path), err
    assert f"plan 1 over {workers + 1} nodes" in err, err
    if workers >= 1:
        assert "sending its shard" in err and "sending the model file" not in err, err
        pulled = list((tmp_path / "pulled").glob("*.safetensors"))
        from edgeinfer.storage import open_model
        c, full = open_model(str(pulled[0])).config, open_model(str(smollm2_single)).config
        embedding = full.vocab_size * full.hidden_size * 5 // 8  # at least what its 4-bit rows take
        assert len(pulled) == 1 and pulled[0].stat().st_size < smollm2_single.stat().st_size - embedding
        assert "model.embed_tokens.weight" not in open_model(str(pulled[0])).names()
        # a share, not the model
        assert c.num_layers == full.num_layers and c.layers_only and c.intermediate_size < full.intermediate_size
    for p in procs:
        wcode, _, werr = finish(p, 60)
        assert wcode == 0 and "the master ended the session" in werr, werr
        if "--cache-type" in path:  # every node's KV cache is of the type asked for
            assert f"{path[-1]} KV cache" in werr, werr
    if workers == 1 and not path:  # the next session with the same plan: the shard is reused, not sent again
        master = spawn("run", str(smollm2_single), *PROMPT, "--listen", str(port), "--token", TOKEN,
                       "--workers", "1", "--wait", "120")
        again = worker(port, tmp_path / "pulled")
        code, out, err = finish(master)
        assert code == 0 and out == alone(*PROMPT), err
        assert "sending" not in err, err
        finish(again, 60)


@pytest.mark.real_model
def test_gemma3_on_two_nodes_equals_one_node(tmp_path):
    """Gemma 3 270M (one KV head, q/k and output norms after the all-reduce, local layers' window)
    split over a master and a worker on loopback: the same greedy text as alone, for a prompt longer
    than the 512-token window, so every node's local layers wrap their ring of keys and values in the
    prompt's chunks and in each decode step."""
    from edgeinfer.storage.fetch import pull

    model = str(pull("gemma3-270m"))
    text = Path("/usr/share/common-licenses/GPL-3").read_text()[:2600]
    prompt = ("-p", text, "-n", "12", "--raw", "--temp", "0", "-v")
    alone = edgeinfer_cli("run", model, *prompt)
    assert alone.returncode == 0, alone.stderr
    tokens = int(re.search(r"prompt: (\d+) tokens", alone.stderr).group(1))
    assert tokens > 512, alone.stderr  # past the window
    port = free_port()
    master = spawn("run", model, *prompt, "--listen", str(port), "--token", TOKEN, "--workers", "1", "--wait", "120")
    helper = worker(port, tmp_path / "pulled")
    code, out, err = finish(master)
    assert code == 0 and "plan 1 over 2 nodes" in err, err
    assert out == alone.stdout and len(out.split()) >= 6, (out, alone.stdout)
    assert finish(helper, 60)[0] == 0


def test_a_cluster_cache_keeps_the_calls_that_filled_it():
    """The calls a rebuild replays: a prompt as a batch, decoded tokens one by one, cut where the
    engine truncates."""
    from types import SimpleNamespace

    from edgeinfer.cluster.cluster_model import ClusterCache

    shard = SimpleNamespace(truncate=lambda length: length)  # a shard's cache that keeps what it is asked to
    cache = ClusterCache(SimpleNamespace(local=SimpleNamespace(new_cache=lambda capacity: shard), plan_id=0), 64)
    cache.tokens, cache.calls = list(range(12)), [8, 1, 1, 1, 1]
    cache.truncate(10)
    assert cache.calls == [8, 1, 1] and cache.length == 10
    cache.truncate(5)
    assert cache.calls == [5] and cache.length == 5


@pytest.mark.real_model
def test_a_worker_killed_mid_generation(smollm2_single, tmp_path):
    prompt = ["-p", "Write a short story about a robot.", "-n", "48", "--temp", "0", "-t", "1"]
    alone = edgeinfer_cli("run", str(smollm2_single), *prompt)
    assert alone.returncode == 0, alone.stderr
    port = free_port()
    master = spawn("run", str(smollm2_single), *prompt, "--listen", str(port), "--token", TOKEN,
                   "--workers", "2", "--wait", "120", "--timeout", "3", text=False)
    procs = [worker(port, held_model_dir(tmp_path, smollm2_single, f"w{i}")) for i in range(2)]
    first = b""
    while len(first) < 120:  # well into the reply (211 bytes): the rebuilt caches hold many decoded tokens
        ready, _, _ = select.select([master.stdout], [], [], 300)
        assert ready, "the master printed nothing"
        piece = os.read(master.stdout.fileno(), 120 - len(first))
        assert piece, first  # not the end of the reply yet
        first += piece
    procs[1].send_signal(signal.SIGKILL)
    code, rest, err = finish(master)
    err = err.decode()
    assert code == 0, err
    assert (first + rest).decode() == alone.stdout, err
    assert "dropped worker" in err and "plan 2 over 2 nodes" in err, err
    finish(procs[0], 60)


@pytest.mark.real_model
def test_a_worker_started_before_its_master_says_so_and_waits(smollm2_single, alone, tmp_path):
    """A worker says at once where it connects and keeps trying, a line every few seconds, until
    its master starts; with nobody there, --timeout ends it with one error line and status 2."""
    import time

    port = free_port()
    w = worker(port, held_model_dir(tmp_path, smollm2_single, "w"))
    lines, deadline = [], time.monotonic() + 60
    while not any("still trying" in line for line in lines):
        ready, _, _ = select.select([w.stderr], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, lines  # a line within the deadline
        lines.append(w.stderr.readline())
        assert lines[-1], lines  # not the end of its output: the worker is still there
    assert f"connecting to the master at tcp://127.0.0.1:{port}" in lines[0], lines
    master = spawn("run", str(smollm2_single), *PROMPT, "--listen", str(port), "--token", TOKEN,
                   "--workers", "1", "--wait", "120")
    code, out, err = finish(master)
    assert code == 0 and out == alone(*PROMPT) and "plan 1 over 2 nodes" in err, err
    code, _, err = finish(w, 60)
    assert code == 0 and "the master ended the session" in err, err

    lone = spawn("worker", "--join", f"127.0.0.1:{free_port()}", "--token", TOKEN, "--cache-dir",
                 str(tmp_path / "lone"), "--timeout", "6", "-t", "1")
    code, _, err = finish(lone, 60)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "still trying" in err and last.startswith("edgeinfer: error: no answer from the master"), err


@pytest.mark.real_model
def test_shard_files_of_an_earlier_plan_are_removed(smollm2_single, alone, tmp_path):
    """A new plan replaces the shares: the worker removes the shard it pulled for the old one, and
    the master the share files it wrote for shares no longer planned."""

    home = {"EDGEINFER_HOME": str(tmp_path / "master")}  # the master's own cluster dir
    pulled = tmp_path / "pulled"

    def session(*caches: Path) -> tuple[set[tuple[int, ...]], tuple[int, ...]]:
        """The plan's shares, and the share of the worker that pulls."""
        port = free_port()
        master = spawn("run", str(smollm2_single), *PROMPT, "--listen", str(port), "--token", TOKEN,
                       "--workers", str(len(caches)), "--wait", "120", env=home)
        procs = [worker(port, c) for c in caches]
        code, out, err = finish(master)
        assert code == 0 and out == alone(*PROMPT) and f"plan 1 over {len(caches) + 1} nodes" in err, err
        werr = finish(procs[0], 60)[2]
        for p in procs[1:]:
            finish(p, 60)
        plan = {tuple(map(int, m)) for m in re.findall(r"KV heads (\d+)-(\d+) columns (\d+)-(\d+)", err)}
        return plan, tuple(map(int, re.search(r"loaded its share: KV heads (\d+)-(\d+), MLP columns (\d+)-(\d+)",
                                              werr).groups()))

    def written() -> set[tuple[int, ...]]:
        names = [p.name for p in (tmp_path / "master" / "cluster").glob("*.safetensors")]
        return {tuple(map(int, re.search(r"kv(\d+)-(\d+)\.cols(\d+)-(\d+)", n).groups())) for n in names}

    _, first_share = session(pulled)
    first = {p.name for p in pulled.glob("*.safetensors")}
    assert len(first) == 1 and written() == {first_share}, (first, written())
    plan, second_share = session(pulled, held_model_dir(tmp_path, smollm2_single, "held"))  # new shares
    second = {p.name for p in pulled.glob("*.safetensors")}
    assert len(plan) == 3 and written() <= plan and second_share in written(), (plan, written())
    assert len(second) == 1 and (second != first) == (second_share != first_share), (first, second)


@pytest.mark.real_model
def test_wrong_token_and_wrong_version_are_refused(smollm2_single, tmp_path):
    port = free_port()
    master = spawn("run", str(smollm2_single), *PROMPT, "--listen", str(port), "--token", TOKEN,
                   "--workers", "1", "--wait", "40")
    wrong_token = worker(port, tmp_path / "a", token="not-the-token")
    code, _, err = finish(wrong_token, 120)
    assert code == 2 and "wrong join token" in err and "Traceback" not in err, err
    old = subprocess.run([sys.executable, "-c", "import sys, edgeinfer; edgeinfer.__version__ = '0.0.1'; "
                          "from edgeinfer.cli import main; sys.exit(main(sys.argv[1:]))", "worker", "--join",
                          f"127.0.0.1:{port}", "--token", TOKEN, "--cache-dir", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=120)
    assert old.returncode == 2 and "edgeinfer 0.0.1" in old.stderr and "Traceback" not in old.stderr, old.stderr
    good = worker(port, held_model_dir(tmp_path, smollm2_single, "c"))
    code, out, err = finish(master)
    assert code == 0, err
    assert "wrong join token" in err and "refused a worker: edgeinfer 0.0.1" in err, err
    assert "plan 1 over 2 nodes" in err
    finish(good, 60)


def connect_when_listening(port: int, wait: float = 300) -> socket.socket:
    """A TCP connection to a port on loopback, once something listens there."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.real_model
def test_a_master_whose_link_port_is_taken_says_so(smollm2_single):
    port = free_port()
    with socket.create_server(("127.0.0.1", port + 1)):
        r = edgeinfer_cli("run", str(smollm2_single), "-p", "x", "--listen", str(port), "--token", TOKEN)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"port {port + 1}" in r.stderr.strip().splitlines()[-1], r.stderr
    r = edgeinfer_cli("run", str(smollm2_single), "-p", "x", "--listen", "65535", "--token", TOKEN)  # no next port
    assert r.returncode == 2 and "Traceback" not in r.stderr and "65534 at most" in r.stderr, r.stderr


@pytest.mark.real_model
def test_a_worker_that_never_opens_its_link_is_dropped(smollm2_single, single_node):
    """A worker that says it is ready but never opened its link (a firewall on the master's port + 1,
    say) is named and dropped within the step timeout; the master answers alone."""
    from edgeinfer import __version__
    from edgeinfer.cluster.protocol import PROTOCOL

    port = free_port()
    master = spawn("run", str(smollm2_single), *PROMPT, "--listen", str(port), "--token", TOKEN,
                   "--workers", "1", "--wait", "120", "--timeout", "3")
    ctx = zmq.Context()
    try:
        sock, _ = curve_client(ctx, TOKEN, f"tcp://127.0.0.1:{port}")
        sock.send_multipart(encode("hello", token=TOKEN, protocol=PROTOCOL, version=__version__, cores=1,
                                   free_ram=1 << 30, gemv_gbs=1.0, disk_mb_s=1.0, models=[]))
        while True:
            assert sock.poll(300_000), "no load from the master"
            m = decode(sock.recv_multipart())
            if m.kind == "load":
                sock.send_multipart(encode("ready", rss=1))
                break
        code, out, err = finish(master)
        assert code == 0 and out == single_node, err
        assert "dropped worker 1: worker 1 did not open its all-reduce link" in err, err
    finally:
        ctx.destroy(linger=0)


@pytest.mark.real_model
def test_fuzzed_frames_crash_neither_side(smollm2_single, single_node, tmp_path):
    port = free_port()
    master = spawn("run", str(smollm2_single), *PROMPT, "--listen", str(port), "--token", TOKEN,
                   "--workers", "1", "--wait", "60")
    ctx = zmq.Context()
    try:
        sock, _ = curve_client(ctx, TOKEN, f"tcp://127.0.0.1:{port}")
        rng = random.Random(1)
        hello = encode("hello", token=TOKEN, protocol=1, version="x", cores=1, free_ram=1, gemv_gbs=1.0, disk_mb_s=1.0,
                       models=[])
        for frames in ([b"garbage"], [b'{"kind": "partial", "v": 1}'], [b"{" * 20000], hello[:1] + [b"payload"],
                       [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))] * 2):
            sock.send_multipart(frames)
        # ZeroMQ delivers them once the master listens, which on a first run comes after its kernels
        # compile: a 1 s linger dropped them unsent under load.
        sock.close(linger=300_000)
        for junk in (b"\xff" * 16 + b"garbage", bytes(60), b""):  # strangers on the links' port
            connect_when_listening(port + 1).sendall(junk)
        good = worker(port, held_model_dir(tmp_path, smollm2_single, "w"))
        code, out, err = finish(master)
        assert code == 0 and out == single_node, err
        assert "dropped a malformed message" in err
        finish(good, 60)

        # the worker's side: a master that welcomes it, then sends garbage, then ends the session
        server, _, _ = curve_server(ctx, TOKEN, f"tcp://127.0.0.1:{port}")
        w = worker(port, tmp_path / "empty")

        def receive() -> list[bytes]:  # with a deadline: a worker that died must fail the test, not hang it
            if not server.poll(180_000):
                w.kill()
                raise AssertionError(f"no message from the worker: {w.communicate()[1]}")
            return server.recv_multipart()

        identity, *frames = receive()
        assert decode(frames).kind == "hello"
        server.send_multipart([identity, *encode("welcome", node=1)])
        for junk in ([b"\xff\xfe"], [b'{"kind": "step", "v": 1}'], [b'{"kind": "sum", "v": 1, "seq": 0, "dtype": "f4",'
                                                                      b' "shape": [1000000]}', b"1234"]):
            server.send_multipart([identity, *junk])
        server.send_multipart([identity, *encode("load", fingerprint="a" * 64, size=10, shard_fingerprint="",
                                                 shard_size=0, share={}, context=8, attention="exact", exact=False,
                                                 sync="f4", cache_type="f16", link_id="zz", link_key="00", rank=1,
                                                 nodes=2)])
        reply = decode(receive()[1:])
        assert reply.kind == "failed" and "malformed link id or key" in reply.fields["message"]
        server.send_multipart([identity, *encode("bye", reason="test over")])
        code, _, err = finish(w, 60)
        assert code == 0 and "dropped a malformed message" in err and "test over" in err, err
        server.close()
    finally:  # a context left to the garbage collector can block in term() in the middle of a later test
        ctx.destroy(linger=0)


@pytest.mark.real_model
def test_the_chat_app_as_master_of_a_cluster(smollm2_single, tmp_path):
    """`edgeinfer chat --listen`: the app waits for the worker, shows the join command and the
    cluster's events, replies through the cluster, and says bye to the worker when it closes."""
    import asyncio
    import time

    from edgeinfer.tui.app import ChatApp

    from edgeinfer.session import ClusterOptions, SessionOptions

    port = free_port()
    options = SessionOptions(str(smollm2_single), 256, cluster=ClusterOptions(str(port), TOKEN, workers=1, wait=120.0))
    w = worker(port, held_model_dir(tmp_path, smollm2_single, "w"))
    app = ChatApp(options, tmp_path / "h.sqlite3")

    async def until(pilot, condition, timeout=240.0):
        start = time.monotonic()
        while not condition():
            assert time.monotonic() - start < timeout, "timed out waiting for the app"
            await pilot.pause(0.05)

    async def scenario():
        async with app.run_test(size=(150, 32)) as pilot:
            await until(pilot, lambda: app.engine is not None)
            assert app.join_line == f"edgeinfer worker --join 127.0.0.1:{port} --token {TOKEN}"
            assert len(app.engine.model.master.workers) == 1
            await pilot.click("#prompt")
            await pilot.press(*"hello", "enter")
            await until(pilot, lambda: app.last_reply is not None and app.generation is None)
            assert app.last_reply.text and app.last_reply.stats.decode_tokens > 0
            status = str(app.query_one("#status").render())
            assert "cluster of 2" in status, status
            assert any("plan 1 over 2 nodes" in line for line in app.cluster_events), app.cluster_events

    try:
        asyncio.run(scenario())
    finally:
        app.close_session()
    code, _, err = finish(w, 60)
    assert code == 0 and "the master ended the session" in err and "served" in err, err


@pytest.mark.real_model
def test_a_worker_streams_its_pulled_shard_within_its_mem_limit(smollm2_single, alone, tmp_path):
    """`worker --mem-limit`: a limit below what the share needs is refused by the worker (the master
    drops it and answers alone); one just above it streams the pulled shard file through a window
    of a few layer slots, and the cluster's text is one node's."""

    prompt = [*PROMPT, "-c", "256"]

    def session(limit: str) -> tuple[str, str, str]:
        port = free_port()
        master = spawn("run", str(smollm2_single), *prompt, "--listen", str(port), "--token", TOKEN,
                       "--workers", "1", "--wait", "120")
        w = spawn("worker", "--join", f"127.0.0.1:{port}", "--token", TOKEN, "--cache-dir", str(tmp_path / "w"),
                  "--timeout", "120", "-t", "1", "--mem-limit", limit)
        code, out, err = finish(master)
        assert code == 0, err
        _, _, werr = finish(w, 60)
        return out, err, werr

    # above an even share of the weights, so the plan weighs the worker in full (the limit is the
    # memory a worker says it may use), and below what any share runs in
    out, err, werr = session("100M")
    least = re.search(r"the least this model runs in at --ctx 256 is (\d+) MB", werr)
    assert least and "dropped worker 1" in err and out == alone(*prompt), werr
    out, err, werr = session(f"{int(least.group(1)) + 3}M")
    assert "sending" not in err, err  # the shard pulled in the first session
    split = re.search(r"streaming: (\d+) of 30 units pinned \(.*\), the other (\d+) read through a window of (\d+) "
                      r"slots", werr)
    assert split and int(split.group(2)) > 0 and "plan 1 over 2 nodes" in err, werr
    assert out == alone(*prompt), err
    # it told the master the memory it may use, by which the plan weighs it: its limit, not the machine's
    assert f"worker 1 joined: {os.cpu_count()} cores, {int(least.group(1)) + 3} MB free" in err, err


CLOSE_MONITORED = """
import sys, time, zmq
from edgeinfer.cluster.sockets import curve_client, curve_server
ctx, token = zmq.Context(), "loopback-test-token"

def connected(port):
    server, _, _ = curve_server(ctx, token, f"tcp://127.0.0.1:{port}")
    client, monitor = curve_client(ctx, token, f"tcp://127.0.0.1:{port}")
    client.send(b"hello")
    if not server.poll(10_000):
        sys.exit(f"no hello reached the listener on port {port}")
    server.recv_multipart()
    return server, client, monitor

server, client, monitor = connected(int(sys.argv[1]))
monitor.close()           # as a worker closes: its monitor first,
server.close(linger=0)    # the master goes away: a lost connection is an event to send,
time.sleep(0.5)
client.close(linger=0)
connected(int(sys.argv[2]))  # and the process's next sockets still connect
print("connected again")
"""


def test_closing_a_monitored_socket_leaves_the_process_able_to_connect():
    """A worker that closed its socket's monitor and then lost its master could never join the next
    one: libzmq's I/O thread blocked for good sending the lost connection to the closed monitor
    (the cause of `worker --stay`'s failures). Run apart: a blocked I/O thread blocks its process."""
    r = subprocess.run([sys.executable, "-c", CLOSE_MONITORED, str(free_port()), str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "connected again", r.stderr


@pytest.mark.real_model
def test_a_staying_worker_joins_the_next_master(smollm2_single, alone, tmp_path):
    """`worker --stay` serves one master's session after another: after the first ends it joins the
    master started next on the same address, and stops on Ctrl+C."""
    port = free_port()
    w = spawn("worker", "--join", f"127.0.0.1:{port}", "--token", TOKEN, "--cache-dir",
              str(held_model_dir(tmp_path, smollm2_single, "w")), "-t", "1", "--stay",
              env={"PYTHONFAULTHANDLER": "1"})  # SIGABRT then prints every thread's stack
    err = ""
    try:
        for session in range(2):
            master = spawn("run", str(smollm2_single), *PROMPT, "--listen", str(port), "--token", TOKEN,
                           "--workers", "1", "--wait", "120")
            code, out, err = finish(master)
            assert code == 0 and out == alone(*PROMPT), err
            assert "plan 1 over 2 nodes" in err, session
    except BaseException as e:
        w.kill()  # a staying worker outlives a failed test otherwise
        # both logs in full (an assertion's own message is cut short): this test has failed under load
        raise AssertionError(f"the master said:\n{err}\nthe worker said:\n{finish(w, 60)[2]}") from e
    w.send_signal(signal.SIGINT)
    try:
        code, _, err = finish(w, 60)
    except subprocess.TimeoutExpired:  # say where it hangs
        w.send_signal(signal.SIGABRT)
        raise AssertionError(f"the worker did not stop within 60 s of Ctrl+C:\n{finish(w, 60)[2]}") from None
    assert err.count("joined tcp://") == 2 and err.count("the master ended the session") == 2, err
    assert code != 0 and "Traceback" not in err, err
