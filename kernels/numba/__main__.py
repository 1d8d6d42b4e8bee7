"""``python -m fastrnn.kernels.numba``: compile (or load from Numba's cache) every kernel of every
cell for float32 and float64, so that a first call in a later process only loads them."""

import importlib

import torch

from fastrnn.cells import CELLS

from . import _runtime


def warm_up():
    for mode, cell in CELLS.items():
        kernels = importlib.import_module(f"{__package__}.{cell.kernel}")
        width, hidden = cell.gates * 4, 4
        for dtype in (torch.float32, torch.float64):
            x, h0 = torch.zeros(2, 2, 3, dtype=dtype), torch.zeros(1, 2, hidden, dtype=dtype)
            params = [(torch.zeros(width, 3, dtype=dtype), torch.zeros(width, hidden, dtype=dtype))]
            lengths = torch.full((2,), 2)
            out, h_n, saved = kernels.layer_forward(x, params, h0, lengths, mode)
            kernels.layer_backward(out, h_n, x, params, out, saved, h0, lengths, mode, True)
            proj, w_hh = torch.zeros(2, 2, 1, width, dtype=dtype), params[0][1][None]
            b_hh = None if cell.folds_recurrent_bias else torch.zeros(1, width, dtype=dtype)
            for rows_per_task in (None, 1):
                with _runtime.forced_plan(rows_per_task):
                    out, h_n, saved = kernels.forward(proj, w_hh, b_hh, h0, lengths, mode)
                    kernels.backward(out, h_n, out, saved, w_hh, h0, lengths, mode)


if __name__ == "__main__":
    warm_up()
