"""One Tokenizer interface over two backends: HF `tokenizers` (tokenizer.json) and sentencepiece."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .chat_template import render_chat_template
from .errors import TokenizerError


# A family's chat format, for files that carry no template (llama.cpp falls back the same way).
# Gemma: turns of user and model; a system message goes before the first user turn's text.
FAMILY_TEMPLATES = {
    "gemma3": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = m['content'] | trim + '\n\n' %}"
        "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{{ (ns.system if m['role'] == 'user' else '') + m['content'] | trim }}<end_of_turn>\n"
        "{% if m['role'] == 'user' %}{% set ns.system = '' %}{% endif %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
}


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild a tokenizer; travels inside edgeinfer's single-file models."""

    kind: str  # "hf": tokenizer.json text; "spm": a sentencepiece ModelProto
    data: bytes
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None = None
    # Special-token strings a chat template may refer to (bos_token, eos_token, ...).
    template_vars: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # what a user should hear about how it was rebuilt (not stored)
    # The "hf" tokenizer `data` was written from, when one was built to write it (a GGUF vocabulary):
    # Tokenizer takes it instead of parsing `data` again (75-100 ms; not stored).
    built: object | None = field(default=None, compare=False, repr=False)

    @property
    def held_bytes(self) -> int:
        """What the built tokenizer holds, for a memory plan made before it is built: 12 times its
        serialized bytes (the held RSS across building it, measured: SmolLM2's BPE, 1.5 MB, 13.5-18.2
        MB; Gemma 3's sentencepiece, 5.0 MB, 48.6-48.8 MB)."""
        return 12 * len(self.data)

    def to_metadata(self) -> dict[str, str]:
        payload = _merges_as_lines(self.data.decode()) if self.kind == "hf" else base64.b64encode(self.data).decode()
        info = {"kind": self.kind, "bos_id": self.bos_id, "eos_ids": list(self.eos_ids),
                "add_bos": self.add_bos, "template_vars": self.template_vars}
        meta = {"tokenizer": json.dumps(info), "tokenizer.data": payload}
        if self.chat_template:
            meta["chat_template"] = self.chat_template
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "TokenizerSpec":
        try:
            info = json.loads(meta["tokenizer"])
            payload = meta["tokenizer.data"]
            data = payload.encode() if info["kind"] == "hf" else base64.b64decode(payload)
            return cls(kind=info["kind"], data=data, bos_id=info["bos_id"], eos_ids=tuple(info["eos_ids"]),
                       add_bos=bool(info["add_bos"]), chat_template=meta.get("chat_template"),
                       template_vars=dict(info.get("template_vars", {})))
        except (KeyError, ValueError, TypeError) as exc:
            raise TokenizerError(f"tokenizer in file metadata is missing or invalid ({exc})") from None


def _merges_as_lines(text: str) -> str:
    """tokenizer.json with a BPE's merges as "left right" lines, the older of the two forms `tokenizers`
    reads, where that is lossless (no token holds a space; else the pairs are kept). The same tokenizer;
    building it holds 44 -> 25 MB at its peak and 19 -> 15 MB after, and takes 91-97 -> 75-81 ms
    (SmolLM2's, measured), which a single file's every start pays."""
    spec = json.loads(text)
    merges = (spec.get("model") or {}).get("merges")
    if not merges or not all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        return text
    spec["model"]["merges"] = [f"{left} {right}" for left, right in merges]
    return json.dumps(spec, ensure_ascii=False)


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        if spec.kind == "hf":
            self._backend: _Backend = _HFBackend(spec.data, spec.built)
        elif spec.kind == "spm":
            self._backend = _SPMBackend(spec.data)
        else:
            raise TokenizerError(f"unknown tokenizer kind {spec.kind!r}")
        self.vocab_size = self._backend.vocab_size
        for tid in (spec.bos_id, *spec.eos_ids):
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise TokenizerError(f"special token id {tid} is outside the vocabulary ({self.vocab_size})")

    @property
    def bos_id(self) -> int | None:
        return self.spec.bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.spec.eos_ids

    @property
    def chat_template(self) -> str | None:
        return self.spec.chat_template

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) stay whole."""
        ids = self._backend.encode(text)
        if (self.spec.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special)

    def id_to_token(self, tid: int) -> str:
        return self._backend.id_to_token(tid)

    def pieces(self) -> tuple[list[bytes], list[int]] | None:
        """Each id's bytes and the control tokens' ids, for a sentencepiece vocabulary (what a grammar
        library needs to read tokens as text); None for a tokenizer.json, which such libraries read."""
        return self._backend.pieces() if isinstance(self._backend, _SPMBackend) else None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.chat_template or "", messages, add_generation_prompt,
                                    self.spec.template_vars)

    def stream(self) -> "TextStream":
        return TextStream(self)


class TextStream:
    """Incremental detokenizer: feed ids one by one, get the text they add once it is complete UTF-8.

    Decodes a short window (from a few tokens back) rather than the whole sequence, so each step is
    O(1); the window start keeps tokenizers' context-dependent spacing right.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids already turned into text

    def feed(self, tid: int) -> str:
        self._ids.append(tid)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        full_text = self._tok.decode(self._ids[self._prefix:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete multi-byte character, or a token that prints nothing yet
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character comes out as U+FFFD, as decode gives it)."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        rest = self._tok.decode(self._ids[self._prefix:])[len(prefix_text):]
        self._prefix = self._read = len(self._ids)
        return rest


class _Backend:
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special: bool) -> str: ...
    def id_to_token(self, tid: int) -> str: ...


class _HFBackend(_Backend):
    def __init__(self, data: bytes, built=None):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = built if built is not None else HFTokenizer.from_str(data.decode())
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"tokenizer.json cannot be loaded: {exc}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, tid: int) -> str:
        return self._tok.id_to_token(tid) or ""


class _SPMBackend(_Backend):
    """Sentencepiece, plus whole-match of control tokens (sentencepiece itself treats them as text)."""

    def __init__(self, model_proto: bytes):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"sentencepiece model cannot be loaded: {exc}") from None
        self.vocab_size = self._sp.GetPieceSize()
        self._control = {self._sp.IdToPiece(i): i for i in range(self.vocab_size) if self._sp.IsControl(i)}
        pieces = sorted((p for p in self._control if p), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return list(self._sp.EncodeAsIds(text))
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._control[part])
            elif part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self._sp.DecodeIds(ids)
        out, run = [], []
        for tid in ids:
            if self._sp.IsControl(tid):
                out.append(self._sp.DecodeIds(run) + self._sp.IdToPiece(tid))
                run = []
            else:
                run.append(tid)
        return "".join(out) + self._sp.DecodeIds(run)

    def id_to_token(self, tid: int) -> str:
        return self._sp.IdToPiece(tid)

    def pieces(self) -> tuple[list[bytes], list[int]]:
        byte = re.compile(r"<0x([0-9A-Fa-f]{2})>")
        out = []
        for i in range(self.vocab_size):
            piece = self._sp.IdToPiece(i)
            m = byte.fullmatch(piece) if self._sp.IsByte(i) else None
            out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode())
        return out, sorted(self._control.values())
