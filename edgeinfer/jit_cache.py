"""Where Numba keeps the compiled kernels: one directory per version of the kernels' sources.

Numba checks a cached function against its own file only; a kernel inlined from another file
(decode_layer.py calls q4.py) would keep running the old code after that file changed, and can crash the
process. Keying the cache directory on a hash of every kernel source makes any change compile anew.
Imported by edgeinfer/__init__.py, before Numba reads its configuration.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .paths import home

KERNELS = Path(__file__).parent / "kernels"


def kernel_cache_dir() -> Path:
    digest = hashlib.sha256()
    for path in sorted(KERNELS.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return home() / "kernels" / digest.hexdigest()[:16]


def configure() -> None:
    """Point Numba at this version's cache, unless the user chose a directory."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return
    os.environ["NUMBA_CACHE_DIR"] = str(kernel_cache_dir())
    if "numba" in sys.modules:  # imported before us: make it read the variable again
        from numba.core import config

        config.reload_config()


def first_run() -> bool:
    """Whether nothing is compiled yet: the kernels will take a while, once."""
    folder = Path(os.environ.get("NUMBA_CACHE_DIR") or kernel_cache_dir())
    return not folder.is_dir() or not any(folder.rglob("*.nbi"))


def import_numba_without_blas_probe() -> None:
    """Import Numba's numpy support with its BLAS probe skipped. numba.np.arraymath imports
    scipy.linalg at import, only to call BLAS from np.dot/np.vdot on float vectors; no kernel here
    calls those, and the probe cost 0.25 s and 11 MB of every start (measured). np.dot in a kernel
    would still work, through Numba's own loop. Scoped to that one import: scipy stays importable."""
    if "numba.np.arraymath" in sys.modules:
        return
    probe = "scipy.linalg.cython_blas"
    blocked = probe not in sys.modules
    if blocked:
        sys.modules[probe] = None  # an import of it raises ImportError: "no BLAS"
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if blocked:
            del sys.modules[probe]
