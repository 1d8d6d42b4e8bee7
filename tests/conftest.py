import os

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; this must be
# set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
