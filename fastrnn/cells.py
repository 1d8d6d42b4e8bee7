"""The recurrent cells, declared once: everything else (modules, glue, kernels' dispatch, reference
loop, bench, tests) reads them from here.

A cell's step is written on the two projections every cell shares, so that the weight and bias
gradients stay GEMMs over all T*B rows whatever the cell:

    x_proj = x_t @ W_ih^T + b_ih    (G*H wide: the input side, one GEMM before the time loop)
    h_proj = h_{t-1} @ W_hh^T + b_hh    (G*H wide: the recurrent side, the product inside the loop)

A step maps (x_proj, h_proj, state) to the new state, a tuple whose first entry is the output h_t
(LSTM's state is (h, c)). An LSTM with ``proj_size`` then projects that h_t by W_hr (the caller
does: it is a product like W_hh's, not part of the cell's pointwise math).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]


def _elman_step(activation):
    def step(x_proj: Tensor, h_proj: Tensor, state: State) -> State:
        return (activation(x_proj + h_proj),)

    return step


def _gru_step(x_proj: Tensor, h_proj: Tensor, state: State) -> State:
    # torch's gate order (r, z, n); b_hn stays inside r * (W_hn h + b_hn), which is why the GRU's
    # recurrent bias cannot join the input projection.
    x_r, x_z, x_n = x_proj.chunk(3, -1)
    h_r, h_z, h_n = h_proj.chunk(3, -1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return ((1 - z) * n + z * state[0],)


def _lstm_step(x_proj: Tensor, h_proj: Tensor, state: State) -> State:
    # torch's gate order (i, f, g, o); both biases are plain sums, so b_hh folds into x_proj.
    i, f, g, o = (x_proj + h_proj).chunk(4, -1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


@dataclass(frozen=True)
class Cell:
    mode: str  # torch's RNNBase.mode, the key everywhere
    kernel: str  # the Numba kernel module fastrnn.kernels.numba.<kernel>
    gates: int  # G: W_ih is (G*H, I), W_hh (G*H, H)
    states: int  # carried state tensors: h, and LSTM's c (H wide; h is proj_size wide with W_hr)
    folds_recurrent_bias: bool  # b_hh joins b_ih in x_proj (the kernels then get no b_hh)
    saved_per_step: int  # H-wide values per step that forward keeps for backward besides h_t
    torch_class: type[nn.RNNBase]
    step: Callable[[Tensor, Tensor, State], State]  # (x_proj, h_proj, state_{t-1}) -> state_t


CELLS = {
    cell.mode: cell
    for cell in (
        Cell("RNN_TANH", "elman", 1, 1, True, 0, nn.RNN, _elman_step(torch.tanh)),
        Cell("RNN_RELU", "elman", 1, 1, True, 0, nn.RNN, _elman_step(torch.relu)),
        # Saved: the gates r, z, n and W_hn h + b_hn, as torch's GRU keeps them; recomputing them
        # would cost a second pass of both projections in backward.
        Cell("GRU", "gru", 3, 1, False, 4, nn.GRU, _gru_step),
        # Saved: the gate values i, f, g, o and the cell state c_t; backward recomputes tanh(c_t)
        # (and, with proj_size, o * tanh(c_t) for W_hr's gradient) rather than storing it.
        Cell("LSTM", "lstm", 4, 2, True, 5, nn.LSTM, _lstm_step),
    )
}


def split_params(params: tuple[Tensor, ...], gates: int) -> tuple[Tensor, Tensor, tuple[Tensor, ...], Tensor | None]:
    """One direction's parameters in torch's order, (w_ih, w_hh[, biases...][, w_hr]) ->
    (w_ih, w_hh, biases, w_hr or None). A W_hr is there exactly when W_hh's columns (the state
    width, proj_size) are fewer than its rows per gate (hidden_size; torch requires
    proj_size < hidden_size)."""
    w_ih, w_hh = params[0], params[1]
    if w_hh.shape[1] * gates != w_hh.shape[0]:
        return w_ih, w_hh, tuple(params[2:-1]), params[-1]
    return w_ih, w_hh, tuple(params[2:]), None
