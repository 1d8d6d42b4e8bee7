"""Fused Elman-RNN kernels, installed as ``fastrnn.kernels``: ``numba`` (CPU) and ``triton`` (GPU)."""
