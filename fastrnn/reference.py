"""The plain torch time loop that every fused kernel is checked against, driven by a cell's step.

Differentiable through ordinary autograd; slow, simple, and correct for any dtype and device.
"""

import torch

from .cells import CELLS, split_params
from .rows import scatter_rows, select_rows


def layer(mode, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, w_hr=None):
    """One layer of cell ``mode``, D directions. x (T, B, I), h0 (D, B, H), or for a two-state
    cell the tuple (h0 (D, B, P), c0 (D, B, H)); w_ih (D, G*H, I), w_hh (D, G*H, P), b_ih and b_hh
    (D, G*H) or None, w_hr (D, P, H) or None (LSTM's proj_size: P = H without it), lengths (B,)
    int64. Returns output (T, B, D*P) zero past each length, and h_n in h0's form."""
    step_of = CELLS[mode].step
    seq_len, batch, _ = x.shape
    states0 = tuple(h0) if isinstance(h0, (tuple, list)) else (h0,)
    n_dir, width = states0[0].shape[0], states0[0].shape[2]
    lengths = lengths.to(x.device)
    steps = torch.arange(seq_len, device=x.device)
    outputs, finals = [], []
    for d in range(n_dir):
        x_proj = x @ w_ih[d].T
        if b_ih is not None:
            x_proj = x_proj + b_ih[d]
        # Direction 1 walks each sequence backwards over its own valid steps.
        order = steps if d == 0 else (lengths[None, :] - 1 - steps[:, None]).clamp(min=0)
        state = tuple(s[d] for s in states0)
        out = [None] * seq_len
        for step in range(seq_len):
            valid = (step < lengths)[:, None]
            if d == 0:
                p = x_proj[step]
            else:
                p = x_proj.gather(0, order[step][None, :, None].expand(1, batch, x_proj.shape[2]))[0]
            h_proj = state[0] @ w_hh[d].T
            if b_hh is not None:
                h_proj = h_proj + b_hh[d]
            new = step_of(p, h_proj, state)
            if w_hr is not None:
                new = (new[0] @ w_hr[d].T, *new[1:])
            state = tuple(torch.where(valid, n, s) for n, s in zip(new, state))
            out[step] = torch.where(valid, new[0], torch.zeros_like(new[0]))
        out = torch.stack(out) if seq_len else x.new_zeros(0, batch, width)
        if d == 1 and seq_len:
            # The step <-> time map of a reversed sequence is its own inverse.
            valid = (steps[:, None] < lengths[None, :])[..., None]
            undone = out.gather(0, order[..., None].expand_as(out))
            out = torch.where(valid, undone, torch.zeros_like(undone))
        outputs.append(out)
        finals.append(state)
    h_n = tuple(torch.stack(s) for s in zip(*finals))
    return torch.cat(outputs, dim=2), (h_n if isinstance(h0, (tuple, list)) else h_n[0])


def rnn(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode):
    """What :func:`fastrnn.ops.rnn` computes (same arguments, less the backend), as the loop above:
    the torch twin behind the modes the fused kernels cannot serve (higher-order and batched
    gradients, kernels that failed). hx: (L*D, B, H), or LSTM's (h0, c0). Returns (output, h_n),
    h_n in hx's form."""
    states = tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)
    n_dir = states[0].shape[0] // num_layers
    batch = states[0].shape[1]
    per_layer = len(weights) // num_layers
    per_dir = per_layer // n_dir
    layer_input = x if valid_rows is None else scatter_rows(x, valid_rows, seq_len, batch)
    finals = []
    for index in range(num_layers):
        if index > 0 and masks:
            layer_input = layer_input * masks[index - 1]
        first = index * per_layer
        directions = [
            split_params(weights[first + d * per_dir : first + (d + 1) * per_dir], CELLS[mode].gates)
            for d in range(n_dir)
        ]
        w_ih, w_hh, biases, w_hr = (_stacked(parts) for parts in zip(*directions))
        b_ih, b_hh = (*biases, None, None)[:2] if biases is not None else (None, None)
        layer_states = tuple(s[index * n_dir : (index + 1) * n_dir] for s in states)
        layer_input, h_n = layer(mode, layer_input, layer_states, w_ih, w_hh, b_ih, b_hh, lengths, w_hr)
        finals.append(h_n)
    output = layer_input
    if valid_rows is not None:
        output = select_rows(output, valid_rows)
    h_n = tuple(torch.cat(s) for s in zip(*finals))
    return output, (h_n if isinstance(hx, (tuple, list)) else h_n[0])


def _stacked(parts):
    """The directions' tensors (or tuples of them, the biases) stacked on a new first dim; None for
    a parameter the layer lacks."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], tuple):
        return tuple(torch.stack(b) for b in zip(*parts)) if parts[0] else None
    return torch.stack(parts)
