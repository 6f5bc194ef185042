"""edgeinfer's own directory: EDGEINFER_HOME, by default ~/.cache/edgeinfer."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("EDGEINFER_HOME") or Path.home() / ".cache" / "edgeinfer")
