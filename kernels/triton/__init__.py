"""Triton (GPU) kernels of fastrnn; see ``elman.py``."""
