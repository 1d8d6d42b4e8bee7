"""The pointwise step of each cell, forward and backward, selected by ``CELL`` (the torch mode string,
a ``tl.constexpr``: each cell compiles to its own kernel and the other cells' branches vanish).

Inputs are float32 tiles: x_* of the input projection (b_ih and, for Elman, b_hh folded in) and
a_* = h @ W_h*^T + b_h* of the recurrent one, for torch's gates (GRU: r, z, n; LSTM: i, f, g, o,
whose step takes their sums, both biases being folded into x_*).
"""

import triton
import triton.language as tl

from ._common import _tanh


@triton.jit
def _sigmoid(z):
    # exp of -|z| only, so large |z| cannot overflow; equal to torch's 1 / (1 + exp(-z)) to
    # float32 round-off on both sides.
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _elman_forward(z, CELL: tl.constexpr):
    """h_t = act(x + a) from z = x + a."""
    if CELL == "RNN_RELU":
        return tl.where(z < 0, 0.0, z)  # not tl.maximum: it drops NaN like torch.relu must not
    else:
        return _tanh(z)


@triton.jit
def _elman_backward(g, y, CELL: tl.constexpr):
    """dLoss/dz from g = dLoss/dh_t and the output y = act(z): tanh' = 1 - y^2, relu' = [y > 0]
    (as torch's threshold_backward: only y <= 0 blocks, so a NaN passes through)."""
    if CELL == "RNN_RELU":
        return tl.where(y <= 0, 0.0, g)
    else:
        return g * (1.0 - y * y)


@triton.jit
def _gru_forward(x_r, x_z, x_n, a_r, a_z, a_n, h):
    """(r, z, n, h_t) of torch's GRU; a_n keeps b_hn inside the reset product."""
    r = _sigmoid(x_r + a_r)
    z = _sigmoid(x_z + a_z)
    n = _tanh(x_n + r * a_n)
    return r, z, n, n + z * (h - n)  # torch's order of operations for (1 - z) * n + z * h


@triton.jit
def _gru_backward(g, r, z, n, a_n, h_prev):
    """(dr, dz, dn), the gradients of the gate pre-activations, from g = dLoss/dh_t and the saved
    gates. dLoss/dh_{t-1} is g * z plus [dr, dz, dn * r] @ W_hh."""
    dn = g * (1.0 - z) * (1.0 - n * n)
    dz = g * (h_prev - n) * z * (1.0 - z)
    dr = dn * a_n * r * (1.0 - r)
    return dr, dz, dn


@triton.jit
def _lstm_forward(z_i, z_f, z_g, z_o, c):
    """(i, f, g, o, c_t, m_t) of torch's LSTM from the gates' pre-activations z_* (both
    projections, both biases) and c = c_{t-1}; m_t = o * tanh(c_t) is h_t, or what W_hr projects."""
    i = _sigmoid(z_i)
    f = _sigmoid(z_f)
    g = _tanh(z_g)
    o = _sigmoid(z_o)
    c = f * c + i * g  # torch's order of operations
    return i, f, g, o, c, o * _tanh(c)


@triton.jit
def _lstm_backward(dm, dc, i, f, g, o, c, c_prev):
    """(di, df, dg, do, dLoss/dc_{t-1}), from dm = dLoss/dm_t (dLoss/dh_t in full without W_hr,
    times W_hr with it), dc = dLoss/dc_t from step t + 1, the saved gates and c_t, and c_{t-1}.
    tanh(c_t) is recomputed, not saved. dLoss/dh_{t-1} is then [di, df, dg, do] @ W_hh."""
    tanh_c = _tanh(c)
    dc = dc + dm * o * (1.0 - tanh_c * tanh_c)
    di = dc * g * i * (1.0 - i)
    df = dc * c_prev * f * (1.0 - f)
    dg = dc * i * (1.0 - g * g)
    do = dm * tanh_c * o * (1.0 - o)
    return di, df, dg, do, dc * f
