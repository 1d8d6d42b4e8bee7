"""Numba CPU kernels of the LSTM cell (torch's: gates i, f, g, o; both biases folded into proj):

    i, f, o = σ(·),  g = tanh(·)  of proj + h @ W_hh^T,  c' = f ⊙ c + i ⊙ g,  h' = o ⊙ tanh(c')

one (4H x P) product per step, and with proj_size a second one, h' = (o ⊙ tanh(c')) @ W_hr^T
(H x P). c stays in the task's buffer between steps. Forward stores [i, f, g, o, c'] per step for
backward (CONTRACTS.md, "Two-state cells"); backward recomputes tanh(c'). The task split,
threading and whole-layer GEMMs are those of every cell (``_runtime``, ``_linalg``).
"""

import math

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from . import _runtime as rt
from ._linalg import hand_matmul, layer_gradients, matmul, project, recurrent_product, transposed_for_rows
from ._runtime import JIT as _JIT
from .fast_tanh import tanh_float32, tanh_float64

GATES = 4
SAVED = 5
# float32 constants: a float64 literal would promote float32 arithmetic to float64 (Numba's
# rules), halving the vector width; against float64 values they promote exactly.
_HALF, _ONE = np.float32(0.5), np.float32(1.0)
# What the kernels get for an absent W_hr (one array of the same type, so one compilation).
_NO_PROJECTION = {torch.float32: np.empty((0, 0, 0), np.float32), torch.float64: np.empty((0, 0, 0), np.float64)}


def _tanh(z):
    """tanh in z's own precision (``fast_tanh``) inside the kernels."""
    return math.tanh(z)


@overload(_tanh, jit_options={"fastmath": rt.FASTMATH})
def _tanh_of_type(z):
    # Chosen by z's type when compiling. A runtime flag (gru.py's ``single``) leaves both precisions'
    # tanh in the loop; with the LSTM's five per element LLVM then no longer unswitches the loop,
    # and it runs scalar (forward 1.9x slower at T, B, H = 100, 16, 128; paired runs, one thread).
    if z == types.float32:
        return lambda z: tanh_float32(z)
    return lambda z: tanh_float64(z)


@njit(inline="always", **_JIT)
def _sigmoid(z):
    # Through tanh, which vectorises (a libm exp call would not); exact to tanh's error.
    return _HALF + _HALF * _tanh(_HALF * z)


@njit(**_JIT)
def _fwd_task(proj, w_hh, w_hh_t, w_hr, w_hr_t, h0, c0, lengths, d, b0, stride, rows, use_blas, out, h_n, c_n, saved):
    """The forward time loop of one direction for the batch rows b0 + i * stride, i < rows. An
    empty ``w_hr`` means no projection (h = m = o ⊙ tanh(c)); an empty ``saved`` (inference)
    sends each step's gates to a scratch row instead."""
    hidden, width = c0.shape[2], h0.shape[2]
    projects = w_hr.shape[0] != 0
    h = np.empty((rows, width), proj.dtype)
    c = np.empty((rows, hidden), proj.dtype)
    acc = np.empty((rows, GATES * hidden), proj.dtype)
    # m for the projection; zeroed, as rows that never start still take part in its product.
    m = np.zeros((rows if projects else 0, hidden), proj.dtype)
    h_new = np.empty((rows if projects else 0, width), proj.dtype)
    scratch = np.empty(SAVED * hidden, proj.dtype)
    store = saved.shape[0] != 0
    longest = rt.start_rows(h0, lengths, d, b0, stride, rows, h)
    rt.start_rows(c0, lengths, d, b0, stride, rows, c)
    rt.zero_tails(out, lengths, d, b0, stride, rows)
    if store:
        rt.zero_tails(saved, lengths, d, b0, stride, rows)  # deterministic: the custom op returns it
    descending = rt.is_descending(lengths, b0, stride, rows)
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
                    gi = _sigmoid(x[j] + a[j])
                    gf = _sigmoid(x[hidden + j] + a[hidden + j])
                    gg = _tanh(x[2 * hidden + j] + a[2 * hidden + j])
                    go = _sigmoid(x[3 * hidden + j] + a[3 * hidden + j])
                    cj = gf * c[i, j] + gi * gg  # torch's order of operations
                    c[i, j] = cj
                    keep[j], keep[hidden + j], keep[2 * hidden + j] = gi, gf, gg
                    keep[3 * hidden + j], keep[4 * hidden + j] = go, cj
                    v = go * _tanh(cj)
                    if projects:
                        m[i, j] = v
                    else:
                        h[i, j] = v
                        out[t, b, d, j] = v
        if projects:
            recurrent_product(m, w_hr, w_hr_t, d, live, use_blas, h_new)
            for i in range(live):
                b = b0 + i * stride
                length = lengths[b]
                if step < length:
                    t = rt.time_index(step, length, d)
                    h[i, :] = h_new[i, :]
                    out[t, b, d, :] = h_new[i, :]
    for i in range(rows):
        h_n[d, b0 + i * stride, :] = h[i, :]
        c_n[d, b0 + i * stride, :] = c[i, :]


@njit(**_JIT)
def _bwd_task(
    grad_out,
    grad_hn,
    grad_cn,
    saved,
    w_hh,
    w_hr,
    c0,
    lengths,
    d,
    b0,
    stride,
    rows,
    use_blas,
    grad_proj,
    grad_h0,
    grad_c0,
    grad_h,
):
    """The reverse-time loop of one direction for the batch rows b0 + i * stride, i < rows. dh
    carries the recurrent part of dLoss/dh, dc all of dLoss/dc; with W_hr, dm = (grad_out + dh)
    @ W_hr, one product per step, and that full dLoss/dh goes to grad_h."""
    hidden, width = c0.shape[2], grad_hn.shape[2]
    projects = w_hr.shape[0] != 0
    dh = np.empty((rows, width), grad_out.dtype)
    dc = np.empty((rows, hidden), grad_out.dtype)
    d_rec = np.zeros((rows, GATES * hidden), grad_out.dtype)
    dh_rec = np.empty((rows, width), grad_out.dtype)
    # Zeroed: rows whose sequence has not started (in reverse) still take part in the product.
    g_h = np.zeros((rows if projects else 0, width), grad_out.dtype)
    dm = np.empty((rows if projects else 0, hidden), grad_out.dtype)
    longest = rt.start_rows(grad_hn, lengths, d, b0, stride, rows, dh)
    rt.start_rows(grad_cn, lengths, d, b0, stride, rows, dc)
    rt.zero_tails(grad_proj, lengths, d, b0, stride, rows)
    if projects:
        rt.zero_tails(grad_h, lengths, d, b0, stride, rows)
    descending = rt.is_descending(lengths, b0, stride, rows)
    for step in range(longest - 1, -1, -1):
        live = rt.live_rows(lengths, b0, stride, rows, step, descending)
        if projects:
            for i in range(live):
                b = b0 + i * stride
                length = lengths[b]
                if step < length:
                    t = rt.time_index(step, length, d)
                    g_h[i, :] = grad_out[t, b, d, :] + dh[i, :]
                    grad_h[t, b, d, :] = g_h[i, :]
            matmul(g_h[:live], w_hr[d], dm[:live], use_blas)
        for i in range(live):
            b = b0 + i * stride
            length = lengths[b]
            if step < length:
                t = rt.time_index(step, length, d)
                # c_{t-1}: the previous step's saved c, or c0 at the sequence's first step.
                prev = c0[d, b] if step == 0 else saved[t - 1 if d == 0 else t + 1, b, d, (SAVED - 1) * hidden :]
                keep, g_out, g_x = saved[t, b, d], grad_out[t, b, d], grad_proj[t, b, d]
                for j in range(hidden):
                    gi, gf, gg = keep[j], keep[hidden + j], keep[2 * hidden + j]
                    go, cj = keep[3 * hidden + j], keep[4 * hidden + j]
                    dm_j = dm[i, j] if projects else g_out[j] + dh[i, j]
                    tanh_c = _tanh(cj)
                    dc_j = dc[i, j] + dm_j * go * (_ONE - tanh_c * tanh_c)
                    di = dc_j * gg * gi * (_ONE - gi)
                    df = dc_j * prev[j] * gf * (_ONE - gf)
                    dg = dc_j * gi * (_ONE - gg * gg)
                    do = dm_j * tanh_c * go * (_ONE - go)
                    g_x[j], g_x[hidden + j], g_x[2 * hidden + j], g_x[3 * hidden + j] = di, df, dg, do
                    d_rec[i, j], d_rec[i, hidden + j], d_rec[i, 2 * hidden + j] = di, df, dg
                    d_rec[i, 3 * hidden + j] = do
                    dc[i, j] = dc_j * gf
        matmul(d_rec[:live], w_hh[d], dh_rec[:live], use_blas)
        # Rows whose sequence has not started yet (in reverse order) keep their incoming dh.
        for i in range(live):
            if step < lengths[b0 + i * stride]:
                dh[i, :] = dh_rec[i, :]
    for i in range(rows):
        grad_h0[d, b0 + i * stride, :] = dh[i, :]
        grad_c0[d, b0 + i * stride, :] = dc[i, :]


# The parallel drivers split rows across Numba's threads; the serial ones run one task at a time
# without entering a parallel region.
@njit(parallel=True, **_JIT)
def _lstm_fwd_kernel(proj, w_hh, w_hr, h0, c0, lengths, rows_per_task, use_blas, out, h_n, c_n, saved):
    batch, n_dir = proj.shape[1], proj.shape[2]
    w_hh_t = transposed_for_rows(w_hh, rows_per_task)
    w_hr_t = transposed_for_rows(w_hr, rows_per_task)
    for task in prange(n_dir * ((batch + rows_per_task - 1) // rows_per_task)):
        d, b0, stride, rows = rt.task_rows(task, batch, rows_per_task)
        _fwd_task(
            proj,
            w_hh,
            w_hh_t,
            w_hr,
            w_hr_t,
            h0,
            c0,
            lengths,
            d,
            b0,
            stride,
            rows,
            use_blas,
            out,
            h_n,
            c_n,
            saved,
        )


@njit(**_JIT)
def _lstm_fwd_serial_kernel(proj, w_hh, w_hr, h0, c0, lengths, use_blas, out, h_n, c_n, saved):
    batch = proj.shape[1]
    w_hh_t, w_hr_t = transposed_for_rows(w_hh, batch), transposed_for_rows(w_hr, batch)
    for d in range(proj.shape[2]):
        _fwd_task(proj, w_hh, w_hh_t, w_hr, w_hr_t, h0, c0, lengths, d, 0, 1, batch, use_blas, out, h_n, c_n, saved)


@njit(parallel=True, **_JIT)
def _lstm_bwd_kernel(
    grad_out,
    grad_hn,
    grad_cn,
    saved,
    w_hh,
    w_hr,
    c0,
    lengths,
    rows_per_task,
    use_blas,
    grad_proj,
    grad_h0,
    grad_c0,
    grad_h,
):
    batch, n_dir = grad_out.shape[1], grad_out.shape[2]
    for task in prange(n_dir * ((batch + rows_per_task - 1) // rows_per_task)):
        d, b0, stride, rows = rt.task_rows(task, batch, rows_per_task)
        _bwd_task(
            grad_out,
            grad_hn,
            grad_cn,
            saved,
            w_hh,
            w_hr,
            c0,
            lengths,
            d,
            b0,
            stride,
            rows,
            use_blas,
            grad_proj,
            grad_h0,
            grad_c0,
            grad_h,
        )


@njit(**_JIT)
def _lstm_bwd_serial_kernel(
    grad_out, grad_hn, grad_cn, saved, w_hh, w_hr, c0, lengths, use_blas, grad_proj, grad_h0, grad_c0, grad_h
):
    for d in range(grad_out.shape[2]):
        _bwd_task(
            grad_out,
            grad_hn,
            grad_cn,
            saved,
            w_hh,
            w_hr,
            c0,
            lengths,
            d,
            0,
            1,
            grad_out.shape[1],
            use_blas,
            grad_proj,
            grad_h0,
            grad_c0,
            grad_h,
        )


# Whole-layer kernels for small problems (see elman.py): one call for the layer and its GEMMs.
@njit(**_JIT)
def _layer_fwd_kernel(x, w_ih, bias, w_hh, w_hr, h0, c0, lengths, keep_saved):
    proj = project(x, w_ih, bias)
    seq_len, batch, n_dir = proj.shape[0], proj.shape[1], proj.shape[2]
    hidden = c0.shape[2]
    out = np.empty((seq_len, batch, n_dir, h0.shape[2]), x.dtype)
    h_n, c_n = np.empty_like(h0), np.empty_like(c0)
    saved = np.empty((seq_len if keep_saved else 0, batch, n_dir, SAVED * hidden), x.dtype)
    _lstm_fwd_serial_kernel(proj, w_hh, w_hr, h0, c0, lengths, False, out, h_n, c_n, saved)
    return out, h_n, c_n, saved


@njit(**_JIT)
def _projection_gradient(grad_h, saved):
    """dW_hr[d] = sum over all T*B rows of grad_h_t^T (o_t ⊙ tanh(c_t)), one GEMM per direction
    (rows past a length are zero on both sides)."""
    seq_len, batch, n_dir, width = grad_h.shape
    hidden = saved.shape[3] // SAVED
    grad_w_hr = np.empty((n_dir, width, hidden), grad_h.dtype)
    g_t = np.empty((width, seq_len * batch), grad_h.dtype)
    m = np.empty((seq_len * batch, hidden), grad_h.dtype)
    for d in range(n_dir):
        for t in range(seq_len):
            for b in range(batch):
                row, keep = t * batch + b, saved[t, b, d]
                g_t[:, row] = grad_h[t, b, d, :]
                for j in range(hidden):
                    m[row, j] = keep[3 * hidden + j] * _tanh(keep[4 * hidden + j])
        hand_matmul(g_t, m, grad_w_hr[d])
    return grad_w_hr


@njit(**_JIT)
def _layer_bwd_kernel(grad_out, grad_hn, grad_cn, x, w_ih, w_hh, w_hr, out, saved, h0, c0, lengths, input_grad):
    seq_len, batch, n_dir, width = out.shape
    hidden = c0.shape[2]
    projects = w_hr.shape[0] != 0
    grad_proj = np.empty((seq_len, batch, n_dir, GATES * hidden), x.dtype)
    grad_h0, grad_c0 = np.empty_like(h0), np.empty_like(c0)
    grad_h = np.empty((seq_len if projects else 0, batch, n_dir, width), x.dtype)
    _lstm_bwd_serial_kernel(
        grad_out, grad_hn, grad_cn, saved, w_hh, w_hr, c0, lengths, False, grad_proj, grad_h0, grad_c0, grad_h
    )
    grads = layer_gradients(grad_proj, grad_proj, False, x, w_ih, out, h0, lengths, input_grad)
    grad_w_hr = _projection_gradient(grad_h, saved) if projects else np.empty((0, 0, 0), x.dtype)
    return grad_h0, grad_c0, grads, grad_w_hr


def _pair(states, name, parts):
    if not (isinstance(states, (tuple, list)) and len(states) == 2):
        raise ValueError(f"the LSTM cell takes {name} as the pair ({parts}), got {type(states).__name__}")
    return states


def _states(h0):
    return _pair(h0, "h0", "h0 (D, B, P), c0 (D, B, H)")


def _grad_states(grad_hn):
    return _pair(grad_hn, "grad_hn", "grad_h_n (D, B, P), grad_c_n (D, B, H)")


def _gates_of(saved):
    if len(saved) != 1:
        raise ValueError("LSTM backward needs the gates its forward saved: saved = (gates,), not ()")
    return saved[0]


def _dims(t, name, layout):
    if t.dim() != layout.count(",") + 1:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    return t.shape


def _projection_array(w_hr, dtype):
    return _NO_PROJECTION[dtype] if w_hr is None else w_hr.numpy(force=True)


_SHAPES = "(P = proj_size with w_hr, else H)"


def forward(proj, w_hh, b_hh, h0, lengths, mode, keep_saved=True, w_hr=None):
    """Run the recurrence; returns out (T, B, D, P), zero past each length, (h_n (D, B, P),
    c_n (D, B, H)) and (saved,), the per-step [i, f, g, o, c] (T, B, D, 5H); () without
    ``keep_saved`` (inference). h0 = (h0 (D, B, P), c0 (D, B, H)); w_hr (D, P, H) or None."""
    if b_hh is not None:
        raise ValueError("the LSTM cell takes b_hh folded into proj: pass b_hh=None")
    h0, c0 = _states(h0)
    seq_len, batch, n_dir, _ = _dims(proj, "proj", "(T, B, D, 4H)")
    hidden = c0.shape[-1]
    width = hidden if w_hr is None else h0.shape[-1]
    named = dict(
        proj=(proj, (seq_len, batch, n_dir, GATES * hidden)),
        w_hh=(w_hh, (n_dir, GATES * hidden, width)),
        h0=(h0, (n_dir, batch, width)),
        c0=(c0, (n_dir, batch, hidden)),
    )
    if w_hr is not None:
        named["w_hr"] = (w_hr, (n_dir, width, hidden))
    what = f"proj (T, B, D, 4H), w_hh (D, 4H, P), h0 (D, B, P), c0 (D, B, H), w_hr (D, P, H) or None {_SHAPES}"
    rt.check_shapes(lengths, seq_len, batch, what, **named)
    out, h_n, c_n = proj.new_empty(seq_len, batch, n_dir, width), torch.empty_like(h0), torch.empty_like(c0)
    saved = proj.new_empty(seq_len if keep_saved else 0, batch, n_dir, SAVED * hidden)
    proj_a, w_hh_a, h0_a, c0_a, lengths_a = rt.arrays(proj, w_hh, h0, c0, lengths)
    args = (proj_a, w_hh_a, _projection_array(w_hr, proj.dtype), h0_a, c0_a, lengths_a)
    rt.launch(
        _lstm_fwd_kernel,
        _lstm_fwd_serial_kernel,
        args,
        rt.arrays(out, h_n, c_n, saved),
        batch,
        n_dir,
        hidden,
        proj.dtype,
    )
    return out, (h_n, c_n), (saved,) if keep_saved else ()


def backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, w_hr=None):
    """Reverse recurrence; returns grad_proj (T, B, D, 4H) twice (both projections' gradient: the
    cell adds them) and (grad_h0 (D, B, P), grad_c0 (D, B, H)); with w_hr a fourth value, grad_h
    (T, B, D, P), dLoss/dh_t in full, for W_hr's gradient."""
    gates = _gates_of(saved)
    grad_h_n, grad_c_n = _grad_states(grad_hn)
    h0, c0 = _states(h0)
    seq_len, batch, n_dir, _ = _dims(out, "out", "(T, B, D, P)")
    hidden = c0.shape[-1]
    width = hidden if w_hr is None else h0.shape[-1]
    like_out, states = (seq_len, batch, n_dir, width), (n_dir, batch, width)
    named = dict(
        grad_out=(grad_out, like_out),
        out=(out, like_out),
        saved=(gates, (seq_len, batch, n_dir, SAVED * hidden)),
        grad_h_n=(grad_h_n, states),
        grad_c_n=(grad_c_n, (n_dir, batch, hidden)),
        w_hh=(w_hh, (n_dir, GATES * hidden, width)),
        h0=(h0, states),
        c0=(c0, (n_dir, batch, hidden)),
    )
    if w_hr is not None:
        named["w_hr"] = (w_hr, (n_dir, width, hidden))
    what = (
        f"grad_out and out (T, B, D, P), saved (T, B, D, 5H), grad_h_n and h0 (D, B, P), grad_c_n and c0 "
        f"(D, B, H), w_hh (D, 4H, P), w_hr (D, P, H) or None {_SHAPES}"
    )
    rt.check_shapes(lengths, seq_len, batch, what, **named)
    grad_proj = out.new_empty(seq_len, batch, n_dir, GATES * hidden)
    grad_h0, grad_c0 = torch.empty_like(h0), torch.empty_like(c0)
    grad_h = out.new_empty(seq_len if w_hr is not None else 0, batch, n_dir, width)
    grad_out_a, grad_h_n_a, grad_c_n_a, gates_a, w_hh_a, c0_a, lengths_a = rt.arrays(
        grad_out, grad_h_n, grad_c_n, gates, w_hh, c0, lengths
    )
    args = (grad_out_a, grad_h_n_a, grad_c_n_a, gates_a, w_hh_a, _projection_array(w_hr, out.dtype), c0_a, lengths_a)
    rt.launch(
        _lstm_bwd_kernel,
        _lstm_bwd_serial_kernel,
        args,
        rt.arrays(grad_proj, grad_h0, grad_c0, grad_h),
        batch,
        n_dir,
        hidden,
        out.dtype,
    )
    if w_hr is None:
        return grad_proj, grad_proj, (grad_h0, grad_c0)
    return grad_proj, grad_proj, (grad_h0, grad_c0), grad_h


def fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, mode):
    return rt.fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, GATES)


def _check_layer(lengths, x, params, states, grad_states=None, **like_out):
    """x (T, B, I); params per direction (w_ih (4H, I), w_hh (4H, P)[, biases (4H,)...][, w_hr
    (P, H)]), up to two biases, w_hr exactly when P != H; states and grad_states (if given)
    ((D, B, P), (D, B, H)); like_out: name -> (tensor, W) for (T, B, D, W) tensors."""
    h0, c0 = states
    n_dir, width, hidden = len(params), h0.shape[-1], c0.shape[-1]
    n_in, projects, n_params = params[0][0].shape[-1], width != hidden, len(params[0])
    shapes = [(GATES * hidden, n_in), (GATES * hidden, width)] + [(GATES * hidden,)] * (n_params - 2 - projects)
    shapes += [(width, hidden)] * projects
    fits = 2 + projects <= n_params <= 4 + projects and x.dim() == 3
    fits = fits and all(len(p) == n_params and all(t.shape == s for t, s in zip(p, shapes)) for p in params)
    if not fits:
        raise ValueError(
            f"expected x (T, B, I), per direction w_ih (4H, I), w_hh (4H, P), up to two biases (4H,) and, exactly "
            f"when P != H, w_hr (P, H), with h0 (D, B, P), c0 (D, B, H) {_SHAPES}; got x {tuple(x.shape)}, "
            f"h0 {tuple(h0.shape)}, c0 {tuple(c0.shape)}, parameters {[[tuple(t.shape) for t in p] for p in params]}"
        )
    seq_len, batch = x.shape[0], x.shape[1]
    named = dict(x=(x, (seq_len, batch, n_in)), h0=(h0, (n_dir, batch, width)), c0=(c0, (n_dir, batch, hidden)))
    if grad_states is not None:
        named["grad_h_n"] = (grad_states[0], (n_dir, batch, width))
        named["grad_c_n"] = (grad_states[1], (n_dir, batch, hidden))
    for name, (t, w) in like_out.items():
        named[name] = (t, (seq_len, batch, n_dir, w))
    what = f"x (T, B, I), h0 and grad_h_n (D, B, P), c0 and grad_c_n (D, B, H), (T, B, D, ...) outputs {_SHAPES}"
    rt.check_shapes(lengths, seq_len, batch, what, **named)
    for d, p in enumerate(params):
        for i, t in enumerate(p):
            if not (t.is_cpu and t.dtype == x.dtype and t.is_contiguous()):  # named only on error
                rt.check(lengths, batch, x=x, **{f"direction {d} parameter {i}": t})
    return projects


def _layer_arrays(params, projects, dtype):
    """(the parameters less W_hr, then NumPy w_ih, w_hh and the folded bias stacked over directions,
    and W_hr's, an empty one without)."""
    core = [p[:-1] for p in params] if projects else params
    w_ih, w_hh, bias, _ = rt.stacked_arrays(core, fold_biases=True)
    if not projects:
        return core, w_ih, w_hh, bias, _NO_PROJECTION[dtype]
    w_hr = [p[-1].numpy(force=True) for p in params]
    return core, w_ih, w_hh, bias, (w_hr[0][None] if len(w_hr) == 1 else np.stack(w_hr))


def layer_forward(x, params, h0, lengths, mode, keep_saved=True):
    """The whole layer in one call, on one thread: (out (T, B, D, P), (h_n, c_n), (saved,) or ()
    without ``keep_saved``). params: per direction (w_ih, w_hh[, b_ih, b_hh][, w_hr]) as in
    ``nn.LSTM``, or with one folded bias."""
    h0, c0 = _states(h0)
    projects = _check_layer(lengths, x, params, (h0, c0))
    _, w_ih, w_hh, bias, w_hr = _layer_arrays(params, projects, x.dtype)
    x_a, h0_a, c0_a, lengths_a = rt.arrays(x, h0, c0, lengths)
    out, h_n, c_n, saved = _layer_fwd_kernel(x_a, w_ih, bias, w_hh, w_hr, h0_a, c0_a, lengths_a, bool(keep_saved))
    states = (torch.from_numpy(h_n), torch.from_numpy(c_n))
    return torch.from_numpy(out), states, (torch.from_numpy(saved),) if keep_saved else ()


def layer_backward(grad_out, grad_hn, x, params, out, saved, h0, lengths, mode, input_grad):
    """Every gradient of a layer in one call, on one thread: (grad_x or None, (grad_h0, grad_c0),
    per direction a tuple of gradients matching ``params``, W_hr's included)."""
    gates = _gates_of(saved)
    grad_h_n, grad_c_n = _grad_states(grad_hn)
    h0, c0 = _states(h0)
    width, hidden = h0.shape[-1], c0.shape[-1]
    projects = _check_layer(
        lengths,
        x,
        params,
        (h0, c0),
        (grad_h_n, grad_c_n),
        grad_out=(grad_out, width),
        out=(out, width),
        saved=(gates, SAVED * hidden),
    )
    core, w_ih, w_hh, _, w_hr = _layer_arrays(params, projects, x.dtype)
    grad_h0, grad_c0, grads, grad_w_hr = _layer_bwd_kernel(
        *rt.arrays(grad_out, grad_h_n, grad_c_n, x),
        w_ih,
        w_hh,
        w_hr,
        *rt.arrays(out, gates, h0, c0, lengths),
        bool(input_grad),
    )
    grad_x, *grad_weights = grads
    grad_params = rt.gradient_tuples(core, *grad_weights, folded=True)
    if projects:
        grad_params = [(*g, torch.from_numpy(grad_w_hr[d])) for d, g in enumerate(grad_params)]
    states = (torch.from_numpy(grad_h0), torch.from_numpy(grad_c0))
    return (torch.from_numpy(grad_x) if input_grad else None), states, grad_params
