"""Reads that bypass the page cache (O_DIRECT), so that resident memory is what edgeinfer decides,
not what the kernel happens to cache: page-aligned buffers, offsets and sizes make them possible."""

from __future__ import annotations

import os

import numpy as np

from .safetensors import PAGE


def open_direct(path: str) -> tuple[int, bool]:
    """The file opened for O_DIRECT reads, or for plain reads where the filesystem refuses it
    (tmpfs); and which of the two."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except (OSError, AttributeError):
        return os.open(path, os.O_RDONLY), False


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned buffer of nbytes (O_DIRECT-friendly, and whole pages for the reads)."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    skip = -raw.ctypes.data % PAGE
    return raw[skip:skip + nbytes]
