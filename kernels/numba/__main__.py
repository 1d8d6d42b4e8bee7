"""``python -m fastrnn.kernels.numba``: compile (or load from Numba's cache) every kernel of every
cell for float32 and float64, so that a first call in a later process only loads them."""

import importlib

import torch

from fastrnn.cells import CELLS

from . import _runtime


def _states(cell, width, hidden, dtype):
    """A two-state cell takes (h0 (D, B, P), c0 (D, B, H)), a one-state cell h0 (D, B, H) itself."""
    h0 = torch.zeros(1, 2, width, dtype=dtype)
    return h0 if cell.states == 1 else (h0, torch.zeros(1, 2, hidden, dtype=dtype))


def warm_up():
    for mode, cell in CELLS.items():
        kernels = importlib.import_module(f"{__package__}.{cell.kernel}")
        gates, hidden = cell.gates * 4, 4
        # A two-state cell (LSTM) may project its output (proj_size, W_hr): the same kernels, run
        # both ways so that every branch is exercised once.
        for width in (hidden, 2) if cell.states == 2 else (hidden,):
            for dtype in (torch.float32, torch.float64):
                x, h0 = torch.zeros(2, 2, 3, dtype=dtype), _states(cell, width, hidden, dtype)
                w_ih, w_hh = torch.zeros(gates, 3, dtype=dtype), torch.zeros(gates, width, dtype=dtype)
                w_hr = torch.zeros(width, hidden, dtype=dtype) if width != hidden else None
                params = [(w_ih, w_hh) if w_hr is None else (w_ih, w_hh, w_hr)]
                projection = {} if w_hr is None else {"w_hr": w_hr[None]}
                lengths = torch.full((2,), 2)
                out, h_n, saved = kernels.layer_forward(x, params, h0, lengths, mode)
                kernels.layer_backward(out, h_n, x, params, out, saved, h0, lengths, mode, True)
                proj = torch.zeros(2, 2, 1, gates, dtype=dtype)
                b_hh = None if cell.folds_recurrent_bias else torch.zeros(1, gates, dtype=dtype)
                for rows_per_task in (None, 1):
                    with _runtime.forced_plan(rows_per_task):
                        out, h_n, saved = kernels.forward(proj, w_hh[None], b_hh, h0, lengths, mode, **projection)
                        kernels.backward(out, h_n, out, saved, w_hh[None], h0, lengths, mode, **projection)


if __name__ == "__main__":
    warm_up()
