"""Triton (GPU) kernels of fastrnn: ``recurrence.py`` (the persistent kernels, generic over the cell),
``_cells.py`` (each cell's pointwise step) and ``_common.py`` (what the kernels share)."""
