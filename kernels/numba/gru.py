"""Numba CPU kernels of the GRU cell (torch's: gates r, z, n; b_hn inside the reset product):

    r = σ(x_r + h_r),  z = σ(x_z + h_z),  n = tanh(x_n + r ⊙ h_n),  h' = n + z ⊙ (h - n)

with x_* from proj = x @ W_ih^T + b_ih and h_* = h @ W_hh^T + b_hh, one (3H x H) product per step.
Forward stores [r, z, n, h_n] per step for backward (CONTRACTS.md). The task split, threading and
whole-layer GEMMs are those of every cell (``_runtime``, ``_linalg``).
"""

import numpy as np
import torch
from numba import njit, prange

from . import _runtime as rt
from ._linalg import layer_gradients, matmul, project, recurrent_product, transposed_for_rows
from ._runtime import JIT as _JIT
from .fast_tanh import tanh_float32, tanh_float64

GATES = 3
SAVED = 4
# float32 constants: a float64 literal would promote float32 arithmetic to float64 (Numba's
# rules), halving the vector width; against float64 values they promote exactly.
_HALF, _ONE = np.float32(0.5), np.float32(1.0)


@njit(inline="always", **_JIT)
def _tanh(z, single):
    return tanh_float32(z) if single else tanh_float64(z)


@njit(inline="always", **_JIT)
def _sigmoid(z, single):
    # Through tanh, which vectorises (a libm exp call would not); exact to tanh's error.
    return _HALF + _HALF * _tanh(_HALF * z, single)


@njit(**_JIT)
def _fwd_task(proj, w_hh, w_hh_t, b_hh, h0, lengths, single, d, b0, stride, rows, use_blas, out, h_n, saved):
    """The forward time loop of one direction for the batch rows b0 + i * stride, i < rows. An
    empty ``saved`` (inference) sends each step's gates to a scratch row instead."""
    hidden = h0.shape[2]
    h = np.empty((rows, hidden), proj.dtype)
    acc = np.empty((rows, GATES * hidden), proj.dtype)
    scratch = np.empty(SAVED * hidden, proj.dtype)
    store = saved.shape[0] != 0
    longest = rt.start_rows(h0, lengths, d, b0, stride, rows, h)
    rt.zero_tails(out, lengths, d, b0, stride, rows)
    if store:
        rt.zero_tails(saved, lengths, d, b0, stride, rows)  # deterministic: the custom op returns it
    descending = rt.is_descending(lengths, b0, stride, rows)
    bias = b_hh[d]
    for step in range(longest):
        live = rt.live_rows(lengths, b0, stride, rows, step, descending)
        recurrent_product(h, w_hh, w_hh_t, d, live, use_blas, acc)
        for i in range(live):
            b = b0 + i * stride
            length = lengths[b]
            if step < length:
                t = rt.time_index(step, length, d)
                x, a = proj[t, b, d], acc[i]
                keep = saved[t, b, d] if store else scratch
                for j in range(hidden):
                    r = _sigmoid(x[j] + a[j] + bias[j], single)
                    z = _sigmoid(x[hidden + j] + a[hidden + j] + bias[hidden + j], single)
                    h_n_j = a[2 * hidden + j] + bias[2 * hidden + j]
                    n = _tanh(x[2 * hidden + j] + r * h_n_j, single)
                    v = n + z * (h[i, j] - n)  # torch's order of operations
                    keep[j], keep[hidden + j], keep[2 * hidden + j], keep[3 * hidden + j] = r, z, n, h_n_j
                    h[i, j] = v
                    out[t, b, d, j] = v
    for i in range(rows):
        h_n[d, b0 + i * stride, :] = h[i, :]


@njit(**_JIT)
def _bwd_task(
    grad_out, grad_hn, out, saved, w_hh, h0, lengths, d, b0, stride, rows, use_blas, grad_proj, grad_rec, grad_h0
):
    """The reverse-time loop of one direction for the batch rows b0 + i * stride, i < rows."""
    hidden = out.shape[3]
    dh = np.empty((rows, hidden), out.dtype)
    d_rec = np.zeros((rows, GATES * hidden), out.dtype)
    dh_rec = np.empty((rows, hidden), out.dtype)
    longest = rt.start_rows(grad_hn, lengths, d, b0, stride, rows, dh)
    rt.zero_tails(grad_proj, lengths, d, b0, stride, rows)
    rt.zero_tails(grad_rec, lengths, d, b0, stride, rows)
    descending = rt.is_descending(lengths, b0, stride, rows)
    for step in range(longest - 1, -1, -1):
        live = rt.live_rows(lengths, b0, stride, rows, step, descending)
        for i in range(live):
            b = b0 + i * stride
            length = lengths[b]
            if step < length:
                t = rt.time_index(step, length, d)
                prev = h0[d, b] if step == 0 else out[t - 1 if d == 0 else t + 1, b, d]
                keep, g_out, g_x, g_h = saved[t, b, d], grad_out[t, b, d], grad_proj[t, b, d], grad_rec[t, b, d]
                for j in range(hidden):
                    r, z, n, h_n_j = keep[j], keep[hidden + j], keep[2 * hidden + j], keep[3 * hidden + j]
                    g = g_out[j] + dh[i, j]
                    dn = g * (_ONE - z) * (_ONE - n * n)
                    dz = g * (prev[j] - n) * z * (_ONE - z)
                    dr = dn * h_n_j * r * (_ONE - r)
                    g_x[j], g_x[hidden + j], g_x[2 * hidden + j] = dr, dz, dn
                    g_h[j], g_h[hidden + j], g_h[2 * hidden + j] = dr, dz, dn * r
                    d_rec[i, j], d_rec[i, hidden + j], d_rec[i, 2 * hidden + j] = dr, dz, dn * r
                    dh[i, j] = g * z
        matmul(d_rec[:live], w_hh[d], dh_rec[:live], use_blas)
        # Rows whose sequence has not started yet (in reverse order) keep their incoming dh.
        for i in range(live):
            if step < lengths[b0 + i * stride]:
                dh[i, :] += dh_rec[i, :]
    for i in range(rows):
        grad_h0[d, b0 + i * stride, :] = dh[i, :]


# The parallel drivers split rows across Numba's threads; the serial ones run one task at a time
# without entering a parallel region.
@njit(parallel=True, **_JIT)
def _gru_fwd_kernel(proj, w_hh, b_hh, h0, lengths, single, rows_per_task, use_blas, out, h_n, saved):
    batch, n_dir = proj.shape[1], proj.shape[2]
    w_hh_t = transposed_for_rows(w_hh, rows_per_task)
    for task in prange(n_dir * ((batch + rows_per_task - 1) // rows_per_task)):
        d, b0, stride, rows = rt.task_rows(task, batch, rows_per_task)
        _fwd_task(proj, w_hh, w_hh_t, b_hh, h0, lengths, single, d, b0, stride, rows, use_blas, out, h_n, saved)


@njit(**_JIT)
def _gru_fwd_serial_kernel(proj, w_hh, b_hh, h0, lengths, single, use_blas, out, h_n, saved):
    w_hh_t = transposed_for_rows(w_hh, proj.shape[1])
    for d in range(proj.shape[2]):
        _fwd_task(proj, w_hh, w_hh_t, b_hh, h0, lengths, single, d, 0, 1, proj.shape[1], use_blas, out, h_n, saved)


@njit(parallel=True, **_JIT)
def _gru_bwd_kernel(
    grad_out, grad_hn, out, saved, w_hh, h0, lengths, rows_per_task, use_blas, grad_proj, grad_rec, grad_h0
):
    batch, n_dir = out.shape[1], out.shape[2]
    for task in prange(n_dir * ((batch + rows_per_task - 1) // rows_per_task)):
        d, b0, stride, rows = rt.task_rows(task, batch, rows_per_task)
        _bwd_task(
            grad_out,
            grad_hn,
            out,
            saved,
            w_hh,
            h0,
            lengths,
            d,
            b0,
            stride,
            rows,
            use_blas,
            grad_proj,
            grad_rec,
            grad_h0,
        )


@njit(**_JIT)
def _gru_bwd_serial_kernel(grad_out, grad_hn, out, saved, w_hh, h0, lengths, use_blas, grad_proj, grad_rec, grad_h0):
    for d in range(out.shape[2]):
        _bwd_task(
            grad_out,
            grad_hn,
            out,
            saved,
            w_hh,
            h0,
            lengths,
            d,
            0,
            1,
            out.shape[1],
            use_blas,
            grad_proj,
            grad_rec,
            grad_h0,
        )


# Whole-layer kernels for small problems (see elman.py): one call for the layer and its GEMMs.
@njit(**_JIT)
def _layer_fwd_kernel(x, w_ih, b_ih, w_hh, b_hh, h0, lengths, single, keep_saved):
    proj = project(x, w_ih, b_ih)
    seq_len, batch, n_dir = proj.shape[0], proj.shape[1], proj.shape[2]
    hidden = h0.shape[2]
    out, h_n = np.empty((seq_len, batch, n_dir, hidden), x.dtype), np.empty_like(h0)
    saved = np.empty((seq_len if keep_saved else 0, batch, n_dir, SAVED * hidden), x.dtype)
    bias = b_hh if b_hh.size else np.zeros((n_dir, GATES * hidden), x.dtype)
    _gru_fwd_serial_kernel(proj, w_hh, bias, h0, lengths, single, False, out, h_n, saved)
    return out, h_n, saved


@njit(**_JIT)
def _layer_bwd_kernel(grad_out, grad_hn, x, w_ih, w_hh, out, saved, h0, lengths, input_grad):
    seq_len, batch, n_dir, hidden = out.shape
    grad_proj = np.empty((seq_len, batch, n_dir, GATES * hidden), x.dtype)
    grad_rec, grad_h0 = np.empty_like(grad_proj), np.empty_like(h0)
    _gru_bwd_serial_kernel(grad_out, grad_hn, out, saved, w_hh, h0, lengths, False, grad_proj, grad_rec, grad_h0)
    return grad_h0, layer_gradients(grad_proj, grad_rec, True, x, w_ih, out, h0, lengths, input_grad)


def _new_like(t, width):
    return t.new_empty(*t.shape[:3], width)


def forward(proj, w_hh, b_hh, h0, lengths, mode, keep_saved=True):
    """Run the recurrence; returns out (T, B, D, H), zero past each length, h_n (D, B, H) and
    (saved,), the per-step [r, z, n, h_n] (T, B, D, 4H); () without ``keep_saved`` (inference)."""
    if b_hh is None:
        raise ValueError("the GRU cell needs b_hh (D, 3H), zeros for bias=False")
    hidden = h0.shape[-1]
    seq_len, batch, n_dir, _ = proj.shape
    shape = (seq_len, batch, n_dir, hidden)
    rt.check_recurrence(GATES, shape, w_hh, b_hh, lengths, {"h0": h0}, proj=(proj, GATES * hidden))
    out, h_n = _new_like(proj, hidden), torch.empty_like(h0)
    saved = _new_like(proj if keep_saved else proj[:0], SAVED * hidden)
    args = (*rt.arrays(proj, w_hh, b_hh, h0, lengths), proj.dtype == torch.float32)
    rt.launch(
        _gru_fwd_kernel, _gru_fwd_serial_kernel, args, rt.arrays(out, h_n, saved), batch, n_dir, hidden, proj.dtype
    )
    return out, h_n, (saved,) if keep_saved else ()


def _gates_of(saved):
    if len(saved) != 1:
        raise ValueError("GRU backward needs the gates its forward saved: saved = (gates,), not ()")
    return saved[0]


def _check_biases(params):
    if len(params[0]) == 3:
        raise ValueError("a GRU direction takes (w_ih, w_hh) or (w_ih, w_hh, b_ih, b_hh), not one bias")


def backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode):
    """Reverse recurrence; returns grad_proj and grad_rec (T, B, D, 3H), the gradients of the input
    and recurrent projections, and grad_h0 (D, B, H)."""
    saved = _gates_of(saved)
    hidden = out.shape[3]
    states = {"grad_hn": grad_hn, "h0": h0}
    like_out = dict(out=(out, hidden), grad_out=(grad_out, hidden), saved=(saved, SAVED * hidden))
    rt.check_recurrence(GATES, out.shape, w_hh, None, lengths, states, **like_out)
    _, batch, n_dir, _ = out.shape
    grad_proj, grad_h0 = _new_like(out, GATES * hidden), torch.empty_like(grad_hn)
    grad_rec = torch.empty_like(grad_proj)
    args = rt.arrays(grad_out, grad_hn, out, saved, w_hh, h0, lengths)
    rt.launch(
        _gru_bwd_kernel,
        _gru_bwd_serial_kernel,
        args,
        rt.arrays(grad_proj, grad_rec, grad_h0),
        batch,
        n_dir,
        hidden,
        out.dtype,
    )
    return grad_proj, grad_rec, grad_h0


def fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, mode):
    return rt.fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, GATES)


def layer_forward(x, params, h0, lengths, mode, keep_saved=True):
    """The whole layer in one call, on one thread: (out (T, B, D, H), h_n, (saved,) or () without
    ``keep_saved``). params: per direction (w_ih, w_hh[, b_ih, b_hh]) as in ``nn.GRU``."""
    rt.check_layer(GATES, lengths, x, params, h0)
    _check_biases(params)
    w_ih, w_hh, b_ih, b_hh = rt.stacked_arrays(params, fold_biases=False)
    x_a, h0_a, lengths_a = rt.arrays(x, h0, lengths)
    single = x.dtype == torch.float32
    out, h_n, saved = _layer_fwd_kernel(x_a, w_ih, b_ih, w_hh, b_hh, h0_a, lengths_a, single, bool(keep_saved))
    return torch.from_numpy(out), torch.from_numpy(h_n), (torch.from_numpy(saved),) if keep_saved else ()


def layer_backward(grad_out, grad_hn, x, params, out, saved, h0, lengths, mode, input_grad):
    """Every gradient of a layer in one call, on one thread: (grad_x or None, grad_h0, per direction
    a tuple of gradients matching ``params``)."""
    saved = _gates_of(saved)
    _check_biases(params)
    hidden = h0.shape[-1]
    rt.check_layer(
        GATES,
        lengths,
        x,
        params,
        h0,
        grad_hn,
        grad_out=(grad_out, hidden),
        out=(out, hidden),
        saved=(saved, SAVED * hidden),
    )
    w_ih, w_hh, _, _ = rt.stacked_arrays(params, fold_biases=False)
    grad_h0, grads = _layer_bwd_kernel(
        *rt.arrays(grad_out, grad_hn, x), w_ih, w_hh, *rt.arrays(out, saved, h0, lengths), bool(input_grad)
    )
    grad_x, *grad_weights = grads
    grad_params = rt.gradient_tuples(params, *grad_weights, folded=False)
    return (torch.from_numpy(grad_x) if input_grad else None), torch.from_numpy(grad_h0), grad_params
