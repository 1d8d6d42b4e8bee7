"""Functional recurrent layers: one fused layer per cell (:func:`elman`, :func:`gru`, :func:`lstm`)
and the layer stack behind the modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, ops, reference
from .cells import CELLS
from .rows import scatter_rows, select_rows

_NONLINEARITIES = ("tanh", "relu")


def elman(
    x: Tensor,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Tensor | None = None,
    *,
    lengths: Tensor | None = None,
    nonlinearity: str = "tanh",
    batch_first: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer in D directions, ``h_t = act(x_t W_ih^T + bias + h_{t-1} W_hh^T)``.

    Args:
        x: (T, B, I), or (B, T, I) if ``batch_first``.
        h0: (D, B, H) initial state, or None for zeros.
        w_ih: (D, H, I); w_hh: (D, H, H); bias: (D, H) (``b_ih + b_hh``) or None.
        lengths: (B,) valid steps per sequence (right padding), or None for all T. Direction 1
            runs each sequence backwards over its own valid steps. The fused backends never
            read the padding; ``backend="torch"`` needs it finite (it multiplies it by zero
            gradients).
        nonlinearity: ``"tanh"`` or ``"relu"``.
        backend: ``"auto"`` (default), ``"numba"``, ``"triton"`` or ``"torch"``; see
            :mod:`fastrnn.backends`.

    Returns:
        output (T, B, D*H) [(B, T, D*H) if ``batch_first``], zero past each length, and
        h_n (D, B, H), each sequence's state after its last valid step.
    """
    if nonlinearity not in _NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    mode = "RNN_RELU" if nonlinearity == "relu" else "RNN_TANH"
    return _one_layer(mode, x, h0, w_ih, w_hh, (bias,), lengths, batch_first, backend)


def gru(
    x: Tensor,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    lengths: Tensor | None = None,
    batch_first: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer in D directions, as ``torch.nn.GRU`` computes it (gates r, z, n in that order):
    ``r, z = σ(x W_i{r,z}^T + b_i{r,z} + h W_h{r,z}^T + b_h{r,z})``,
    ``n = tanh(x W_in^T + b_in + r ⊙ (h W_hn^T + b_hn))``, ``h' = (1 - z) ⊙ n + z ⊙ h``.

    Args:
        x: (T, B, I), or (B, T, I) if ``batch_first``.
        h0: (D, B, H) initial state, or None for zeros.
        w_ih: (D, 3H, I); w_hh: (D, 3H, H); b_ih, b_hh: (D, 3H), both or neither.
        lengths, batch_first, backend: as for :func:`elman`.

    Returns:
        output (T, B, D*H) [(B, T, D*H) if ``batch_first``], zero past each length, and
        h_n (D, B, H), each sequence's state after its last valid step.
    """
    if (b_ih is None) != (b_hh is None):
        raise ValueError("gru: pass both biases b_ih and b_hh, or neither")
    return _one_layer("GRU", x, h0, w_ih, w_hh, (b_ih, b_hh), lengths, batch_first, backend)


def lstm(
    x: Tensor,
    hx: tuple[Tensor, Tensor] | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
    *,
    lengths: Tensor | None = None,
    batch_first: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer in D directions, as ``torch.nn.LSTM`` computes it (gates i, f, g, o in that
    order): ``i, f, o = σ(...)``, ``g = tanh(...)`` of ``x W_ih^T + b_ih + h W_hh^T + b_hh``,
    ``c' = f ⊙ c + i ⊙ g``, ``h' = o ⊙ tanh(c')``, and with ``w_hr`` (proj_size)
    ``h' = (o ⊙ tanh(c')) W_hr^T``.

    Args:
        x: (T, B, I), or (B, T, I) if ``batch_first``.
        hx: (h0 (D, B, P), c0 (D, B, H)), or None for zeros; P = proj_size with ``w_hr``, else H.
        w_ih: (D, 4H, I); w_hh: (D, 4H, P); b_ih, b_hh: (D, 4H), both or neither; w_hr: (D, P, H)
            or None.
        lengths, batch_first, backend: as for :func:`elman`.

    Returns:
        output (T, B, D*P) [(B, T, D*P) if ``batch_first``], zero past each length, and
        (h_n (D, B, P), c_n (D, B, H)), each sequence's states after its last valid step.
    """
    if (b_ih is None) != (b_hh is None):
        raise ValueError("lstm: pass both biases b_ih and b_hh, or neither")
    return _one_layer("LSTM", x, hx, w_ih, w_hh, (b_ih, b_hh), lengths, batch_first, backend, w_hr)


def _one_layer(mode, x, hx, w_ih, w_hh, biases, lengths, batch_first, backend, w_hr=None):
    """The shared body of the one-layer functions; ``biases``: the cell's bias tensors or Nones;
    hx: h0 (or None) for one-state cells, LSTM's (h0, c0) (or None)."""
    if x.dim() != 3:
        raise RuntimeError(f"input must have 3 dimensions, got {x.dim()}")
    if batch_first:
        x = x.transpose(0, 1)
    seq_len, batch, _ = x.shape
    cell = CELLS[mode]
    gates = cell.gates
    n_dir, hidden = w_hh.shape[0], w_hh.shape[1] // gates
    width = hidden if w_hr is None else w_hr.shape[1]
    expected = ((n_dir, gates * hidden, x.shape[2]), (n_dir, gates * hidden, width))
    if (w_ih.shape, w_hh.shape) != expected:
        raise RuntimeError(
            f"expected w_ih (D, {gates}H, I) = {expected[0]} and w_hh (D, {gates}H, {'P' if w_hr is not None else 'H'})"
            f" = {expected[1]}, got {tuple(w_ih.shape)} and {tuple(w_hh.shape)}"
        )
    if w_hr is not None and (w_hr.dim() != 3 or w_hr.shape != (n_dir, width, hidden) or width >= hidden):
        raise RuntimeError(f"expected w_hr (D, P, H) with P < H = {hidden}, got {tuple(w_hr.shape)}")
    biases = tuple(b for b in biases if b is not None)
    if any(b.shape != (n_dir, gates * hidden) for b in biases):
        raise RuntimeError(
            f"expected biases of shape {(n_dir, gates * hidden)}, got {[tuple(b.shape) for b in biases]}"
        )
    expected_states = [(n_dir, batch, width), (n_dir, batch, hidden)][: cell.states]
    if hx is None:
        states = [x.new_zeros(shape) for shape in expected_states]
    else:
        states = list(hx) if cell.states > 1 else [hx]
        got = [tuple(s.shape) for s in states]
        if got != expected_states:
            want, got = (expected_states[0], list(got[0])) if len(got) == 1 else (expected_states, got)
            raise RuntimeError(f"Expected hidden size {want}, got {got}")
    valid_rows = None
    if lengths is None:
        lengths = torch.full((batch,), seq_len, dtype=torch.int64, device=x.device)
    elif lengths.shape != (batch,) or (batch and (int(lengths.min()) < 0 or int(lengths.max()) > seq_len)):
        raise ValueError(f"lengths must have shape ({batch},) with values in [0, {seq_len}]")
    else:
        lengths = lengths.to(device=x.device, dtype=torch.int64)
        if batch and int(lengths.min()) < seq_len:
            valid_rows = valid_rows_of(lengths, seq_len)
    projection = () if w_hr is None else (w_hr,)
    tensors = (*states, w_ih, w_hh, *biases, *projection)
    names = (*("h0", "c0")[: len(states)], "w_ih", "w_hh", *("bias",) * len(biases), *("w_hr",) * len(projection))
    _check_like(x, tensors, lambda i: names[i])
    cast = backends.autocast_dtype(backend, x.device, x.dtype)
    if cast is not None:  # see fastrnn.nn: autograd carries the gradients back through the casts
        x, tensors = x.to(cast), tuple(t.to(cast) for t in tensors)
        states = list(tensors[: len(states)])
    backend = backends.resolve(backend, x.device, x.dtype, (x, *tensors), cast_for_autocast=cast is not None)
    per_dir = tensors[len(states) :]
    weights = [w[d] for d in range(n_dir) for w in per_dir]
    hx = tuple(states) if cell.states > 1 else states[0]
    if backend == "torch":
        return _batch_first(reference.rnn(x, hx, weights, [], lengths, None, seq_len, 1, mode), batch_first)
    rows = x if valid_rows is None else select_rows(x, valid_rows)
    output, h_n = ops.rnn(rows, hx, weights, [], lengths, valid_rows, seq_len, 1, mode, backend)
    if valid_rows is not None:
        output = scatter_rows(output, valid_rows, seq_len, batch)
    return _batch_first((output, h_n), batch_first)


def _batch_first(result, batch_first):
    output, h_n = result
    return (output.transpose(0, 1) if batch_first else output), h_n


def valid_rows_of(lengths: Tensor, seq_len: int) -> Tensor:
    """Flat indices t * B + b of the valid steps (t < lengths[b]) of a (T, B, ...) batch, ascending
    (the order of a PackedSequence's data), so that GEMMs can skip the padding."""
    steps = torch.arange(seq_len, device=lengths.device)
    return (steps[:, None] < lengths[None, :]).reshape(-1).nonzero().squeeze(1)


def _check_like(x, tensors, names):
    """Every tensor (None allowed) has x's dtype and device; names(i) names tensor i in the error
    (made only on error: formatting names on every call costs more than the checks)."""
    for i, t in enumerate(tensors):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise RuntimeError(
                f"{names(i)} is {t.dtype} on {t.device} but input is {x.dtype} on {x.device}: they must match"
            )


def packed_layout(batch_sizes: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """A PackedSequence's padded layout: lengths (B,) and the flat row t * B + b of every packed row
    (ascending, as packed data is ordered, on ``device``), in the packed (sorted) batch order."""
    seq_len = batch_sizes.numel()
    batch = int(batch_sizes[0]) if seq_len else 0
    lengths = (batch_sizes[None, :] > torch.arange(batch)[:, None]).sum(1)
    return lengths, valid_rows_of(lengths, seq_len).to(device)


def stack(x, hx, weights, *, seq_len, num_layers, dropout, training, mode, lengths, packed_rows, backend):
    """The multi-layer, optionally bidirectional stack of ``torch.nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``
    (``mode``); hx is a tensor, or LSTM's (h0, c0), and h_n comes in the same form.

    x: padded (T, B, I), or with ``packed_rows`` (the flat rows t * B + b of packed input) the
    packed data (N, I); the output comes in the same form. ``weights`` holds, per layer and
    direction, (w_ih, w_hh[, b_ih, b_hh][, w_hr]), in ``nn.RNNBase._flat_weights``' order. Dropout masks
    between layers are drawn as ``F.dropout`` draws them, on the shape torch uses (the packed data
    for packed input), so ``torch.manual_seed`` gives torch's masks.
    """
    states = hx if isinstance(hx, tuple) else (hx,)
    _check_like(x, (*states, *weights), lambda i: ("hx", "cx")[i] if i < len(states) else f"weight {i - len(states)}")
    masks = []
    if dropout and training:
        h0 = states[0]
        shape = (seq_len, h0.shape[1], h0.shape[0] // num_layers * h0.shape[2])
        masks = [_dropout_mask(x.new_ones(shape), dropout, packed_rows) for _ in range(num_layers - 1)]
    return ops.rnn(x, hx, weights, masks, lengths.to(x.device), packed_rows, seq_len, num_layers, mode, backend)


def _dropout_mask(ones, p, packed_rows):
    """F.dropout of ones: the scaled keep-mask F.dropout would apply, from the same RNG draws."""
    with torch.no_grad():
        if packed_rows is None:
            return F.dropout(ones, p, training=True)
        flat = ones.view(-1, ones.shape[-1])
        kept = F.dropout(flat.index_select(0, packed_rows), p, training=True)
        return torch.zeros_like(flat).index_copy_(0, packed_rows, kept).view(ones.shape)
