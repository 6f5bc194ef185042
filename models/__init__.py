"""The catalog of known models (catalog.toml): where each comes from and how to check it."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files


@dataclass(frozen=True)
class Part:
    package: str  # a PyPI distribution
    version: str
    member: str  # the file's path inside the wheel


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    file: str  # the assembled GGUF's file name
    sha256: str
    parts: tuple[Part, ...]
    runs: bool  # False: kept for its tokenizer, the architecture is not supported yet
    default: bool = False


@lru_cache(maxsize=1)
def catalog() -> dict[str, CatalogEntry]:
    data = tomllib.loads(files(__name__).joinpath("catalog.toml").read_text(encoding="utf-8"))
    return {name: CatalogEntry(name=name, description=e["description"], file=e["file"], sha256=e["sha256"],
                               parts=tuple(Part(**p) for p in e["parts"]), runs=e["runs"],
                               default=e.get("default", False))
            for name, e in data.items()}


def default_model() -> str:
    return next(name for name, e in catalog().items() if e.default)
