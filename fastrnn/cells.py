"""The recurrent cells, declared once: everything else (modules, glue, kernels' dispatch, reference
loop, bench, tests) reads them from here.

A cell's step is written on the two projections every cell shares, so that the weight and bias
gradients stay GEMMs over all T*B rows whatever the cell:

    x_proj = x_t @ W_ih^T + b_ih    (G*H wide: the input side, one GEMM before the time loop)
    h_proj = h_{t-1} @ W_hh^T + b_hh    (G*H wide: the recurrent side, the product inside the loop)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


def _elman_step(activation):
    def step(x_proj: Tensor, h_proj: Tensor, h: Tensor) -> Tensor:
        return activation(x_proj + h_proj)

    return step


def _gru_step(x_proj: Tensor, h_proj: Tensor, h: Tensor) -> Tensor:
    # torch's gate order (r, z, n); b_hn stays inside r * (W_hn h + b_hn), which is why the GRU's
    # recurrent bias cannot join the input projection.
    x_r, x_z, x_n = x_proj.chunk(3, -1)
    h_r, h_z, h_n = h_proj.chunk(3, -1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


@dataclass(frozen=True)
class Cell:
    mode: str  # torch's RNNBase.mode, the key everywhere
    kernel: str  # the Numba kernel module fastrnn.kernels.numba.<kernel>
    gates: int  # G: W_ih is (G*H, I), W_hh (G*H, H)
    states: int  # carried state tensors (h; LSTM adds c)
    folds_recurrent_bias: bool  # b_hh joins b_ih in x_proj (the kernels then get no b_hh)
    saved_per_step: int  # H-wide values per step that forward keeps for backward besides h_t
    torch_class: type[nn.RNNBase]
    step: Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_proj, h_proj, h_{t-1}) -> h_t


CELLS = {
    cell.mode: cell
    for cell in (
        Cell("RNN_TANH", "elman", 1, 1, True, 0, nn.RNN, _elman_step(torch.tanh)),
        Cell("RNN_RELU", "elman", 1, 1, True, 0, nn.RNN, _elman_step(torch.relu)),
        # Saved: the gates r, z, n and W_hn h + b_hn, as torch's GRU keeps them; recomputing them
        # would cost a second pass of both projections in backward.
        Cell("GRU", "gru", 3, 1, False, 4, nn.GRU, _gru_step),
    )
}
