"""Kernels: pure functions over arrays. `reference` holds the exact numpy versions every faster kernel
is tested against."""

from ..jit_cache import import_numba_without_blas_probe, load_cached_kernels_without_registries, unique_function_ids

import_numba_without_blas_probe()
unique_function_ids()
load_cached_kernels_without_registries()
