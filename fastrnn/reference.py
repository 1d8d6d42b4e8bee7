"""The plain torch time loop that every fused kernel is checked against, driven by a cell's step.

Differentiable through ordinary autograd; slow, simple, and correct for any dtype and device.
"""

import torch

from .cells import CELLS
from .rows import scatter_rows, select_rows


def layer(mode, x, h0, w_ih, w_hh, b_ih, b_hh, lengths):
    """One layer of cell ``mode``, D directions. x (T, B, I), h0 (D, B, H), w_ih (D, G*H, I),
    w_hh (D, G*H, H), b_ih and b_hh (D, G*H) or None, lengths (B,) int64. Returns output
    (T, B, D*H) zero past each length, and h_n (D, B, H)."""
    step_of = CELLS[mode].step
    seq_len, batch, _ = x.shape
    n_dir, hidden = h0.shape[0], h0.shape[2]
    lengths = lengths.to(x.device)
    steps = torch.arange(seq_len, device=x.device)
    outputs, finals = [], []
    for d in range(n_dir):
        x_proj = x @ w_ih[d].T
        if b_ih is not None:
            x_proj = x_proj + b_ih[d]
        # Direction 1 walks each sequence backwards over its own valid steps.
        order = steps if d == 0 else (lengths[None, :] - 1 - steps[:, None]).clamp(min=0)
        h = h0[d]
        out = [None] * seq_len
        for step in range(seq_len):
            valid = (step < lengths)[:, None]
            if d == 0:
                p = x_proj[step]
            else:
                p = x_proj.gather(0, order[step][None, :, None].expand(1, batch, x_proj.shape[2]))[0]
            h_proj = h @ w_hh[d].T
            if b_hh is not None:
                h_proj = h_proj + b_hh[d]
            h_new = step_of(p, h_proj, h)
            h = torch.where(valid, h_new, h)
            out[step] = torch.where(valid, h_new, torch.zeros_like(h_new))
        out = torch.stack(out) if seq_len else x.new_zeros(0, batch, hidden)
        if d == 1 and seq_len:
            # The step <-> time map of a reversed sequence is its own inverse.
            valid = (steps[:, None] < lengths[None, :])[..., None]
            undone = out.gather(0, order[..., None].expand_as(out))
            out = torch.where(valid, undone, torch.zeros_like(undone))
        outputs.append(out)
        finals.append(h)
    return torch.cat(outputs, dim=2), torch.stack(finals)


def rnn(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode):
    """What :func:`fastrnn.ops.rnn` computes (same arguments, less the backend), as the loop above:
    the torch twin behind the modes the fused kernels cannot serve (higher-order and batched
    gradients, kernels that failed). Returns (output, h_n)."""
    n_dir = hx.shape[0] // num_layers
    batch = hx.shape[1]
    per_layer = len(weights) // num_layers
    per_dir = per_layer // n_dir
    layer_input = x if valid_rows is None else scatter_rows(x, valid_rows, seq_len, batch)
    finals = []
    for index in range(num_layers):
        if index > 0 and masks:
            layer_input = layer_input * masks[index - 1]
        params = weights[index * per_layer : (index + 1) * per_layer]
        w_ih, w_hh = torch.stack(params[0::per_dir]), torch.stack(params[1::per_dir])
        b_ih = torch.stack(params[2::per_dir]) if per_dir > 2 else None
        b_hh = torch.stack(params[3::per_dir]) if per_dir > 3 else None
        layer_input, h_n = layer(
            mode, layer_input, hx[index * n_dir : (index + 1) * n_dir], w_ih, w_hh, b_ih, b_hh, lengths
        )
        finals.append(h_n)
    output = layer_input
    if valid_rows is not None:
        output = select_rows(output, valid_rows)
    return output, torch.cat(finals)
