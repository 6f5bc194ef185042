"""edgeinfer's own directory: EDGEINFER_HOME, by default ~/.cache/edgeinfer."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("EDGEINFER_HOME") or Path.home() / ".cache" / "edgeinfer")


def cluster_dir() -> Path:
    """Model files of the home cluster: those a worker pulls (by fingerprint) and the share files a
    master writes (shared by a master and a worker on one device)."""
    return home() / "cluster"
