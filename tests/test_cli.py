"""The CLI contract: text on stdout, stats on stderr; bad input -> one clear line, exit status 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import edgeinfer_cli, make_hf_model, write_gguf


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeinfer: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_run_prints_only_generated_text_on_stdout(tiny_single):
    r = edgeinfer_cli("run", str(tiny_single), "-p", "hello", "-n", "12", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert "prefill:" in r.stderr and "decode:" in r.stderr and "peak RSS:" in r.stderr
    assert "prefill" not in r.stdout and r.stdout.endswith("\n")
    again = edgeinfer_cli("run", str(tiny_single), "-p", "hello", "-n", "12", "--temp", "0")
    assert again.stdout == r.stdout  # greedy is deterministic


def test_same_seed_same_text_from_the_cli(tiny_single):
    runs = [edgeinfer_cli("run", str(tiny_single), "-p", "fox", "-n", "20", "--seed", str(s), "--temp", "1.5",
                          "--top-k", "0", "--top-p", "1", "--min-p", "0") for s in (7, 7, 8)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout != runs[2].stdout


def test_a_cpu_without_the_kernels_instructions_runs_float32_and_says_so(tiny_single):
    """An x86 CPU older than AVX2 (as Numba is told it is): one notice, the float32 path, same text."""
    old = edgeinfer_cli("run", str(tiny_single), "-p", "hello", "-n", "6", "--temp", "0",
                        env={"NUMBA_CPU_NAME": "x86-64", "NUMBA_CPU_FEATURES": "+sse2"})
    assert old.returncode == 0, old.stderr
    assert "none of the 4/8-bit kernels' instructions" in old.stderr and "float32" in old.stderr
    exact = edgeinfer_cli("run", str(tiny_single), "-p", "hello", "-n", "6", "--temp", "0", "--exact")
    assert old.stdout == exact.stdout and old.stdout


def test_interactive_chat_keeps_the_conversation(tiny_single):
    r = edgeinfer_cli("run", str(tiny_single), "-n", "5", "--temp", "0", "-v", stdin="hello\nmore\n/exit\n")
    assert r.returncode == 0, r.stderr
    prompts = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("prompt:")]
    assert len(prompts) == 2 and prompts[1] > prompts[0] + 5  # the second turn carries the first


def test_info_and_convert(tiny_gguf, tmp_path):
    r = edgeinfer_cli("info", str(tiny_gguf))
    assert r.returncode == 0, r.stderr
    assert "architecture: llama" in r.stdout and "parameters:" in r.stdout and "tensor types: F32" in r.stdout
    assert "family: activation: silu\n" in r.stdout  # no family options beyond the Llama case
    out = tmp_path / "c.safetensors"
    r = edgeinfer_cli("convert", str(tiny_gguf), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists() and not list(tmp_path.glob("*.tmp-*"))
    a = edgeinfer_cli("run", str(tiny_gguf), "-p", "x", "-n", "10", "--temp", "0")
    b = edgeinfer_cli("run", str(out), "-p", "x", "-n", "10", "--temp", "0")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


# --- bad input -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    assert_one_line_error(edgeinfer_cli("run", str(tmp_path / "nope.gguf"), "-p", "x"), "not found")


def test_unknown_catalog_name():
    assert_one_line_error(edgeinfer_cli("run", "no-such-model", "-p", "x"), "unknown model", "smollm2-135m")


def test_not_a_model_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("just some text, not weights\n" * 10)
    assert_one_line_error(edgeinfer_cli("run", str(p), "-p", "x"), "not a model file")


def test_folder_without_config(tmp_path):
    assert_one_line_error(edgeinfer_cli("info", str(tmp_path)), "no config.json")


def test_plain_safetensors_without_metadata(tmp_path, tiny_hf):
    shards = list(tiny_hf.glob("*.safetensors"))
    assert_one_line_error(edgeinfer_cli("run", str(shards[0]), "-p", "x"), "no config or tokenizer")


@pytest.mark.parametrize("cut", [20, 1000, -100])
def test_truncated_single_file(tmp_path, tiny_single, cut):
    data = tiny_single.read_bytes()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[:cut] if cut > 0 else data[:cut])
    assert_one_line_error(edgeinfer_cli("run", str(p), "-p", "x"), "truncated")


@pytest.mark.parametrize("at,expected", [(8, "not valid JSON"), (10, "corrupt header")])
def test_corrupt_single_file_header(tmp_path, tiny_single, at, expected):
    data = bytearray(tiny_single.read_bytes())
    data[at:at + 10] = b"#" * 10  # at 8: the opening brace; at 10: inside the first key
    p = tmp_path / "bad.safetensors"
    p.write_bytes(bytes(data))
    assert_one_line_error(edgeinfer_cli("run", str(p), "-p", "x"), expected)


@pytest.mark.parametrize("keep", [4, 200, 0.6])
def test_truncated_gguf(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)])
    assert_one_line_error(edgeinfer_cli("run", str(p), "-p", "x"), str(p))


def copy_with(tiny_hf, dest, json_file: str, **changes):
    """A copy of the tiny HF folder with some keys of one of its JSON files changed."""
    folder = dest / f"m{len(list(dest.iterdir()))}"
    shutil.copytree(tiny_hf, folder)
    cfg = json.loads((folder / json_file).read_text())
    (folder / json_file).write_text(json.dumps({**cfg, **changes}))
    return folder


def test_unsupported_architecture_hf(tmp_path, tiny_hf):
    folder = copy_with(tiny_hf, tmp_path, "config.json", model_type="gpt_neox")
    assert_one_line_error(edgeinfer_cli("run", str(folder), "-p", "x"), "unsupported architecture", "gpt_neox")


def test_unsupported_architecture_gguf(tmp_path, tiny_hf, tokenizer_json):
    p = write_gguf(tmp_path / "phi.gguf", tiny_hf, tokenizer_json, arch="phi2")
    assert_one_line_error(edgeinfer_cli("run", str(p), "-p", "x"), "unsupported GGUF architecture", "phi2")


def test_unsupported_tensor_type(tmp_path, tiny_hf, tokenizer_json):
    ints = np.zeros((64,), dtype=np.int32)
    p = write_gguf(tmp_path / "int.gguf", tiny_hf, tokenizer_json, raw={"blk.0.attn_norm.weight": (ints, "I32")})
    assert_one_line_error(edgeinfer_cli("run", str(p), "-p", "x"), "unsupported type", "I32", "Q4_K", "Q6_K", "IQ4_XS")


def test_tokenizer_larger_than_embedding(tmp_path, tokenizer_json):
    vocab = len(json.loads(tokenizer_json)["model"]["vocab"])
    folder = make_hf_model(tmp_path / "small_vocab", tokenizer_json, vocab_size=vocab - 50)
    assert_one_line_error(edgeinfer_cli("run", str(folder), "-p", "x"), "tokenizer has", "embedding")


def test_template_that_fails_to_render(tmp_path, tiny_hf):
    raising = copy_with(tiny_hf, tmp_path, "tokenizer_config.json",
                        chat_template="{{ raise_exception('only system messages, please') }}")
    assert_one_line_error(edgeinfer_cli("run", str(raising), "-p", "x"), "chat template", "only system messages")
    broken = copy_with(tiny_hf, tmp_path, "tokenizer_config.json",
                       chat_template="{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}")
    assert_one_line_error(edgeinfer_cli("run", str(broken), "-p", "x"), "chat template")


def test_prompt_longer_than_context(tiny_single):
    r = edgeinfer_cli("run", str(tiny_single), "-p", "word " * 300, "--ctx", "64")
    assert_one_line_error(r, "context", "64")


def test_conversion_failure_leaves_no_output(tmp_path, tiny_hf):
    folder = tmp_path / "m"
    shutil.copytree(tiny_hf, folder)
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-64])  # truncated weights
    out = tmp_path / "out.safetensors"
    assert_one_line_error(edgeinfer_cli("convert", str(folder), "-o", str(out)), "truncated")
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))


def test_empty_raw_prompt(tiny_single):
    assert_one_line_error(edgeinfer_cli("run", str(tiny_single), "-p", "", "--raw"), "prompt is empty")


def test_bench_rows_as_llama_bench(tiny_gguf):
    import json as json_module

    r = edgeinfer_cli("bench", str(tiny_gguf), "-p", "16", "-n", "8", "-r", "2", "-t", "1,2", "-d", "4", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = json_module.loads(r.stdout)
    assert [(row["test"], row["threads"]) for row in rows] == [("pp16", 1), ("tg8", 1), ("pp16", 2), ("tg8", 2)]
    assert all(row["depth"] == 4 and row["tok_s"] > 0 and row["tok_s_std"] >= 0 for row in rows)
    md = edgeinfer_cli("bench", str(tiny_gguf), "-p", "0", "-n", "4", "-r", "1")
    assert md.returncode == 0 and "| tg4 |" in md.stdout and "pp" not in md.stdout.split("\n", 2)[2]
    assert_one_line_error(edgeinfer_cli("bench", str(tiny_gguf), "-t", "0"), "at least 1")
    assert_one_line_error(edgeinfer_cli("bench", str(tiny_gguf), "-t", "two"), "separated by commas")


def test_cache_types(tiny_single):
    """--cache-type: an unknown type gets one line naming the ones there are; q8_0 needs heads of a
    multiple of 32 (the tiny model's are 16) and says so; a cluster's master (which passes the type
    to its workers) checks it before it listens."""
    assert_one_line_error(edgeinfer_cli("run", str(tiny_single), "-p", "x", "--cache-type", "q4_0"),
                          "q4_0", "f16", "q8_0", "f32")
    assert_one_line_error(edgeinfer_cli("run", str(tiny_single), "-p", "x", "--cache-type", "q8_0"),
                          "q8_0", "multiple of 32", "16")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_one_line_error(edgeinfer_cli("run", str(tiny_single), "-p", "x", "--cache-type", "q4_0",
                                        "--listen", f"127.0.0.1:{port}", "--token", "a-test-token"),
                          "q4_0", "f16", "q8_0", "f32")


def test_an_unknown_pre_tokenizer_is_said(tmp_path, tiny_hf, tokenizer_json):
    """A GGUF whose pre-tokenizer name edgeinfer does not know runs, split as GPT-2 splits text, and
    `run`, `info` and `convert` say so in one line (its tokens may differ from llama.cpp's); a known one says nothing."""
    unknown = write_gguf(tmp_path / "unknown.gguf", tiny_hf, tokenizer_json, pre="brand-new-pre")
    r = edgeinfer_cli("run", str(unknown), "-p", "hello", "-n", "2", "--temp", "0")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "pre-tokenizer" in line]
    assert len(said) == 1 and "'brand-new-pre'" in said[0] and "GPT-2" in said[0], r.stderr
    info = edgeinfer_cli("info", str(unknown))
    assert info.returncode == 0 and "'brand-new-pre' is not one edgeinfer knows" in info.stdout, info.stdout
    converted = edgeinfer_cli("convert", str(unknown), "-o", str(tmp_path / "unknown.safetensors"))
    assert converted.returncode == 0 and "'brand-new-pre' is not one edgeinfer knows" in converted.stderr, converted.stderr
    known = write_gguf(tmp_path / "known.gguf", tiny_hf, tokenizer_json, pre="gpt-2")
    r = edgeinfer_cli("run", str(known), "-p", "hello", "-n", "2", "--temp", "0")
    assert r.returncode == 0 and "pre-tokenizer" not in r.stderr, r.stderr
