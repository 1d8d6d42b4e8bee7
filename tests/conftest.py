import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; this must be
# set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["whole-layer", "split"])
def layer_kernels(request, monkeypatch):
    """Run a test twice on Numba: small layers as one whole-layer call, and every layer split into
    torch GEMMs around the recurrence kernel (the path large layers take)."""
    if request.param == "split":
        from fastrnn.kernels.numba import _runtime

        monkeypatch.setattr(_runtime, "WHOLE_LAYER_MACS", -1)
    return request.param
