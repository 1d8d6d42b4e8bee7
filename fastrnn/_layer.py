"""One layer of any cell on a fused backend: the input projection GEMM, the kernel's time loop, and
in backward the kernel's reverse loop followed by the weight and input gradients as GEMMs over all
T*B rows (over the valid tokens only with ``valid_rows``). CONTRACTS.md, "Cells".

x: (T, B, I) padded, or (N, I) valid rows; states: the layer's initial states, a tuple (h0,) or
LSTM's (h0, c0), each (D, B, ...); params: per direction (w_ih, w_hh[, b_ih[, b_hh]][, w_hr]) as
torch holds them; out: (T, B, D, P) padded (P = H but for LSTM's proj_size); saved: what the cell's
forward keeps for backward.
"""

import torch

from . import backends
from .cells import CELLS, split_params
from .rows import scatter_rows, select_rows


def params_of(weights, index, num_layers, n_dir):
    """Layer ``index``'s parameters, one (w_ih, w_hh[, b_ih[, b_hh]]) sequence per direction, from
    the flat list ordered as ``nn.RNNBase._flat_weights``."""
    per_dir = len(weights) // (num_layers * n_dir)
    first = index * n_dir * per_dir
    return [weights[first + d * per_dir : first + (d + 1) * per_dir] for d in range(n_dir)]


def _stack(tensors):
    # A view for one direction; two directions are copied, transiently (never saved).
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _biases(biases, cell, hidden, like):
    """(b_ih (D, G*H) or None, b_hh (D, G*H) or None) as the kernels take them from each
    direction's bias tuple: b_hh added to b_ih where the cell folds it (then None), zeros for a
    cell without biases that needs one."""
    if not biases[0]:
        return None, (None if cell.folds_recurrent_bias else like.new_zeros(len(biases), cell.gates * hidden))
    b_ih = _stack([b[0] for b in biases])
    b_hh = _stack([b[1] for b in biases]) if len(biases[0]) == 2 else None
    if cell.folds_recurrent_bias:
        return (b_ih if b_hh is None else b_ih + b_hh), None
    return b_ih, b_hh if b_hh is not None else torch.zeros_like(b_ih)


def _split(params, cell):
    """The stacked (D, ...) weights (w_ih, w_hh, w_hr or None) and each direction's biases."""
    parts = [split_params(p, cell.gates) for p in params]
    w_hr = _stack([p[3] for p in parts]) if parts[0][3] is not None else None
    return _stack([p[0] for p in parts]), _stack([p[1] for p in parts]), w_hr, [p[2] for p in parts]


def _launcher_states(states):
    # The launchers take a one-state cell's state as the tensor itself, a two-state cell's as a tuple.
    return states[0] if len(states) == 1 else tuple(states)


def _projection(w_hr):
    return {} if w_hr is None else {"w_hr": w_hr}


def _project(x, w_ih, bias, valid_rows, seq_len, batch):
    """x @ W_ih^T (+ bias) for every direction at once -> (T, B, D, G*H); with ``valid_rows`` only
    those rows are computed (the others are left unset: kernels never read proj past a length)."""
    n_dir, width, n_in = w_ih.shape
    rows, weights = select_rows(x, valid_rows), w_ih.reshape(n_dir * width, n_in).t()
    proj = torch.mm(rows, weights) if bias is None else torch.addmm(bias.reshape(-1), rows, weights)
    if valid_rows is not None:
        proj = proj.new_empty(seq_len * batch, n_dir * width).index_copy_(0, valid_rows, proj)
    return proj.view(seq_len, batch, n_dir, width)


def padded(x, valid_rows, seq_len, batch):
    """A layer input as (T, B, I), from its valid rows if that is how it came."""
    return x if x.dim() == 3 else scatter_rows(x, valid_rows, seq_len, batch)


def forward(x, states, params, lengths, valid_rows, seq_len, mode, backend, keep_saved=True):
    """(out (T, B, D*P), final states (a tuple like ``states``), saved; () may come without
    ``keep_saved``). A whole-layer kernel gets the parameters as they are (the launcher stacks
    them in NumPy)."""
    cell = CELLS[mode]
    n_dir, n_in = len(params), params[0][0].shape[1]
    batch, width = states[0].shape[1], states[0].shape[2]
    hidden = params[0][1].shape[0] // cell.gates
    kernels = backends.kernels(backend, mode)
    if kernels.fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, mode):
        x = padded(x, valid_rows, seq_len, batch)
        out, finals, saved = kernels.layer_forward(x, params, _launcher_states(states), lengths, mode, keep_saved)
    else:
        w_ih, w_hh, w_hr, biases = _split(params, cell)
        b_ih, b_hh = _biases(biases, cell, hidden, w_hh)
        proj = _project(x, w_ih, b_ih, valid_rows, seq_len, batch)
        out, finals, saved = kernels.forward(
            proj, w_hh, b_hh, _launcher_states(states), lengths, mode, keep_saved, **_projection(w_hr)
        )
    finals = tuple(finals) if isinstance(finals, (tuple, list)) else (finals,)
    return out.view(seq_len, batch, n_dir * width), finals, saved


def _grad_w_hh(grad_rec, out, h0, lengths, valid_rows):
    """dW_hh[d] = sum_t grad_rec_t^T h_prev_t as two GEMMs per direction.

    h_prev_t is out[t-1] (direction 0) or out[t+1] (direction 1) inside a sequence, and h0 at the
    sequence's first processed step. ``out`` is zero past each length, so the shifted products
    need no mask; only the h0 term gathers each sequence's first step. With ``valid_rows`` the
    shifted products pair up only the valid rows of grad_rec.
    """
    seq_len, batch, n_dir, hidden = out.shape
    width = grad_rec.shape[3]
    if seq_len == 0:
        return out.new_zeros(n_dir, width, hidden)
    # Written in place per direction: out-of-place addmm plus a stack cost ~80 us more at B=1, H=256.
    grads = out.new_empty(n_dir, width, hidden)
    rows = torch.arange(batch, device=out.device)
    for d in range(n_dir):
        dz, h = grad_rec[:, :, d], out[:, :, d]
        # shift: how many flat rows h_prev lies before dz's row.
        if d == 0:
            dz_first, later, earlier, shift = dz[0], dz[1:], h[:-1], batch
        else:
            dz_first, later, earlier, shift = dz[(lengths - 1).clamp(min=0), rows], dz[:-1], h[1:], -batch
        if valid_rows is None:
            later, earlier = later.reshape(-1, width), earlier.reshape(-1, hidden)
        else:
            previous = valid_rows - shift
            pairs = (previous >= 0) & (previous < seq_len * batch)
            later = dz.reshape(-1, width).index_select(0, valid_rows[pairs])
            earlier = h.reshape(-1, hidden).index_select(0, previous[pairs])
        torch.mm(dz_first.t(), h0[d], out=grads[d])
        grads[d].addmm_(later.t(), earlier)
    return grads


def backward(grad_out, grad_finals, x, states, params, out, saved, lengths, valid_rows, mode, backend, input_grad):
    """Gradients of one layer: (x or None, the initial states (a tuple like ``states``), per
    direction a tuple matching ``params``). x: (T, B, I) padded, or (N, I) valid rows (its
    gradient then comes as rows too)."""
    cell = CELLS[mode]
    seq_len, batch = out.shape[:2]
    n_dir, n_in = len(params), params[0][0].shape[1]
    hidden = params[0][1].shape[0] // cell.gates
    out = out.view(seq_len, batch, n_dir, states[0].shape[2])
    kernels = backends.kernels(backend, mode)
    grad_out = grad_out.reshape(out.shape).contiguous()
    grad_finals = _launcher_states([g.contiguous() for g in grad_finals])
    if kernels.fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, mode):
        grad_x, grad_states, grad_params = kernels.layer_backward(
            grad_out,
            grad_finals,
            padded(x, valid_rows, seq_len, batch),
            params,
            out,
            saved,
            _launcher_states(states),
            lengths,
            mode,
            input_grad,
        )
        grad_x = grad_x if grad_x is None or x.dim() == 3 else select_rows(grad_x, valid_rows)
        return grad_x, _as_tuple(grad_states), grad_params
    w_ih, w_hh, w_hr, biases = _split(params, cell)
    grad_proj, grad_rec, grad_states, *grad_h = kernels.backward(
        grad_out, grad_finals, out, saved, w_hh, _launcher_states(states), lengths, mode, **_projection(w_hr)
    )
    flat = select_rows(grad_proj, valid_rows)
    grad_x = None
    if input_grad:
        grad_x = torch.mm(flat, w_ih.reshape(-1, n_in))
        if x.dim() == 3 and valid_rows is not None:
            grad_x = scatter_rows(grad_x, valid_rows, seq_len, batch)
        grad_x = grad_x.view(x.shape)
    grad_w_ih = torch.mm(flat.t(), select_rows(x, valid_rows)).view(w_ih.shape)
    grad_w_hh = _grad_w_hh(grad_rec, out, states[0], lengths, valid_rows)
    grad_biases = _grad_biases(len(biases[0]), flat, grad_rec, valid_rows, cell, n_dir)
    grad_w_hr = [_grad_w_hr(grad_h[0], saved[0], valid_rows)] if grad_h else []
    grads = [(grad_w_ih[d], grad_w_hh[d], *(g[d] for g in grad_biases + grad_w_hr)) for d in range(n_dir)]
    return grad_x, _as_tuple(grad_states), grads


def _as_tuple(states):
    return tuple(states) if isinstance(states, (tuple, list)) else (states,)


def _grad_w_hr(grad_h, gates, valid_rows):
    """dW_hr[d] = sum_t grad_h_t^T (o_t * tanh(c_t)), one GEMM per direction over the valid rows,
    with o_t and c_t read from the LSTM's saved [i, f, g, o, c] (CONTRACTS.md)."""
    n_dir, hidden = gates.shape[2], gates.shape[3] // 5
    projected = gates[..., 3 * hidden : 4 * hidden] * torch.tanh(gates[..., 4 * hidden :])
    grads = grad_h.new_empty(n_dir, grad_h.shape[3], hidden)
    for d in range(n_dir):
        rows = select_rows(grad_h[:, :, d], valid_rows).t(), select_rows(projected[:, :, d], valid_rows)
        torch.mm(*rows, out=grads[d])
    return grads


def _grad_biases(n_biases, flat_grad_proj, grad_rec, valid_rows, cell, n_dir):
    """The (D, G*H) gradients of the layer's biases, only as many as it has: b_ih's is the sum of
    grad_proj, b_hh's that of grad_rec, or for a folded b_hh a copy of b_ih's (.grad tensors
    sharing memory would be accumulated, clipped or scaled in place twice)."""
    if n_biases == 0:
        return []
    grad_b_ih = flat_grad_proj.sum(0).view(n_dir, -1)
    if n_biases == 1:
        return [grad_b_ih]
    if cell.folds_recurrent_bias:
        return [grad_b_ih, grad_b_ih.clone()]
    return [grad_b_ih, select_rows(grad_rec, valid_rows).sum(0).view(n_dir, -1)]
