"""Storage: read model files (GGUF, HF folders, edgeinfer's single file) into a WeightSource."""

from __future__ import annotations

import os

from ..errors import ModelFormatError, ModelNotFoundError
from .source import WeightSource

NOT_A_MODEL = "not a model file (expected a .gguf, an edgeinfer .safetensors or a Hugging Face folder)"


def open_model(path: str) -> WeightSource:
    """Open any supported model input by looking at what it is, not at its name."""
    from .gguf import GGUFSource
    from .hf import open_hf_folder
    from .safetensors import SafetensorsFile
    from .single import is_single_file, open_single_file

    if not os.path.exists(path):
        raise ModelNotFoundError(f"model not found: {path}")
    if os.path.isdir(path):
        return open_hf_folder(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        return GGUFSource(path)
    if head[8:9] == b"{" or path.endswith(".safetensors"):  # the reader says what is wrong with it
        st = SafetensorsFile(path)
        if is_single_file(st):
            return open_single_file(st)
        st.close()
        raise ModelFormatError(f"{path}: a plain safetensors file has no config or tokenizer; "
                               "give its Hugging Face folder, or `edgeinfer convert` the folder")
    raise ModelFormatError(f"{path}: {NOT_A_MODEL}")
