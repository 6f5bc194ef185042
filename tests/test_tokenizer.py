"""Tokenizers: both backends, GGUF vocabularies rebuilt, streaming decode, chat templates."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import varied_lines
from edgeinfer.errors import ChatTemplateError
from edgeinfer.storage import open_model
from edgeinfer.tokenizer import Tokenizer, TokenizerSpec
from edgeinfer.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, GGUFVocab, spec_from_gguf_vocab


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> bytes:
    """A BPE sentencepiece model trained here, with byte fallback, control and user-defined pieces."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(varied_lines(4000, seed=2)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "m"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, control_symbols=["<start_of_turn>", "<end_of_turn>"],
                                   user_defined_symbols=["<tool>"], character_coverage=1.0, minloglevel=2)
    return (folder / "m.model").read_bytes()


def _vocab_of(sp_bytes: bytes, add_space_prefix: bool = True) -> GGUFVocab:
    """What llama.cpp's converter stores for a sentencepiece model: pieces, scores, token types."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    types = []
    for i in range(sp.GetPieceSize()):
        types.append(UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else BYTE if sp.IsByte(i)
                     else USER_DEFINED if sp.IdToPiece(i) == "<tool>" else NORMAL)
    return GGUFVocab(model="llama", pre="default", tokens=[sp.IdToPiece(i) for i in range(sp.GetPieceSize())],
                     token_types=types, scores=[sp.GetScore(i) for i in range(sp.GetPieceSize())], merges=None,
                     bos_id=sp.bos_id(), eos_id=sp.eos_id(), extra_eos_ids=[], unk_id=sp.unk_id(), pad_id=None,
                     add_bos=True, add_space_prefix=add_space_prefix, chat_template=None)


def test_sentencepiece_rebuilt_from_gguf_vocab_matches_the_original(sp_model):
    import sentencepiece as spm

    original = spm.SentencePieceProcessor(model_proto=sp_model)
    tok = Tokenizer(spec_from_gguf_vocab(_vocab_of(sp_model)))
    assert tok.vocab_size == original.GetPieceSize()
    for line in varied_lines(1500, seed=3):
        ids = tok.encode(line, add_bos=False)
        assert ids == original.EncodeAsIds(line), line
        assert tok.decode(ids) == original.DecodeIds(ids)
    assert tok.encode("hi")[0] == original.bos_id()  # llama.cpp adds BOS for sentencepiece vocabularies


def test_sentencepiece_control_tokens_stay_whole(sp_model):
    import sentencepiece as spm

    original = spm.SentencePieceProcessor(model_proto=sp_model)
    tok = Tokenizer(spec_from_gguf_vocab(_vocab_of(sp_model)))
    ids = tok.encode("<start_of_turn>user\nhello<end_of_turn>", add_bos=False)
    start, end = original.PieceToId("<start_of_turn>"), original.PieceToId("<end_of_turn>")
    assert ids[0] == start and ids[-1] == end
    assert ids[1:-1] == original.EncodeAsIds("user\nhello")
    assert tok.decode(ids, skip_special=False) == "<start_of_turn>user\nhello<end_of_turn>"
    assert tok.decode(ids) == "user\nhello"


def test_hf_tokenizer_spec_survives_metadata(tiny_hf):
    """The single file stores a BPE's merges as "left right" lines (quicker to build, less memory):
    the same tokenizer, every other field as it was."""
    spec = open_model(str(tiny_hf)).tokenizer
    back = TokenizerSpec.from_metadata(spec.to_metadata())
    assert replace(back, data=spec.data) == spec
    merges = json.loads(back.data)["model"]["merges"]
    assert merges == [" ".join(pair) for pair in json.loads(spec.data)["model"]["merges"]] and len(merges) > 100
    ours, theirs = Tokenizer(back), Tokenizer(spec)
    text = "\n".join(varied_lines(300, seed=5)) + "<|im_start|>user\nhi 12 345 ÄÖÜ 中文<|im_end|>"
    ids = theirs.encode(text)
    assert ours.encode(text) == ids
    assert ours.decode(ids, skip_special=False) == theirs.decode(ids, skip_special=False) == text
    assert ours.vocab_size == theirs.vocab_size


def test_merges_with_a_space_keep_their_pairs():
    """A BPE whose tokens hold spaces (no byte-level pre-tokenizer): "left right" lines would be
    ambiguous, so its tokenizer.json is stored as it came."""
    from tokenizers import Tokenizer as HFTokenizer, models

    vocab = {"a": 0, "b": 1, " ": 2, "a ": 3, "a b": 4}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", " "), ("a ", "b")]))
    spec = TokenizerSpec(kind="hf", data=tok.to_str().encode(), bos_id=None, eos_ids=(), add_bos=False)
    back = TokenizerSpec.from_metadata(spec.to_metadata())
    assert back == spec and Tokenizer(back).encode("a b") == [4]


def test_spm_spec_survives_metadata(sp_model):
    spec = spec_from_gguf_vocab(_vocab_of(sp_model))
    back = TokenizerSpec.from_metadata(spec.to_metadata())
    assert back == spec
    assert Tokenizer(back).encode("round trip") == Tokenizer(spec).encode("round trip")


@pytest.mark.parametrize("backend", ["hf", "spm"])
def test_streaming_decode_equals_whole_decode(backend, tiny_hf, sp_model):
    spec = open_model(str(tiny_hf)).tokenizer if backend == "hf" else spec_from_gguf_vocab(_vocab_of(sp_model))
    tok = Tokenizer(spec)
    for line in varied_lines(200, seed=4) + ["🙂🚀 東京 naïve", "a\n\n  b"]:
        ids = tok.encode(line, add_bos=False)
        stream = tok.stream()
        pieces = [stream.feed(t) for t in ids]
        assert "".join(pieces) == tok.decode(ids), line
        assert all("\ufffd" not in p for p in pieces)


@pytest.mark.oracle
def test_chat_template_matches_transformers(tiny_hf):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_hf))
    tok = Tokenizer(open_model(str(tiny_hf)).tokenizer)
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  spaces\n\nand lines  "}]
    for n in range(1, len(convo) + 1):
        for gen in (True, False):
            text = tok.apply_chat_template(convo[:n], add_generation_prompt=gen)
            assert text == ref.apply_chat_template(convo[:n], tokenize=False, add_generation_prompt=gen)
            ref_ids = ref.apply_chat_template(convo[:n], tokenize=True, add_generation_prompt=gen)
            ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
            assert tok.encode(text, add_bos=False) == list(ref_ids)


def test_template_sandbox_refuses_escapes():
    from edgeinfer.chat_template import render_chat_template

    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [], True, {})
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", [], True, {})
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat_template("", [], True, {})
    assert render_chat_template("{{ messages | tojson }}", [{"a": "é"}], True, {}) == '[{"a": "é"}]'


@pytest.mark.parametrize("pre", ["llama3", "qwen2", "gpt-4o"])
def test_gguf_pre_tokenizers_split_as_their_regex(pre):
    """A byte-level vocabulary named by its GGUF pre-tokenizer splits text into the pieces its regex
    gives under the `regex` module, a second engine (HF tokenizers runs Oniguruma): over varied text,
    and on the cases where GPT-4o's split (Phi-4-mini's) differs from Llama 3's."""
    import regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    from edgeinfer.vocab import SPLIT_REGEX

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = GGUFVocab(model="gpt2", pre=pre, tokens=alphabet, token_types=[NORMAL] * len(alphabet), scores=None,
                      merges=[], bos_id=None, eos_id=None, extra_eos_ids=[], unk_id=None, pad_id=None,
                      add_bos=False, add_space_prefix=None, chat_template=None)
    hf = HFTokenizer.from_str(spec_from_gguf_vocab(vocab).data.decode())
    def pieces(text: str) -> list[str]:
        return [hf.decoder.decode([p]) for p, _ in hf.pre_tokenizer.pre_tokenize_str(text)]

    special = ["HelloWorld's CAPS 12345 a/\n/b", "I'M don'T x\r\n\r\ny", "naïveCafé ÉCOLE ΑθήναΚ"]
    for text in special + varied_lines(400, seed=7):
        assert pieces(text) == regex.findall(SPLIT_REGEX[pre], text), text
    expected = {"gpt-4o": ["Hello", "World's", " CAPS", " ", "123", "45", " a", "/\n/", "b"],
                "llama3": ["HelloWorld", "'s", " CAPS", " ", "123", "45", " a", "/\n", "/b"]}
    if pre in expected:
        assert pieces(special[0]) == expected[pre]
