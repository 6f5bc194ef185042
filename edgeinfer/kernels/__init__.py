"""Kernels: pure functions over arrays. `reference` holds the exact numpy versions every faster kernel
is tested against."""
