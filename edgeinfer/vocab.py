"""Rebuild a tokenizer from a GGUF vocabulary (`tokenizer.ggml.*`) as a TokenizerSpec.

`gpt2` vocabularies become byte-level BPE for HF `tokenizers`; `llama` vocabularies become a
sentencepiece ModelProto, serialised here by hand (the format is five small protobuf messages).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

from .errors import TokenizerError
from .tokenizer import TokenizerSpec

# GGUF token types use sentencepiece's numbering.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens llama.cpp treats as end of generation when the file marks them as control tokens.
END_OF_GENERATION = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>",
                     "</s>", "<|end_of_text|>"}

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k (GPT-4o's; Phi-4-mini's): an uppercase run then a lowercase one is a word, so "HelloWorld"
# splits in two; a contraction stays on its word; a punctuation run takes a "/" after a newline too.
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_SUFFIX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_SUFFIX}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_SUFFIX}"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer names -> the split regex their merges were learned with.
SPLIT_REGEX = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
               "gpt-4o": _GPT4O_SPLIT, "minimax-m2": _GPT4O_SPLIT}
# Pre-tokenizers that split every digit apart before the GPT-2 regex.
DIGIT_SPLIT = {"smollm", "starcoder", "refact", "codeshell", "command-r"}
# Pre-tokenizers that split as GPT-2 does (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2 names, MPT's, OLMo's).
GPT2_SPLIT = {"default", "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v1-en", "jina-v2-es",
              "jina-v2-de", "jina-v2-code", "roberta-bpe", "a.x-4.0", "mellum", "mpt", "olmo"}


@dataclass(frozen=True)
class GGUFVocab:
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: Sequence[str]
    token_types: Sequence[int]
    scores: Sequence[float] | None
    merges: Sequence[str] | None
    bos_id: int | None
    eos_id: int | None
    extra_eos_ids: Sequence[int]  # eot/eom ids
    unk_id: int | None
    pad_id: int | None
    add_bos: bool | None
    add_space_prefix: bool | None
    chat_template: str | None


def spec_from_gguf_vocab(v: GGUFVocab) -> TokenizerSpec:
    if not v.tokens:
        raise TokenizerError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = list(v.token_types) if v.token_types else [NORMAL] * len(v.tokens)
    note = None
    built = None
    if v.model == "gpt2":
        built = _byte_level_bpe(v, types)
        data, kind, add_bos = built.to_str().encode(), "hf", bool(v.add_bos)
        if v.pre not in SPLIT_REGEX and v.pre not in DIGIT_SPLIT and v.pre not in GPT2_SPLIT:
            note = (f"tokenizer: the file's pre-tokenizer {v.pre!r} is not one edgeinfer knows; it splits text "
                    "as GPT-2 does, so its tokens may differ from llama.cpp's")
    elif v.model == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        data, kind, add_bos = _sentencepiece_proto(v, types), "spm", v.add_bos is not False
    else:
        raise TokenizerError(f"unsupported GGUF tokenizer model {v.model!r} (supported: gpt2, llama)")
    eos = [t for t in (v.eos_id, *v.extra_eos_ids) if t is not None]
    eos += [i for i, (tok, ty) in enumerate(zip(v.tokens, types)) if ty == CONTROL and tok in END_OF_GENERATION]
    names = {"bos_token": v.bos_id, "eos_token": v.eos_id, "unk_token": v.unk_id, "pad_token": v.pad_id}
    template_vars = {k: v.tokens[i] for k, i in names.items() if i is not None and 0 <= i < len(v.tokens)}
    return TokenizerSpec(kind=kind, data=data, bos_id=v.bos_id, eos_ids=tuple(dict.fromkeys(eos)),
                         add_bos=add_bos, chat_template=v.chat_template, template_vars=template_vars, note=note,
                         built=built)


def _byte_level_bpe(v: GGUFVocab, types: list[int]):
    """The `tokenizers` BPE a gpt2 vocabulary describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if v.merges is None:
        raise TokenizerError("GGUF gpt2 tokenizer has no merges (tokenizer.ggml.merges)")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(v.tokens):
        vocab.setdefault(tok, i)
    merges = []
    for m in v.merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise TokenizerError(f"GGUF merge {m!r} is not two tokens separated by a space")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=v.pre in SPLIT_REGEX))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if v.pre in SPLIT_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEX[v.pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif v.pre in DIGIT_SPLIT:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(v.tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(v.tokens, types) if ty == USER_DEFINED])
    return tok


def _sentencepiece_proto(v: GGUFVocab, types: list[int]) -> bytes:
    """A BPE sentencepiece ModelProto with the file's pieces, scores and types."""
    scores = list(v.scores) if v.scores else [0.0] * len(v.tokens)
    unk = v.unk_id if v.unk_id is not None else 0
    pieces = bytearray()
    for i, (tok, score, ty) in enumerate(zip(v.tokens, scores, types)):
        # Sentencepiece spells spaces as U+2581; some files store whitespace-only pieces with real spaces.
        ty = UNKNOWN if i == unk else (CONTROL if ty == UNKNOWN else ty)
        piece = _pb_bytes(1, tok.replace(" ", "\u2581").encode()) + _pb_float(2, score) + _pb_varint(3, ty)
        pieces += _pb_bytes(1, piece)
    trainer = (_pb_varint(3, 2)  # model_type = BPE
               + _pb_varint(4, len(v.tokens))
               + _pb_varint(35, int(BYTE in types))  # byte_fallback
               + _pb_varint(40, unk) + _pb_varint(41, _or_minus_one(v.bos_id))
               + _pb_varint(42, _or_minus_one(v.eos_id)) + _pb_varint(43, _or_minus_one(v.pad_id)))
    normalizer = (_pb_bytes(1, b"identity") + _pb_varint(3, int(v.add_space_prefix is not False))
                  + _pb_varint(4, 0) + _pb_varint(5, 1))
    return bytes(pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer))


def _or_minus_one(x: int | None) -> int:
    return -1 if x is None else x


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 fields are sent as 10-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_varint(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _pb_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _pb_bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value
