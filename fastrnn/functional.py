"""Functional Elman RNN: one fused layer (:func:`elman`) and the layer stack behind ``fastrnn.RNN``."""
import torch
import torch.nn.functional as F

from . import backends, reference
from . import ops

_NONLINEARITIES = ("tanh", "relu")


def elman(x, h0, w_ih, w_hh, bias=None, *, lengths=None, nonlinearity="tanh", batch_first=False, backend=None):
    """One Elman RNN layer in D directions, ``h_t = act(x_t W_ih^T + bias + h_{t-1} W_hh^T)``.

    Args:
        x: (T, B, I), or (B, T, I) if ``batch_first``.
        h0: (D, B, H) initial state, or None for zeros.
        w_ih: (D, H, I); w_hh: (D, H, H); bias: (D, H) (``b_ih + b_hh``) or None.
        lengths: (B,) valid steps per sequence (right padding), or None for all T. Direction 1
            runs each sequence backwards over its own valid steps. Padding must be finite: some
            GEMMs multiply it by zero gradients.
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
    backend = backends.resolve(backend, x.device, x.dtype)
    _check_like(x, (("h0", h0), ("w_ih", w_ih), ("w_hh", w_hh), ("bias", bias)))
    if backend == "torch":
        output, h_n = reference.elman(x, h0, w_ih, w_hh, bias, lengths, nonlinearity == "relu")
    else:
        per_direction = [(w_ih[d], w_hh[d]) + (() if bias is None else (bias[d],)) for d in range(n_dir)]
        weights = [w for group in per_direction for w in group]
        output, h_n = ops.rnn(x, h0, weights, [], lengths, valid_rows, 1, nonlinearity == "relu", backend)
    return (output.transpose(0, 1) if batch_first else output), h_n


def valid_rows_of(lengths, seq_len):
    """Flat indices t * B + b of the valid steps (t < lengths[b]) of a (T, B, ...) batch, ascending
    (the order of a PackedSequence's data), so that GEMMs can skip the padding."""
    steps = torch.arange(seq_len, device=lengths.device)
    return (steps[:, None] < lengths[None, :]).reshape(-1).nonzero().squeeze(1)


def _check_like(x, named_tensors):
    for name, t in named_tensors:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise RuntimeError(
                f"{name} is {t.dtype} on {t.device} but input is {x.dtype} on {x.device}: they must match"
            )


def packed_to_padded(data, batch_sizes):
    """PackedSequence data (N, *) -> padded (T, B, *), lengths (B,), and the flat row t * B + b of
    every packed row (ascending, as packed data is ordered), in the packed (sorted) batch order.
    Differentiable."""
    seq_len = batch_sizes.numel()
    batch = int(batch_sizes[0]) if seq_len else 0
    lengths = (batch_sizes[None, :] > torch.arange(batch)[:, None]).sum(1)
    rows = valid_rows_of(lengths, seq_len).to(data.device)
    padded = data.new_zeros(seq_len * batch, *data.shape[1:]).index_copy(0, rows, data)
    return padded.view(seq_len, batch, *data.shape[1:]), lengths, rows


def stack(x, hx, weights, *, num_layers, dropout, training, relu, lengths, packed_rows, backend):
    """The multi-layer, optionally bidirectional RNN of ``torch.nn.RNN`` on padded input.

    ``weights`` holds, per layer and direction, (w_ih, w_hh, b_ih, b_hh) or (w_ih, w_hh), in
    ``nn.RNN``'s order. Dropout masks between layers are drawn as ``F.dropout`` draws them, on the
    shape torch uses (the packed data when ``packed_rows``, the flat rows of packed input, are
    given), so ``torch.manual_seed`` gives torch's masks.
    """
    _check_like(x, (("hx", hx), *((f"weight {i}", w) for i, w in enumerate(weights))))
    masks = []
    if dropout and training:
        shape = (x.shape[0], x.shape[1], hx.shape[0] // num_layers * hx.shape[2])
        masks = [_dropout_mask(x.new_ones(shape), dropout, packed_rows) for _ in range(num_layers - 1)]
    return ops.rnn(x, hx, weights, masks, lengths.to(x.device), packed_rows, num_layers, relu, backend)


def _dropout_mask(ones, p, packed_rows):
    """F.dropout of ones: the scaled keep-mask F.dropout would apply, from the same RNG draws."""
    with torch.no_grad():
        if packed_rows is None:
            return F.dropout(ones, p, training=True)
        flat = ones.view(-1, ones.shape[-1])
        kept = F.dropout(flat.index_select(0, packed_rows), p, training=True)
        return torch.zeros_like(flat).index_copy_(0, packed_rows, kept).view(ones.shape)
