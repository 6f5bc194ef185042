"""Hugging Face folder importer: config.json, *.safetensors (sharded too), tokenizer files."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError, TokenizerError
from ..tokenizer import TokenizerSpec
from .safetensors import SafetensorsFile
from .source import SafetensorsSource
from .tensor_names import split_fused

INDEX = "model.safetensors.index.json"


def open_hf_folder(folder: str) -> SafetensorsSource:
    config = ModelConfig.from_hf(_read_json(folder, "config.json"))
    files = [SafetensorsFile(os.path.join(folder, name)) for name in _shard_names(folder)]
    source_type = {"gemma3": ShiftedNormsSource, "phi3": SplitFusedSource}.get(config.architecture, SafetensorsSource)
    return source_type(folder, "hf", files, config, _tokenizer_spec(folder))


class ShiftedNormsSource(SafetensorsSource):
    """Gemma's RMSNorm multiplies by (1 + w): its norm weights are read with the 1 added, so the
    forward pass has one RMSNorm (llama.cpp's GGUF files store them so already)."""

    def float32(self, name: str):
        w = super().float32(name)
        return w + np.float32(1) if name.endswith("norm.weight") else w

    def storable_type(self, name: str) -> str:
        return "F32" if name.endswith("norm.weight") else super().storable_type(name)

    def storable(self, name: str):
        return self.float32(name) if name.endswith("norm.weight") else super().storable(name)


class SplitFusedSource(SafetensorsSource):
    """Phi-3 stores q/k/v and gate/up as one matrix each (tensor_names.FUSED): they are read as
    their parts, rows of it, so the forward pass sees the projections every family has."""

    def __init__(self, *args):
        super().__init__(*args)
        self._parts: dict[str, tuple[str, int, int]] = {}  # part -> (fused tensor, first row, end row)
        for name in super().names():
            for part, r0, r1 in split_fused(name, self.config):
                self._parts[part] = (name, r0, r1)
        self._fused = {fused for fused, _, _ in self._parts.values()}

    def names(self) -> list[str]:
        return [n for n in super().names() if n not in self._fused] + list(self._parts)

    def has(self, name: str) -> bool:
        return name in self._parts or super().has(name)

    def stored_type(self, name: str) -> str:
        return super().stored_type(self._parts[name][0] if name in self._parts else name)

    def stored_shape(self, name: str) -> tuple[int, ...]:
        if name not in self._parts:
            return super().stored_shape(name)
        fused, r0, r1 = self._parts[name]
        return (r1 - r0, *super().stored_shape(fused)[1:])

    def float32(self, name: str):
        if name not in self._parts:
            return super().float32(name)
        fused, r0, r1 = self._parts[name]
        return np.ascontiguousarray(super().float32(fused)[r0:r1])

    def storable(self, name: str):
        if name not in self._parts:
            return super().storable(name)
        fused, r0, r1 = self._parts[name]
        return np.ascontiguousarray(super().storable(fused)[r0:r1])



def _read_json(folder: str, name: str, required: bool = True) -> dict[str, Any]:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        if required:
            raise ModelFormatError(f"{folder}: not a Hugging Face model folder (no {name})")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def _shard_names(folder: str) -> list[str]:
    if os.path.exists(os.path.join(folder, INDEX)):
        weight_map = _read_json(folder, INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{folder}/{INDEX}: no weight_map")
        return sorted(set(weight_map.values()))
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not shards:
        raise ModelFormatError(f"{folder}: no *.safetensors weights")
    return shards


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_spec(folder: str) -> TokenizerSpec:
    cfg = _read_json(folder, "tokenizer_config.json", required=False)
    gen = _read_json(folder, "generation_config.json", required=False)
    template = cfg.get("chat_template")
    template_file = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(template_file):
        with open(template_file, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    template_vars = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                     if (t := _token_text(cfg.get(k))) is not None}

    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if os.path.exists(tokenizer_json):
        from tokenizers import Tokenizer as HFTokenizer

        with open(tokenizer_json, "rb") as f:
            data = f.read()
        kind = "hf"
        try:
            backend = HFTokenizer.from_str(data.decode())
        except Exception as exc:
            raise TokenizerError(f"{tokenizer_json}: cannot be loaded ({exc})") from None
        token_id = backend.token_to_id
        # tokenizer.json's post-processor says whether BOS is added, unless the config says so.
        bos = token_id(template_vars["bos_token"]) if "bos_token" in template_vars else None
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            add_bos = bos is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos]
    elif os.path.exists(os.path.join(folder, "tokenizer.model")):
        import sentencepiece

        with open(os.path.join(folder, "tokenizer.model"), "rb") as f:
            data = f.read()
        kind = "spm"
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"{folder}/tokenizer.model: cannot be loaded ({exc})") from None
        token_id = lambda t: (i if (i := sp.PieceToId(t)) != sp.unk_id() or t == sp.IdToPiece(i) else None)  # noqa
        bos = token_id(template_vars["bos_token"]) if "bos_token" in template_vars else (
            sp.bos_id() if sp.bos_id() >= 0 else None)
        add_bos = cfg.get("add_bos_token", True)
    else:
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")

    eos = gen.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if "eos_token" in template_vars and (tid := token_id(template_vars["eos_token"])) is not None:
        eos_ids.append(tid)
    return TokenizerSpec(kind=kind, data=data, bos_id=bos, eos_ids=tuple(dict.fromkeys(eos_ids)),
                         add_bos=bool(add_bos), chat_template=template, template_vars=template_vars)
