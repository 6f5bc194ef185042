"""edgeinfer: pure-CPU LLM inference for constrained hardware."""

from .jit_cache import configure as _configure_kernel_cache

__version__ = "0.1.0"

_configure_kernel_cache()
