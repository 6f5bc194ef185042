"""edgeinfer: pure-CPU LLM inference for constrained hardware."""

__version__ = "0.1.0"
