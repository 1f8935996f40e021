"""Kernels for the routed layers' fast path (Triton on GPU; checked on CPU under TRITON_INTERPRET=1)."""
