"""Numba CPU kernels of the Elman cell, ``h_t = act(proj_t + h_{t-1} @ W_hh^T)`` (tanh or relu;
both biases folded into proj).

For most layers the input projection and all weight gradients are GEMMs done by the caller and the
recurrence kernels carry only the sequential part; small layers run whole (GEMMs included, on one
thread) in the layer kernels, where torch's per-op cost would dominate. Layouts follow
CONTRACTS.md; what all cells share is in ``_runtime`` and ``_linalg``.
"""

import numpy as np
import torch
from numba import njit, prange

from . import _runtime as rt
from ._linalg import layer_gradients, matmul, project, recurrent_product, transposed_for_rows
from ._runtime import JIT as _JIT
from .fast_tanh import tanh_float32, tanh_float64

GATES = 1
_RELU = {"RNN_TANH": False, "RNN_RELU": True}


@njit(inline="always", **_JIT)
def _activation(z, relu, single):
    if relu:
        return 0.0 if z < 0.0 else z
    return tanh_float32(z) if single else tanh_float64(z)


@njit(**_JIT)
def _fwd_task(proj, w_hh, w_hh_t, h0, lengths, relu, single, d, b0, stride, rows, use_blas, out, h_n):
    """The whole forward time loop of one direction for the batch rows b0 + i * stride, i < rows.
    h @ W_hh^T reads w_hh_t, or w_hh itself once a single row is left."""
    hidden = proj.shape[3]
    h = np.empty((rows, hidden), proj.dtype)
    acc = np.empty((rows, hidden), proj.dtype)
    longest = rt.start_rows(h0, lengths, d, b0, stride, rows, h)
    rt.zero_tails(out, lengths, d, b0, stride, rows)
    descending = rt.is_descending(lengths, b0, stride, rows)
    for step in range(longest):
        live = rt.live_rows(lengths, b0, stride, rows, step, descending)
        recurrent_product(h, w_hh, w_hh_t, d, live, use_blas, acc)
        for i in range(live):
            b = b0 + i * stride
            length = lengths[b]
            if step < length:
                t = rt.time_index(step, length, d)
                for j in range(hidden):
                    z = acc[i, j] + proj[t, b, d, j]
                    v = _activation(z, relu, single)
                    h[i, j] = v
                    out[t, b, d, j] = v
    for i in range(rows):
        h_n[d, b0 + i * stride, :] = h[i, :]


@njit(**_JIT)
def _bwd_task(grad_out, grad_hn, out, w_hh, lengths, relu, d, b0, stride, rows, use_blas, grad_pre, grad_h0):
    """The whole reverse-time loop of one direction for the batch rows b0 + i * stride, i < rows.
    (dz @ W_hh keeps the row-wise product even for one row: its dot form would need W_hh^T, and
    the transposed copy costs more than the dot form saves above H = 64.)"""
    hidden = out.shape[3]
    dh = np.empty((rows, hidden), out.dtype)
    dz = np.zeros((rows, hidden), out.dtype)
    dh_prev = np.empty((rows, hidden), out.dtype)
    longest = rt.start_rows(grad_hn, lengths, d, b0, stride, rows, dh)
    rt.zero_tails(grad_pre, lengths, d, b0, stride, rows)
    descending = rt.is_descending(lengths, b0, stride, rows)
    for step in range(longest - 1, -1, -1):
        live = rt.live_rows(lengths, b0, stride, rows, step, descending)
        for i in range(live):
            b = b0 + i * stride
            length = lengths[b]
            if step < length:
                t = rt.time_index(step, length, d)
                for j in range(hidden):
                    g = grad_out[t, b, d, j] + dh[i, j]
                    y = out[t, b, d, j]
                    if relu:  # as torch's threshold_backward: only y <= 0 blocks, so NaN passes
                        g = 0.0 if y <= 0.0 else g
                    else:
                        g = g * (1.0 - y * y)
                    dz[i, j] = g
                    grad_pre[t, b, d, j] = g
        matmul(dz[:live], w_hh[d], dh_prev[:live], use_blas)
        # Rows whose sequence has not started yet (in reverse order) keep their incoming dh.
        for i in range(live):
            if step < lengths[b0 + i * stride]:
                dh[i, :] = dh_prev[i, :]
    for i in range(rows):
        grad_h0[d, b0 + i * stride, :] = dh[i, :]


# The parallel drivers split rows across Numba's threads (OpenMP, TBB or workqueue); the serial
# ones run a single task without entering a parallel region.
@njit(parallel=True, **_JIT)
def _elman_fwd_kernel(proj, w_hh, h0, lengths, relu, single, rows_per_task, use_blas, out, h_n):
    batch, n_dir = proj.shape[1], proj.shape[2]
    w_hh_t = transposed_for_rows(w_hh, rows_per_task)
    for task in prange(n_dir * ((batch + rows_per_task - 1) // rows_per_task)):
        d, b0, stride, rows = rt.task_rows(task, batch, rows_per_task)
        _fwd_task(proj, w_hh, w_hh_t, h0, lengths, relu, single, d, b0, stride, rows, use_blas, out, h_n)


@njit(**_JIT)
def _elman_fwd_serial_kernel(proj, w_hh, h0, lengths, relu, single, use_blas, out, h_n):
    w_hh_t = transposed_for_rows(w_hh, proj.shape[1])
    for d in range(proj.shape[2]):
        _fwd_task(proj, w_hh, w_hh_t, h0, lengths, relu, single, d, 0, 1, proj.shape[1], use_blas, out, h_n)


@njit(parallel=True, **_JIT)
def _elman_bwd_kernel(grad_out, grad_hn, out, w_hh, lengths, relu, rows_per_task, use_blas, grad_pre, grad_h0):
    batch, n_dir = out.shape[1], out.shape[2]
    for task in prange(n_dir * ((batch + rows_per_task - 1) // rows_per_task)):
        d, b0, stride, rows = rt.task_rows(task, batch, rows_per_task)
        _bwd_task(grad_out, grad_hn, out, w_hh, lengths, relu, d, b0, stride, rows, use_blas, grad_pre, grad_h0)


@njit(**_JIT)
def _elman_bwd_serial_kernel(grad_out, grad_hn, out, w_hh, lengths, relu, use_blas, grad_pre, grad_h0):
    for d in range(out.shape[2]):
        _bwd_task(grad_out, grad_hn, out, w_hh, lengths, relu, d, 0, 1, out.shape[1], use_blas, grad_pre, grad_h0)


# Whole-layer kernels for small problems: the GEMMs around the recurrence run here too, so the
# layer costs one call instead of one per torch op (each ~10 us, more than the arithmetic here).
# They allocate their outputs: a NumPy array made here costs far less than a torch tensor made and
# converted in Python (about 3 us each, in the budget of a ~100 us layer).
@njit(**_JIT)
def _layer_fwd_kernel(x, w_ih, bias, w_hh, h0, lengths, relu, single):
    proj = project(x, w_ih, bias)
    out, h_n = np.empty_like(proj), np.empty_like(h0)
    _elman_fwd_serial_kernel(proj, w_hh, h0, lengths, relu, single, False, out, h_n)
    return out, h_n


@njit(**_JIT)
def _layer_bwd_kernel(grad_out, grad_hn, x, w_ih, w_hh, out, h0, lengths, relu, input_grad):
    grad_pre, grad_h0 = np.empty_like(out), np.empty_like(h0)
    _elman_bwd_serial_kernel(grad_out, grad_hn, out, w_hh, lengths, relu, False, grad_pre, grad_h0)
    return grad_h0, layer_gradients(grad_pre, grad_pre, False, x, w_ih, out, h0, lengths, input_grad)


def forward(proj, w_hh, b_hh, h0, lengths, mode, keep_saved=True):
    """Run the recurrence; returns out (T, B, D, H), zero past each length, h_n (D, B, H) and ()."""
    if b_hh is not None:
        raise ValueError("the Elman cell takes b_hh folded into proj: pass b_hh=None")
    rt.check_recurrence(GATES, proj.shape, w_hh, None, lengths, {"h0": h0}, proj=(proj, proj.shape[3]))
    _, batch, n_dir, hidden = proj.shape
    out, h_n = torch.empty_like(proj), torch.empty_like(h0)
    args = (*rt.arrays(proj, w_hh, h0, lengths), _RELU[mode], proj.dtype == torch.float32)
    rt.launch(_elman_fwd_kernel, _elman_fwd_serial_kernel, args, rt.arrays(out, h_n), batch, n_dir, hidden, proj.dtype)
    return out, h_n, ()


def backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode):
    """Reverse recurrence; returns (grad_pre, grad_pre, grad_h0): dLoss/dz (T, B, D, H) is both
    projections' gradient (the cell adds them), and grad_h0 (D, B, H)."""
    rt.check_recurrence(
        GATES,
        out.shape,
        w_hh,
        None,
        lengths,
        {"grad_hn": grad_hn},
        out=(out, out.shape[3]),
        grad_out=(grad_out, out.shape[3]),
    )
    _, batch, n_dir, hidden = out.shape
    grad_pre, grad_h0 = torch.empty_like(out), torch.empty_like(grad_hn)
    args = (*rt.arrays(grad_out, grad_hn, out, w_hh, lengths), _RELU[mode])
    rt.launch(
        _elman_bwd_kernel, _elman_bwd_serial_kernel, args, rt.arrays(grad_pre, grad_h0), batch, n_dir, hidden, out.dtype
    )
    return grad_pre, grad_pre, grad_h0


def fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, mode):
    return rt.fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, GATES)


def layer_forward(x, params, h0, lengths, mode, keep_saved=True):
    """The whole layer (projection and recurrence) in one call, on one thread: (out (T, B, D, H),
    h_n, ()). params: per direction (w_ih, w_hh[, b_ih[, b_hh]]) as in ``nn.RNN``."""
    rt.check_layer(GATES, lengths, x, params, h0)
    w_ih, w_hh, bias, _ = rt.stacked_arrays(params, fold_biases=True)
    x_a, h0_a, lengths_a = rt.arrays(x, h0, lengths)
    out, h_n = _layer_fwd_kernel(x_a, w_ih, bias, w_hh, h0_a, lengths_a, _RELU[mode], x.dtype == torch.float32)
    return torch.from_numpy(out), torch.from_numpy(h_n), ()


def layer_backward(grad_out, grad_hn, x, params, out, saved, h0, lengths, mode, input_grad):
    """Every gradient of a layer in one call, on one thread: (grad_x or None, grad_h0, per direction
    a tuple of gradients matching ``params``). ``out`` is (T, B, D, H)."""
    hidden = h0.shape[-1]
    rt.check_layer(GATES, lengths, x, params, h0, grad_hn, grad_out=(grad_out, hidden), out=(out, hidden))
    w_ih, w_hh, _, _ = rt.stacked_arrays(params, fold_biases=True)
    grad_h0, grads = _layer_bwd_kernel(
        *rt.arrays(grad_out, grad_hn, x), w_ih, w_hh, *rt.arrays(out, h0, lengths), _RELU[mode], bool(input_grad)
    )
    grad_x, *grad_weights = grads
    grad_params = rt.gradient_tuples(params, *grad_weights, folded=True)
    return (torch.from_numpy(grad_x) if input_grad else None), torch.from_numpy(grad_h0), grad_params
