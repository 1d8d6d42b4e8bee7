"""Functional Elman RNN: one fused layer (:func:`elman`) and the layer stack behind ``fastrnn.RNN``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, ops, reference
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
    if x.dim() != 3:
        raise RuntimeError(f"input must have 3 dimensions, got {x.dim()}")
    if batch_first:
        x = x.transpose(0, 1)
    seq_len, batch, _ = x.shape
    n_dir, hidden = w_hh.shape[0], w_hh.shape[1]
    if w_ih.shape != (n_dir, hidden, x.shape[2]) or w_hh.shape != (n_dir, hidden, hidden):
        raise RuntimeError(
            f"expected w_ih (D, H, I) = {(n_dir, hidden, x.shape[2])} and w_hh (D, H, H), "
            f"got {tuple(w_ih.shape)} and {tuple(w_hh.shape)}"
        )
    if h0 is None:
        h0 = x.new_zeros(n_dir, batch, hidden)
    elif h0.shape != (n_dir, batch, hidden):
        raise RuntimeError(f"Expected hidden size {(n_dir, batch, hidden)}, got {list(h0.shape)}")
    valid_rows = None
    if lengths is None:
        lengths = torch.full((batch,), seq_len, dtype=torch.int64, device=x.device)
    elif lengths.shape != (batch,) or (batch and (int(lengths.min()) < 0 or int(lengths.max()) > seq_len)):
        raise ValueError(f"lengths must have shape ({batch},) with values in [0, {seq_len}]")
    else:
        lengths = lengths.to(device=x.device, dtype=torch.int64)
        if batch and int(lengths.min()) < seq_len:
            valid_rows = valid_rows_of(lengths, seq_len)
    backend = backends.resolve(backend, x.device, x.dtype, (x, h0, w_ih, w_hh, bias))
    _check_like(x, (h0, w_ih, w_hh, bias), ("h0", "w_ih", "w_hh", "bias").__getitem__)
    if backend == "torch":
        output, h_n = reference.elman(x, h0, w_ih, w_hh, bias, lengths, nonlinearity == "relu")
    else:
        per_direction = [(w_ih[d], w_hh[d]) + (() if bias is None else (bias[d],)) for d in range(n_dir)]
        weights = [w for group in per_direction for w in group]
        rows = x if valid_rows is None else select_rows(x, valid_rows)
        output, h_n = ops.rnn(rows, h0, weights, [], lengths, valid_rows, seq_len, 1, nonlinearity == "relu", backend)
        if valid_rows is not None:
            output = scatter_rows(output, valid_rows, seq_len, batch)
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


def stack(x, hx, weights, *, seq_len, num_layers, dropout, training, relu, lengths, packed_rows, backend):
    """The multi-layer, optionally bidirectional RNN of ``torch.nn.RNN``.

    x: padded (T, B, I), or with ``packed_rows`` (the flat rows t * B + b of packed input) the
    packed data (N, I); the output comes in the same form. ``weights`` holds, per layer and
    direction, (w_ih, w_hh, b_ih, b_hh) or (w_ih, w_hh), in ``nn.RNN``'s order. Dropout masks
    between layers are drawn as ``F.dropout`` draws them, on the shape torch uses (the packed data
    for packed input), so ``torch.manual_seed`` gives torch's masks.
    """
    _check_like(x, (hx, *weights), lambda i: "hx" if i == 0 else f"weight {i - 1}")
    masks = []
    if dropout and training:
        shape = (seq_len, hx.shape[1], hx.shape[0] // num_layers * hx.shape[2])
        masks = [_dropout_mask(x.new_ones(shape), dropout, packed_rows) for _ in range(num_layers - 1)]
    return ops.rnn(x, hx, weights, masks, lengths.to(x.device), packed_rows, seq_len, num_layers, relu, backend)


def _dropout_mask(ones, p, packed_rows):
    """F.dropout of ones: the scaled keep-mask F.dropout would apply, from the same RNG draws."""
    with torch.no_grad():
        if packed_rows is None:
            return F.dropout(ones, p, training=True)
        flat = ones.view(-1, ones.shape[-1])
        kept = F.dropout(flat.index_select(0, packed_rows), p, training=True)
        return torch.zeros_like(flat).index_copy_(0, packed_rows, kept).view(ones.shape)
