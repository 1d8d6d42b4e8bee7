"""The Numba launchers of every cell against the plain reference loop, at the kernel contract
(CONTRACTS.md, "Kernel launchers"), and the shared runtime and linear algebra behind them."""

import contextlib
import importlib
import os
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest
import torch

from fastrnn import reference
from fastrnn.cells import CELLS, split_params
from fastrnn.kernels.numba import _linalg, _runtime
from helpers import assert_close

MODES = list(CELLS)  # RNN_TANH, RNN_RELU, GRU, LSTM
SHAPES = [(1, 1, 1, 1), (7, 5, 2, 13), (30, 9, 2, 64), (12, 40, 1, 70), (3, 130, 1, 512)]  # (T, B, D, H)
# (mode, P): every cell, and LSTM with a projection W_hr to P = proj_size < H (P = 0: none).
VARIANTS = [(mode, 0) for mode in MODES] + [("LSTM", 3)]
# Every kernel each cell module compiles, by module (the warm-up test checks that none is missed).
KERNELS = {
    "elman": (
        "_elman_fwd_kernel",
        "_elman_fwd_serial_kernel",
        "_layer_fwd_kernel",
        "_elman_bwd_kernel",
        "_elman_bwd_serial_kernel",
        "_layer_bwd_kernel",
    ),
    "gru": (
        "_gru_fwd_kernel",
        "_gru_fwd_serial_kernel",
        "_layer_fwd_kernel",
        "_gru_bwd_kernel",
        "_gru_bwd_serial_kernel",
        "_layer_bwd_kernel",
    ),
    "lstm": (
        "_lstm_fwd_kernel",
        "_lstm_fwd_serial_kernel",
        "_layer_fwd_kernel",
        "_lstm_bwd_kernel",
        "_lstm_bwd_serial_kernel",
        "_layer_bwd_kernel",
    ),
}


def _module(mode):
    return importlib.import_module(f"fastrnn.kernels.numba.{CELLS[mode].kernel}")


def _tol(dtype, seq_len):
    return 1e-12 if dtype == torch.float64 else 2e-5 * (1 + seq_len / 16)


def _lengths(T, B, generator, descending):
    lengths = torch.randint(0, T + 1, (B,), generator=generator)
    lengths[0] = T
    if B > 2:
        lengths[-1] = 0  # a sequence with no steps: h_n = h0, gradients pass straight to grad_h0
    if descending:  # as in a PackedSequence: finished rows form a tail the kernels skip
        lengths = lengths.sort(descending=True).values
    return lengths


# A one-state cell's launchers take h0 (and h_n, grad_hn, grad_h0) as the tensor itself, a
# two-state cell's (LSTM) as the tuple (h, c).
def _states(h):
    """The launcher form -> a list of the state tensors."""
    return list(h) if isinstance(h, (tuple, list)) else [h]


def _like(states, form):
    """A list of state tensors -> the launcher form of ``form``."""
    return tuple(states) if isinstance(form, (tuple, list)) else states[0]


def _on_h(h, change):
    """``change`` applied to h (the first state) alone."""
    states = _states(h)
    return _like([change(states[0]), *states[1:]], h)


def _initial_states(mode, D, B, H, P, generator, dtype):
    """h0 (D, B, P or H), and for a two-state cell c0 (D, B, H)."""
    h0 = torch.randn(D, B, P or H, generator=generator, dtype=dtype)
    if CELLS[mode].states == 1:
        return h0
    return h0, torch.randn(D, B, H, generator=generator, dtype=dtype)


def _case(mode, T, B, D, H, dtype, seed=0, descending=False, P=0):
    """(proj, w_hh, b_hh, h0, lengths, projection) for the launchers; b_hh None for a cell that
    folds it; projection: {"w_hr": (D, P, H)} for an LSTM with P, else {} (the launchers' keyword)."""
    cell = CELLS[mode]
    g = torch.Generator().manual_seed(seed)
    width = cell.gates * H
    proj = torch.randn(T, B, D, width, generator=g, dtype=dtype)
    w_hh = torch.randn(D, width, P or H, generator=g, dtype=dtype) / H**0.5
    b_hh = None if cell.folds_recurrent_bias else torch.randn(D, width, generator=g, dtype=dtype)
    h0 = _initial_states(mode, D, B, H, P, g, dtype)
    projection = {"w_hr": torch.randn(D, P, H, generator=g, dtype=dtype) / H**0.5} if P else {}
    return proj, w_hh, b_hh, h0, _lengths(T, B, g, descending), projection


def _padding(T, lengths):
    """(T, B) True at the steps past each length."""
    return torch.arange(T)[:, None] >= lengths[None, :]


@contextlib.contextmanager
def _one_torch_thread():
    """The reference loop's many small torch ops, and their backward, on one thread: on a busy
    2-core machine every op that torch splits across two threads waits for a time slice (2 s
    instead of 2 ms for a loop of 30 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _reference_grad(outputs, inputs, grad_outputs):
    with _one_torch_thread():
        return torch.autograd.grad(outputs, inputs, grad_outputs)


@_one_torch_thread()
def _reference(mode, proj, w_hh, b_hh, h0, lengths, w_hr=None):
    """reference.layer fed x = proj and a W_ih that selects each direction's block of it; b_hh
    (zeros where the cell folds it, which is what folding means) joins the recurrent side."""
    T, B, D, width = proj.shape
    P = _states(h0)[0].shape[2]
    select = torch.zeros(D, width, D * width, dtype=proj.dtype)
    for d in range(D):
        select[d, :, d * width : (d + 1) * width] = torch.eye(width, dtype=proj.dtype)
    out, h_n = reference.layer(mode, proj.reshape(T, B, D * width), h0, select, w_hh, None, b_hh, lengths, w_hr)
    return out.view(T, B, D, P), h_n


def _previous_states(out, h0, lengths):
    """(T, B, D, H): the state each step started from (h0 at a sequence's first step); zero past
    each length. Direction 1 runs each sequence from its last valid step back to t = 0."""
    T, B, D, H = out.shape
    prev = torch.zeros_like(out)
    for b in range(B):
        L = int(lengths[b])
        if L == 0:
            continue
        prev[1:L, b, 0] = out[: L - 1, b, 0]
        prev[0, b, 0] = h0[0, b]
        if D == 2:
            prev[: L - 1, b, 1] = out[1:L, b, 1]
            prev[L - 1, b, 1] = h0[1, b]
    return prev


def _next_steps(values, final, lengths):
    """(T, B, D, W): what the step after each one holds (``final`` (D, B, W) after a sequence's
    last processed step); zero past each length: _previous_states in reverse."""
    T, B, D, _ = values.shape
    following = torch.zeros_like(values)
    for b in range(B):
        L = int(lengths[b])
        if L == 0:
            continue
        following[: L - 1, b, 0] = values[1:L, b, 0]
        following[L - 1, b, 0] = final[0, b]
        if D == 2:
            following[1:L, b, 1] = values[: L - 1, b, 1]
            following[0, b, 1] = final[1, b]
    return following


def _recurrent_gradients(grad_rec, out, h0, lengths):
    """dW_hh[d] = sum_t grad_rec_t^T h_prev_t and db_hh[d] = sum_t grad_rec_t."""
    prev = _previous_states(out, h0, lengths)
    grad_w_hh = torch.einsum("tbdg,tbdh->dgh", grad_rec, prev)
    return grad_w_hh, grad_rec.sum((0, 1))


def _projection_gradient(grad_h, gates):
    """dW_hr[d] = sum_t grad_h_t^T (o_t * tanh(c_t)), from the LSTM's saved [i, f, g, o, c]."""
    H = gates.shape[3] // 5
    return torch.einsum("tbdp,tbdh->dph", grad_h, gates[..., 3 * H : 4 * H] * torch.tanh(gates[..., 4 * H :]))


def _gru_gates(proj, w_hh, b_hh, prev):
    """[r, z, n, W_hn h_prev + b_hn] per step, from the inputs and the previous states."""
    h_proj = torch.einsum("tbdh,dgh->tbdg", prev, w_hh) + b_hh
    x_r, x_z, x_n = proj.chunk(3, -1)
    h_r, h_z, h_n = h_proj.chunk(3, -1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    return torch.cat([r, z, torch.tanh(x_n + r * h_n), h_n], -1)


def _lstm_gates(proj, w_hh, prev_h, prev_c):
    """[i, f, g, o, c] per step, from the inputs and the previous states h and c."""
    i, f, g, o = (proj + torch.einsum("tbdp,dgp->tbdg", prev_h, w_hh)).chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    return torch.cat([i, f, g, o, f * prev_c + i * g], -1)


def _check_saved(mode, saved, proj, w_hh, b_hh, h0, ref_out, lengths, padded, tol):
    """saved against the cell's gates recomputed from the reference's states (for LSTM's c_{t-1}
    the kernel's own c, so that each step's c_t is checked from the previous one)."""
    cell, T, B, D, H = CELLS[mode], *proj.shape[:3], proj.shape[3] // CELLS[mode].gates
    if not cell.saved_per_step:
        assert saved == ()
        return
    (gates,) = saved
    assert gates.shape == (T, B, D, cell.saved_per_step * H)
    valid = ~padded
    h0 = _states(h0)
    prev = _previous_states(ref_out.detach(), h0[0], lengths)
    if mode == "GRU":
        expected, what = _gru_gates(proj, w_hh, b_hh, prev), "saved [r, z, n, W_hn h + b_hn]"
    else:
        prev_c = _previous_states(gates[..., 4 * H :], h0[1], lengths)
        expected, what = _lstm_gates(proj, w_hh, prev, prev_c), "saved [i, f, g, o, c]"
    assert_close(gates[valid], expected[valid], tol, what)
    assert bool((gates[padded] == 0).all()), "saved must be exactly zero past each length"


def _random_like(states, generator):
    return _like([torch.randn(s.shape, generator=generator, dtype=s.dtype) for s in _states(states)], states)


def _assert_states(actual, expected, tol, what):
    actual, expected = _states(actual), _states(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} states, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, tol, f"{what}[{i}]")


def _states_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(_states(a), _states(b), strict=True))


# --- the recurrence launchers: forward(...) and backward(...) --------------------------------


def _recurrence_cases():
    for mode in MODES:
        for shape in SHAPES:
            yield mode, *shape, 0
    yield "LSTM", 7, 5, 2, 13, 5  # with W_hr: P = proj_size
    yield "LSTM", 30, 9, 2, 64, 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,T,B,D,H,P", list(_recurrence_cases()))
@pytest.mark.parametrize("descending", [False, True])
def test_forward_and_backward_match_reference(dtype, mode, T, B, D, H, P, descending):
    kernels, cell = _module(mode), CELLS[mode]
    proj, w_hh, b_hh, h0, lengths, projection = _case(mode, T, B, D, H, dtype, descending=descending, P=P)
    padded = _padding(T, lengths)
    proj_in = proj.clone()
    proj_in[padded] = float("nan")  # kernels never read proj past a length
    out, h_n, saved = kernels.forward(proj_in, w_hh, b_hh, h0, lengths, mode, **projection)
    ref_b_hh = torch.zeros(D, cell.gates * H, dtype=dtype) if b_hh is None else b_hh
    state_leaves = [t.clone().requires_grad_() for t in _states(h0)]
    proj_leaf, w_hh_leaf, b_hh_leaf = (t.clone().requires_grad_() for t in (proj, w_hh, ref_b_hh))
    projection_leaves = {name: t.clone().requires_grad_() for name, t in projection.items()}
    leaves = [proj_leaf, *state_leaves, w_hh_leaf, b_hh_leaf, *projection_leaves.values()]
    ref_out, ref_h_n = _reference(
        mode, proj_leaf, w_hh_leaf, b_hh_leaf, _like(state_leaves, h0), lengths, **projection_leaves
    )
    tol = _tol(dtype, T)
    assert out.shape == (T, B, D, P or H)
    _assert_states(h_n, ref_h_n, tol, "h_n")
    assert_close(out, ref_out, tol, "out")
    assert bool((out[padded] == 0).all()), "out must be exactly zero past each length"
    for final, initial in zip(_states(h_n), _states(h0)):
        assert torch.equal(final[:, lengths == 0], initial[:, lengths == 0]), "h_n is h0 where a sequence has no steps"
    _check_saved(mode, saved, proj, w_hh, b_hh, h0, ref_out, lengths, padded, tol)

    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grad_hn = _random_like(h_n, g)
    grads = kernels.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, **projection)
    assert len(grads) == 3 + len(projection)
    grad_proj, grad_rec, grad_h0 = grads[:3]
    ref = _reference_grad([ref_out, *_states(ref_h_n)], leaves, [grad_out, *_states(grad_hn)])
    n_states = cell.states
    ref_grad_proj, ref_grad_h0 = ref[0], _like(list(ref[1 : 1 + n_states]), h0)
    ref_grad_w_hh, ref_grad_b_hh = ref[1 + n_states : 3 + n_states]
    assert_close(grad_proj, ref_grad_proj, tol * 4, "grad_proj")
    _assert_states(grad_h0, ref_grad_h0, tol * 4, "grad_h0")
    assert bool((grad_proj[padded] == 0).all()), "grad_proj must be exactly zero past each length"
    assert bool((grad_rec[padded] == 0).all()), "grad_rec must be exactly zero past each length"
    if cell.folds_recurrent_bias:
        assert grad_rec is grad_proj, "a folded b_hh: both sides' gradient is one tensor"
    else:
        # r and z take their two sides as a sum; n's recurrent side is multiplied by r.
        r = saved[0][..., :H]
        assert torch.equal(grad_rec[..., : 2 * H], grad_proj[..., : 2 * H])
        assert_close(grad_rec[..., 2 * H :], grad_proj[..., 2 * H :] * r.where(~padded[..., None, None], 0), tol * 4)
    grad_w_hh, grad_b_hh = _recurrent_gradients(grad_rec, out, _states(h0)[0], lengths)
    assert_close(grad_w_hh, ref_grad_w_hh, tol * 4, "dW_hh from grad_rec")
    assert_close(grad_b_hh, ref_grad_b_hh, tol * 4, "db_hh from grad_rec")
    if projection:
        # grad_h: dLoss/dh_t in full, grad_out_t plus what the next step sends back through W_hh.
        (grad_h,) = grads[3:]
        sent_back = _next_steps(torch.einsum("tbdg,dgp->tbdp", grad_proj, w_hh), _states(grad_hn)[0], lengths)
        expected = (grad_out + sent_back).where(~padded[..., None, None], 0)
        assert_close(grad_h, expected, tol * 4, "grad_h")
        assert bool((grad_h[padded] == 0).all()), "grad_h must be exactly zero past each length"
        assert_close(_projection_gradient(grad_h, saved[0]), ref[-1], tol * 4, "dW_hr from grad_h")


@pytest.mark.parametrize("mode,P", VARIANTS)
@pytest.mark.parametrize("T,B", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("D", [1, 2])
def test_no_steps_or_no_rows(mode, P, T, B, D):
    """T = 0 (h_n = h0, grad_h0 = grad_hn) and B = 0 (empty outputs), on every path."""
    kernels, H = _module(mode), 5
    proj, w_hh, b_hh, h0, _, projection = _case(mode, max(T, 1), max(B, 1), D, H, torch.float64, P=P)
    proj = proj[:T, :B].contiguous()
    h0 = _like([s[:, :B].contiguous() for s in _states(h0)], h0)
    lengths = torch.full((B,), T)
    for rows_per_task in (None, 1):
        with _runtime.forced_plan(rows_per_task):
            out, h_n, saved = kernels.forward(proj, w_hh, b_hh, h0, lengths, mode, **projection)
            assert out.shape == (T, B, D, P or H) and _states_equal(h_n, h0)
            grad_hn = _like([torch.randn_like(s) for s in _states(h_n)], h_n)
            grads = kernels.backward(out, grad_hn, out, saved, w_hh, h0, lengths, mode, **projection)
            grad_proj, grad_rec, grad_h0 = grads[:3]
            assert grad_proj.shape == grad_rec.shape == proj.shape and _states_equal(grad_h0, grad_hn)
            assert all(g.shape == out.shape for g in grads[3:])
    x, params, _, _ = _layer_case(mode, max(T, 1), max(B, 1), 3, D, H, torch.float64, 4, False, P=P)
    x = x[:T, :B].contiguous()
    out, h_n, saved = kernels.layer_forward(x, params, h0, lengths, mode)
    assert out.shape == (T, B, D, P or H) and _states_equal(h_n, h0)
    grad_x, grad_h0, grads = kernels.layer_backward(out, grad_hn, x, params, out, saved, h0, lengths, mode, True)
    assert grad_x.shape == x.shape and _states_equal(grad_h0, grad_hn)
    assert all(bool((g == 0).all()) and g.shape == p.shape for gs, ps in zip(grads, params) for g, p in zip(gs, ps))


@pytest.mark.parametrize("mode,P", VARIANTS)
@pytest.mark.parametrize("T,B,D,H", [(7, 5, 2, 13), (3, 130, 1, 512)])
@pytest.mark.parametrize("rows_per_task", [None, 1, 3, "planned"])
def test_serial_and_parallel_drivers_agree(mode, P, T, B, D, H, rows_per_task):
    """The serial kernels (what one thread runs, BLAS included where planned) and the parallel
    ones at any task split compute the same recurrence, forward and backward (float64)."""
    kernels = _module(mode)
    proj, w_hh, b_hh, h0, lengths, projection = _case(mode, T, B, D, H, torch.float64, 2, True, P)
    ref_out, ref_h_n = _reference(mode, proj, w_hh, b_hh, h0, lengths, **projection)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    grad_hn = _random_like(ref_h_n, g)
    plan = contextlib.nullcontext() if rows_per_task == "planned" else _runtime.forced_plan(rows_per_task)
    with plan:
        out, h_n, saved = kernels.forward(proj, w_hh, b_hh, h0, lengths, mode, **projection)
        grads = kernels.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, **projection)
    assert_close(out, ref_out, 1e-12, "out")
    _assert_states(h_n, ref_h_n, 1e-12, "h_n")
    with _runtime.forced_plan(None):
        expected = kernels.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, **projection)
    assert len(grads) == len(expected) == 3 + len(projection)
    for name, a, e in zip(("grad_proj", "grad_rec", "grad_h0", "grad_h"), grads, expected):
        _assert_states(a, e, 1e-12, name)


@pytest.mark.parametrize("mode,P", VARIANTS)
@pytest.mark.parametrize("rows_per_task", [None, 2])
def test_inference_saves_nothing_and_computes_the_same(mode, P, rows_per_task):
    """keep_saved=False: saved = () (no gates stored), the same out and final states, on every path."""
    kernels = _module(mode)
    proj, w_hh, b_hh, h0, lengths, projection = _case(mode, 6, 5, 2, 7, torch.float32, 5, False, P)
    with _runtime.forced_plan(rows_per_task):
        out, h_n, _ = kernels.forward(proj, w_hh, b_hh, h0, lengths, mode, **projection)
        inference = kernels.forward(proj, w_hh, b_hh, h0, lengths, mode, False, **projection)
    assert inference[2] == () and torch.equal(inference[0], out) and _states_equal(inference[1], h_n)
    x, params, h0, lengths = _layer_case(mode, 6, 5, 3, 2, 7, torch.float32, 4, False, P=P)
    out, h_n, _ = kernels.layer_forward(x, params, h0, lengths, mode)
    inference = kernels.layer_forward(x, params, h0, lengths, mode, keep_saved=False)
    assert inference[2] == () and torch.equal(inference[0], out) and _states_equal(inference[1], h_n)


# --- the whole-layer launchers: layer_forward(...) and layer_backward(...) --------------------


def _layer_case(mode, T, B, I, D, H, dtype, n_params, descending, seed=0, P=0):
    """(x, params, h0, lengths): params per direction as torch holds them, (w_ih, w_hh[, biases
    (n_params - 2 of them)][, w_hr (P, H) with P])."""
    g = torch.Generator().manual_seed(seed)
    width = CELLS[mode].gates * H
    shapes = [(width, I), (width, P or H), (width,), (width,)][:n_params] + ([(P, H)] if P else [])
    params = [tuple(torch.randn(s, generator=g, dtype=dtype) / H**0.5 for s in shapes) for _ in range(D)]
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    h0 = _initial_states(mode, D, B, H, P, g, dtype)
    return x, params, h0, _lengths(T, B, g, descending)


@_one_torch_thread()
def _layer_reference(mode, x, params, h0, lengths):
    parts = [split_params(p, CELLS[mode].gates) for p in params]
    w_ih, w_hh = (torch.stack([p[i] for p in parts]) for i in (0, 1))
    b_ih, b_hh = ([torch.stack(b) for b in zip(*(p[2] for p in parts))] + [None, None])[:2]
    w_hr = torch.stack([p[3] for p in parts]) if parts[0][3] is not None else None
    out, h_n = reference.layer(mode, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, w_hr)
    return out.view(*x.shape[:2], len(params), _states(h0)[0].shape[2]), h_n


def _overlapping(tensors):
    """Whether any two of the (contiguous) tensors share a byte of memory."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    return any(start < end for (_, end), (start, _) in zip(spans, spans[1:]))


def _split_forward(mode, x, params, h0, lengths):
    """The split path by hand: the projection GEMM, then the recurrence launcher. Returns its
    result, the stacked w_ih and w_hh, and the launchers' projection keyword ({} or w_hr)."""
    cell, kernels = CELLS[mode], _module(mode)
    parts = [split_params(p, cell.gates) for p in params]
    w_ih, w_hh = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    biases = [torch.stack(b) for b in zip(*(p[2] for p in parts))]
    projection = {"w_hr": torch.stack([p[3] for p in parts])} if parts[0][3] is not None else {}
    width = w_ih.shape[1]
    b_ih = biases[0] if biases else torch.zeros(len(params), width, dtype=x.dtype)
    b_hh = biases[1] if len(biases) > 1 else torch.zeros_like(b_ih)
    proj = torch.einsum("tbi,dgi->tbdg", x, w_ih) + b_ih
    if cell.folds_recurrent_bias:
        proj, b_hh = proj + b_hh, None
    result = kernels.forward(proj.contiguous(), w_hh, b_hh, h0, lengths, mode, **projection)
    return result, w_ih, w_hh, projection


def _layer_cases():
    for mode in MODES:
        for n_params in (2, 3, 4) if CELLS[mode].folds_recurrent_bias else (2, 4):
            for T, B, I, D, H in [(1, 1, 1, 1, 1), (5, 3, 4, 2, 6), (9, 4, 3, 1, 17), (6, 7, 5, 2, 33)]:
                yield mode, n_params, T, B, I, D, H, 0
    for n_params in (2, 3, 4):  # LSTM with W_hr (proj_size P), after the biases
        for T, B, I, D, H, P in [(9, 4, 3, 1, 13, 5), (6, 7, 5, 2, 64, 16)]:
            yield "LSTM", n_params, T, B, I, D, H, P


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,n_params,T,B,I,D,H,P", list(_layer_cases()))
@pytest.mark.parametrize("descending", [False, True])
def test_layer_launchers_match_reference(dtype, mode, n_params, T, B, I, D, H, P, descending):
    kernels = _module(mode)
    x, params, h0, lengths = _layer_case(mode, T, B, I, D, H, dtype, n_params, descending, P=P)
    out, h_n, saved = kernels.layer_forward(x, params, h0, lengths, mode)
    x_leaf = x.clone().requires_grad_()
    state_leaves = [t.clone().requires_grad_() for t in _states(h0)]
    param_leaves = [tuple(t.clone().requires_grad_() for t in p) for p in params]
    ref_out, ref_h_n = _layer_reference(mode, x_leaf, param_leaves, _like(state_leaves, h0), lengths)
    tol = _tol(dtype, T)
    padded = _padding(T, lengths)
    assert_close(out, ref_out, tol, "out")
    _assert_states(h_n, ref_h_n, tol, "h_n")
    assert bool((out[padded] == 0).all()), "out must be exactly zero past each length"
    assert len(saved) == (1 if CELLS[mode].saved_per_step else 0)

    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grad_hn = _random_like(h_n, g)
    flat_leaves = [x_leaf, *state_leaves, *(t for p in param_leaves for t in p)]
    ref_grad_x, *ref_grads = _reference_grad([ref_out, *_states(ref_h_n)], flat_leaves, [grad_out, *_states(grad_hn)])
    n_states = len(state_leaves)
    ref_grad_h0, ref_grad_params = _like(ref_grads[:n_states], h0), ref_grads[n_states:]
    grad_tol = tol * 4
    grad_x, grad_h0, grad_params = kernels.layer_backward(
        grad_out, grad_hn, x, params, out, saved, h0, lengths, mode, True
    )
    assert_close(grad_x, ref_grad_x, grad_tol, "grad_x")
    _assert_states(grad_h0, ref_grad_h0, grad_tol, "grad_h0")
    per_dir = len(params[0])  # W_hr's included
    assert len(grad_params) == D and all(len(p) == per_dir for p in grad_params)
    flat_grads = [t for p in grad_params for t in p]
    for i, (a, e) in enumerate(zip(flat_grads, ref_grad_params)):
        assert_close(a, e, grad_tol, f"direction {i // per_dir} parameter {i % per_dir}")
    assert not _overlapping(flat_grads), "no two gradients may share memory (.grad is updated in place)"

    no_x, grad_h0_again, grads_again = kernels.layer_backward(
        grad_out, grad_hn, x, params, out, saved, h0, lengths, mode, False
    )
    assert no_x is None
    assert _states_equal(grad_h0_again, grad_h0)
    assert all(torch.equal(a, b) for p, q in zip(grads_again, grad_params) for a, b in zip(p, q))


@pytest.mark.parametrize("mode,n_params,P", [(m, n, 0) for m in MODES for n in (2, 4)] + [("LSTM", 4, 3)])
def test_either_backward_path_after_either_forward_path(mode, n_params, P):
    """layer_backward after the split forward, and the split backward after layer_forward."""
    kernels, dtype = _module(mode), torch.float64
    x, params, h0, lengths = _layer_case(mode, 6, 5, 3, 2, 7, dtype, n_params, descending=False, seed=4, P=P)
    x_leaf = x.clone().requires_grad_()
    state_leaves = [t.clone().requires_grad_() for t in _states(h0)]
    param_leaves = [tuple(t.clone().requires_grad_() for t in p) for p in params]
    ref_out, ref_h_n = _layer_reference(mode, x_leaf, param_leaves, _like(state_leaves, h0), lengths)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(ref_out.shape, generator=g, dtype=dtype)
    grad_hn = _random_like(ref_h_n, g)
    weight_leaves = [p[1] for p in param_leaves] + ([p[-1] for p in param_leaves] if P else [])
    ref_grads = _reference_grad(
        [ref_out, *_states(ref_h_n)], [x_leaf, *state_leaves, *weight_leaves], [grad_out, *_states(grad_hn)]
    )
    n_states = len(state_leaves)
    ref_grad_x, ref_grad_h0 = ref_grads[0], _like(list(ref_grads[1 : 1 + n_states]), h0)
    ref_grad_w_hh = torch.stack(ref_grads[1 + n_states : 1 + n_states + 2])
    ref_grad_w_hr = torch.stack(ref_grads[3 + n_states :]) if P else None

    (out, h_n, saved), w_ih, w_hh, projection = _split_forward(mode, x, params, h0, lengths)
    assert_close(out, ref_out, 1e-12, "split forward out")
    grad_x, grad_h0, grad_params = kernels.layer_backward(
        grad_out, grad_hn, x, params, out, saved, h0, lengths, mode, True
    )
    assert_close(grad_x, ref_grad_x, 1e-11, "layer_backward after forward: grad_x")
    _assert_states(grad_h0, ref_grad_h0, 1e-11, "layer_backward after forward: grad_h0")
    assert_close(torch.stack([p[1] for p in grad_params]), ref_grad_w_hh, 1e-11, "layer_backward: grad_w_hh")
    if P:
        assert_close(torch.stack([p[-1] for p in grad_params]), ref_grad_w_hr, 1e-11, "layer_backward: grad_w_hr")

    out, h_n, saved = kernels.layer_forward(x, params, h0, lengths, mode)
    grad_proj, grad_rec, grad_h0, *grad_h = kernels.backward(
        grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, **projection
    )
    assert_close(
        torch.einsum("tbdg,dgi->tbi", grad_proj, w_ih), ref_grad_x, 1e-11, "backward after layer_forward: grad_x"
    )
    _assert_states(grad_h0, ref_grad_h0, 1e-11, "backward after layer_forward: grad_h0")
    grad_w_hh, _ = _recurrent_gradients(grad_rec, out, _states(h0)[0], lengths)
    assert_close(grad_w_hh, ref_grad_w_hh, 1e-11, "backward after layer_forward: grad_w_hh")
    if P:
        grad_w_hr = _projection_gradient(grad_h[0], saved[0])
        assert_close(grad_w_hr, ref_grad_w_hr, 1e-11, "backward after layer_forward: grad_w_hr")


def test_fuses_whole_layer_counts_every_gate(monkeypatch):
    """Up to WHOLE_LAYER_MACS multiply-adds (T·B·D·G·H·(I+H)) a layer runs whole, half that with
    more than 2 threads; the GRU's three gates and the LSTM's four count, and -1 sends every layer
    to the split path."""
    elman, gru, lstm = _module("RNN_TANH"), _module("GRU"), _module("LSTM")
    limit = _runtime.WHOLE_LAYER_MACS
    assert torch.get_num_threads() <= 2
    assert elman.fuses_whole_layer(1, 1, limit - 1, 1, 1, "RNN_TANH")  # 1·(I + 1) = limit
    assert not elman.fuses_whole_layer(1, 1, limit, 1, 1, "RNN_RELU")
    assert elman.fuses_whole_layer(2, 4, limit // 32 - 2, 2, 2, "RNN_TANH")  # 2·4·2·2·(I + 2) = limit
    assert not elman.fuses_whole_layer(2, 4, limit // 32 - 1, 2, 2, "RNN_TANH")
    assert gru.fuses_whole_layer(1, 1, limit // 3 - 1, 1, 1, "GRU")  # 3·(I + 1) <= limit
    assert not gru.fuses_whole_layer(1, 1, limit // 3, 1, 1, "GRU")
    assert not gru.fuses_whole_layer(1, 1, limit - 1, 1, 1, "GRU")
    assert lstm.fuses_whole_layer(1, 1, limit // 4 - 1, 1, 1, "LSTM")  # 4·(I + 1) = limit
    assert not lstm.fuses_whole_layer(1, 1, limit // 4, 1, 1, "LSTM")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert elman.fuses_whole_layer(1, 1, limit // 2 - 1, 1, 1, "RNN_TANH")
        assert not elman.fuses_whole_layer(1, 1, limit // 2, 1, 1, "RNN_TANH")
        assert not gru.fuses_whole_layer(1, 1, limit // 6, 1, 1, "GRU")
        assert not lstm.fuses_whole_layer(1, 1, limit // 8, 1, 1, "LSTM")
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(_runtime, "WHOLE_LAYER_MACS", -1)
    assert not elman.fuses_whole_layer(1, 1, 1, 1, 1, "RNN_TANH")
    assert not gru.fuses_whole_layer(1, 1, 1, 1, 1, "GRU")
    assert not lstm.fuses_whole_layer(1, 1, 1, 1, 1, "LSTM")


# --- the shared linear algebra (_linalg) -------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (1, 64, 64), (3, 5, 2), (4, 4, 4), (9, 6, 7), (16, 130, 33), (5, 8, 24)])
def test_blocked_hand_matmul(n, k, m, dtype):
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)
    out = np.full((n, m), np.nan, dtype)
    _linalg.hand_matmul(a, w, out)
    tol = 1e-5 * (1 + k / 16) if dtype == "float32" else 1e-12
    np.testing.assert_allclose(out, a.astype("float64") @ w.astype("float64"), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (4, 64), (13, 7), (64, 64), (39, 13)])
def test_single_row_dot_products(n, k, dtype):
    rng = np.random.default_rng(1)
    v, w_rows = rng.standard_normal(k).astype(dtype), rng.standard_normal((n, k)).astype(dtype)
    out = np.full(n, np.nan, dtype)
    _linalg.row_dots(v, w_rows, out)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(out, w_rows.astype("float64") @ v.astype("float64"), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("D,rows,cols", [(1, 1, 1), (1, 3, 1), (2, 39, 13), (1, 96, 32), (2, 210, 70), (1, 33, 65)])
def test_tiled_transpose(D, rows, cols, dtype):
    """w[d].T per direction, contiguous, for the (D, G*H, H) recurrent weights (tiles of 32)."""
    w = np.random.default_rng(2).standard_normal((D, rows, cols)).astype(dtype)
    w_t = _linalg.transposed(w)
    assert w_t.shape == (D, cols, rows) and w_t.dtype == w.dtype and w_t.flags.c_contiguous
    np.testing.assert_array_equal(w_t, w.transpose(0, 2, 1))
    assert _linalg.transposed_for_rows(w, 1) is w, "one row per task takes dot products with W_hh itself"
    np.testing.assert_array_equal(_linalg.transposed_for_rows(w, 2), w.transpose(0, 2, 1))


# --- the task split, threads and BLAS plan (_runtime) ------------------------------------------


def test_every_driver_is_exercised_above():
    assert _runtime._threads() == 2, "conftest runs the suite with 2 threads"
    plans = {_runtime._plan(B, D, H, torch.float32) for B, D, H in [(1, 1, 1), (5, 2, 13), (130, 1, 512)]}
    assert plans == {(False, None), (False, 5), (_runtime.OPENBLAS is not None, 65)}
    # float64 takes BLAS from 8 rows a task at H >= 512; below H = 512 never.
    assert _runtime._plan(16, 1, 512, torch.float64) == (_runtime.OPENBLAS is not None, 8)
    assert _runtime._plan(14, 1, 512, torch.float64) == (False, 7)
    assert _runtime._plan(130, 1, 511, torch.float64) == (False, 65)


def test_rows_per_task_fills_threads_without_splitting_more():
    assert _runtime._rows_per_task(batch=1, n_dir=1, threads=2) == 1
    assert _runtime._rows_per_task(batch=64, n_dir=1, threads=2) == 32
    assert _runtime._rows_per_task(batch=64, n_dir=2, threads=2) == 64
    assert _runtime._rows_per_task(batch=5, n_dir=1, threads=4) == 2


@pytest.mark.parametrize("batch,rows_per_task", [(1, 1), (7, 3), (32, 16), (5, 2), (64, 64)])
def test_tasks_cover_every_row_once_interleaved(batch, rows_per_task):
    blocks = -(-batch // rows_per_task)
    covered = []
    for task in range(2 * blocks):  # two directions
        d, b0, stride, rows = _runtime.task_rows(task, batch, rows_per_task)
        assert rows <= rows_per_task and stride == blocks
        covered += [(d, b0 + i * stride) for i in range(rows)]
    assert sorted(covered) == [(d, b) for d in range(2) for b in range(batch)]


# --- argument checks ---------------------------------------------------------------------------

# Each: (cells it applies to, a change to the (proj, w_hh, b_hh, h0, lengths) of a (4, 3, 1, 3)
# float64 case, the error). Every change must be refused before a kernel runs. A change to h
# changes LSTM's h0 alone (its c0 has cases of its own).
_FOLDED = [mode for mode in MODES if CELLS[mode].folds_recurrent_bias]
_BAD_FORWARD = [
    (MODES, lambda p, w, b, h, n: (p.float(), w, b, h, n), TypeError),
    (
        MODES,
        lambda p, w, b, h, n: (
            p.half(),
            w.half(),
            b if b is None else b.half(),
            _like([s.half() for s in _states(h)], h),
            n,
        ),
        TypeError,
    ),
    (MODES, lambda p, w, b, h, n: (p.transpose(0, 1), w, b, h, n), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w[:, :, :2].contiguous(), b, h, n), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w[:, :-1].contiguous(), b, h, n), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w, b, h, n.int()), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w, b, h, n[:2]), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w, b, h, n + 1), ValueError),  # a length past T
    (
        MODES,
        lambda p, w, b, h, n: (p, w, b, _on_h(h, lambda s: s.transpose(1, 2).contiguous().transpose(1, 2)), n),
        ValueError,
    ),
    (MODES, lambda p, w, b, h, n: (p, w, b, _on_h(h, lambda s: s[:, :2].contiguous()), n), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w, b, _on_h(h, lambda s: s.float()), n), TypeError),
    (MODES, lambda p, w, b, h, n: (p[..., :-1].contiguous(), w, b, h, n), ValueError),
    (_FOLDED, lambda p, w, b, h, n: (p, w, torch.zeros(1, p.shape[3], dtype=p.dtype), h, n), ValueError),
    (["GRU"], lambda p, w, b, h, n: (p, w, None, h, n), ValueError),
    (["GRU"], lambda p, w, b, h, n: (p, w, b[:, :-1].contiguous(), h, n), ValueError),
    (["GRU"], lambda p, w, b, h, n: (p, w, b.float(), h, n), TypeError),
    (["GRU"], lambda p, w, b, h, n: (p, w, b.repeat_interleave(2, 1)[:, ::2], h, n), ValueError),
    (["LSTM"], lambda p, w, b, h, n: (p, w, b, h[0], n), ValueError),  # no c0
    (["LSTM"], lambda p, w, b, h, n: (p, w, b, (h[0], h[1][..., :2].contiguous()), n), ValueError),
    (["LSTM"], lambda p, w, b, h, n: (p, w, b, (h[0], h[1].float()), n), TypeError),
    (
        ["LSTM"],
        lambda p, w, b, h, n: (p, w, b, (h[0], h[1].transpose(1, 2).contiguous().transpose(1, 2)), n),
        ValueError,
    ),
]
_BAD_FORWARD_CASES = [(mode, i) for i, (modes, _, _) in enumerate(_BAD_FORWARD) for mode in modes]


@pytest.mark.parametrize("mode,index", _BAD_FORWARD_CASES)
def test_forward_launcher_rejects_bad_arguments(mode, index):
    _, bad, error = _BAD_FORWARD[index]
    args = bad(*_case(mode, 4, 3, 1, 3, torch.float64)[:5])
    with pytest.raises(error):
        _module(mode).forward(*args, mode)


@pytest.mark.parametrize("mode", MODES)
def test_launchers_refuse_tensors_off_the_cpu(mode):
    proj, w_hh, b_hh, h0, lengths, _ = _case(mode, 4, 3, 1, 3, torch.float64)
    proj, w_hh, b_hh, lengths = (t if t is None else t.to("meta") for t in (proj, w_hh, b_hh, lengths))
    h0 = _like([s.to("meta") for s in _states(h0)], h0)
    with pytest.raises(RuntimeError, match="CPU"):
        _module(mode).forward(proj, w_hh, b_hh, h0, lengths, mode)


@pytest.mark.parametrize("mode,P", VARIANTS)
def test_backward_launcher_checks_shapes_before_running(mode, P):
    kernels = _module(mode)
    proj, w_hh, b_hh, h0, lengths, projection = _case(mode, 4, 3, 1, 3 + P, torch.float64, P=P)
    out, h_n, saved = kernels.forward(proj, w_hh, b_hh, h0, lengths, mode, **projection)
    kernels.backward(out, h_n, out, saved, w_hh, h0, lengths, mode, **projection)
    bad = [
        ((out[:3].contiguous(), h_n, out, saved, w_hh, h0, lengths), ValueError),
        ((out, _on_h(h_n, lambda s: s[:, :2].contiguous()), out, saved, w_hh, h0, lengths), ValueError),
        ((out.float(), h_n, out, saved, w_hh, h0, lengths), TypeError),
        ((out, h_n, out.transpose(0, 1).contiguous().transpose(0, 1), saved, w_hh, h0, lengths), ValueError),
        ((out, h_n, out, saved, w_hh[:, :, :2].contiguous(), h0, lengths), ValueError),
        ((out, h_n, out, saved, w_hh, h0, lengths.int()), ValueError),
    ]
    if saved:
        bad += [
            ((out, h_n, out, (saved[0][..., :-1].contiguous(),), w_hh, h0, lengths), ValueError),
            ((out, h_n, out, (saved[0].float(),), w_hh, h0, lengths), TypeError),
            ((out, h_n, out, (), w_hh, h0, lengths), ValueError),
            ((out, h_n, out, saved, w_hh, _on_h(h0, lambda s: s[:, :2].contiguous()), lengths), ValueError),
        ]
    if CELLS[mode].states == 2:
        h, c = h0
        bad += [
            ((out, h_n[0], out, saved, w_hh, h0, lengths), ValueError),  # grad_hn without grad_c_n
            ((out, (h_n[0], h_n[1][..., :2].contiguous()), out, saved, w_hh, h0, lengths), ValueError),
            ((out, h_n, out, saved, w_hh, (h, c[:, :2].contiguous()), lengths), ValueError),
            ((out, h_n, out, saved, w_hh, (h, c.float()), lengths), TypeError),
        ]
    for args, error in bad:
        with pytest.raises(error):
            kernels.backward(*args, mode, **projection)


def test_lstm_projection_is_checked_before_running():
    """W_hr (D, P, H) must fit h0 and w_hh (D, 4H, P), and without it P must be H, both ways."""
    kernels = _module("LSTM")
    proj, w_hh, _, h0, lengths, projection = _case("LSTM", 4, 3, 1, 6, torch.float64, P=2)
    w_hr = projection["w_hr"]
    for bad, error in [
        (w_hr[..., :5].contiguous(), ValueError),
        (w_hr[:, :1].contiguous(), ValueError),
        (w_hr.float(), TypeError),
        (w_hr.transpose(1, 2).contiguous().transpose(1, 2), ValueError),
        (None, ValueError),  # h0 and w_hh P wide, but no projection
    ]:
        with pytest.raises(error):
            kernels.forward(proj, w_hh, None, h0, lengths, "LSTM", w_hr=bad)
    out, h_n, saved = kernels.forward(proj, w_hh, None, h0, lengths, "LSTM", w_hr=w_hr)
    with pytest.raises(ValueError):  # backward without the projection forward had
        kernels.backward(out, h_n, out, saved, w_hh, h0, lengths, "LSTM")
    with pytest.raises(ValueError):
        kernels.backward(out, h_n, out, saved, w_hh, h0, lengths, "LSTM", w_hr=w_hr[..., :5].contiguous())


@pytest.mark.parametrize("mode", MODES)
def test_layer_launchers_check_shapes_before_running(mode):
    kernels, width = _module(mode), CELLS[mode].gates * 6
    x, w, lengths = torch.randn(4, 3, 5), torch.randn(width, 6), torch.full((3,), 4)
    h0 = _initial_states(mode, 1, 3, 6, 0, torch.Generator(), torch.float32)
    params = [(torch.randn(width, 5), w, torch.zeros(width), torch.zeros(width))]
    out, h_n, saved = kernels.layer_forward(x, params, h0, lengths, mode)
    with pytest.raises(ValueError):
        kernels.layer_forward(x, [(params[0][0][:, :4].contiguous(), w)], h0, lengths, mode)
    with pytest.raises(ValueError):  # a bias of the wrong size
        kernels.layer_forward(x, [(*params[0][:3], torch.zeros(width - 1))], h0, lengths, mode)
    with pytest.raises(ValueError):  # a fifth parameter
        kernels.layer_forward(x, [(*params[0], torch.zeros(width))], h0, lengths, mode)
    with pytest.raises(ValueError):  # one parameter
        kernels.layer_forward(x, [params[0][:1]], h0, lengths, mode)
    with pytest.raises(ValueError):  # directions with different parameter counts
        two = _initial_states(mode, 2, 3, 6, 0, torch.Generator(), torch.float32)
        kernels.layer_forward(x, [params[0], params[0][:2]], two, lengths, mode)
    with pytest.raises(ValueError):  # W_hh of an Elman cell (H, H) in a gated cell, or of a GRU in an Elman cell
        other = torch.randn(6 if CELLS[mode].gates > 1 else 18, 6)
        kernels.layer_forward(x, [(params[0][0], other)], h0, lengths, mode)
    with pytest.raises(TypeError, match="direction 0 parameter 1"):
        kernels.layer_forward(x, [(params[0][0], w.double())], h0, lengths, mode)
    with pytest.raises(ValueError, match="direction 0 parameter 0"):
        kernels.layer_forward(x, [(params[0][0].t().contiguous().t(), w)], h0, lengths, mode)
    with pytest.raises(ValueError):
        kernels.layer_forward(x, params, h0, lengths[:2], mode)
    with pytest.raises(ValueError):
        kernels.layer_forward(x, params, h0, lengths + 1, mode)
    with pytest.raises(ValueError):
        kernels.layer_forward(x.transpose(0, 1).contiguous().transpose(0, 1), params, h0, lengths, mode)
    with pytest.raises(ValueError):
        kernels.layer_forward(x[..., :4].contiguous(), params, h0, lengths, mode)
    with pytest.raises(ValueError):
        kernels.layer_backward(out[:3].contiguous(), h_n, x, params, out, saved, h0, lengths, mode, True)
    with pytest.raises(ValueError):
        kernels.layer_backward(
            out, _on_h(h_n, lambda s: s[:, :2].contiguous()), x, params, out, saved, h0, lengths, mode, True
        )
    with pytest.raises(TypeError):
        kernels.layer_backward(out.double(), h_n, x, params, out, saved, h0, lengths, mode, True)
    if saved:
        with pytest.raises(ValueError):
            kernels.layer_backward(out, h_n, x, params, out, (saved[0][:3].contiguous(),), h0, lengths, mode, True)
        with pytest.raises(ValueError):
            kernels.layer_backward(out, h_n, x, params, out, (), h0, lengths, mode, True)
    if CELLS[mode].states == 2:
        h, c = h0
        with pytest.raises(ValueError):  # no c0
            kernels.layer_forward(x, params, h, lengths, mode)
        with pytest.raises(ValueError):  # c0 of another width than W_hh's gates: then a W_hr is missing
            kernels.layer_forward(x, params, (h, torch.zeros(1, 3, 7)), lengths, mode)
        with pytest.raises(TypeError):
            kernels.layer_forward(x, params, (h, c.double()), lengths, mode)
        with pytest.raises(ValueError):  # grad_hn without grad_c_n
            kernels.layer_backward(out, h_n[0], x, params, out, saved, h0, lengths, mode, True)
        # With W_hr (P = 2): W_hr of the wrong shape, or W_hh not P wide.
        projected = (torch.zeros(1, 3, 2), c)
        w_hh_p, w_hr = torch.randn(width, 2), torch.randn(2, 6)
        kernels.layer_forward(x, [(params[0][0], w_hh_p, w_hr)], projected, lengths, mode)
        for bad in [(params[0][0], w_hh_p, w_hr[:, :5].contiguous()), (params[0][0], w, w_hr), (params[0][0], w_hh_p)]:
            with pytest.raises(ValueError):
                kernels.layer_forward(x, [bad], projected, lengths, mode)
        with pytest.raises(TypeError, match="direction 0 parameter 2"):
            kernels.layer_forward(x, [(params[0][0], w_hh_p, w_hr.double())], projected, lengths, mode)


# --- compilation: the on-disk cache and the warm-up --------------------------------------------

_CACHE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from fastrnn.kernels.numba import _runtime, {module} as kernels
    mode, width = "{mode}", {width}
    p = torch.randn(3, 2, 1, width); w = torch.randn(1, width, 4); h = torch.zeros(1, 2, 4)
    h = (h, torch.zeros(1, 2, 4)) if {states} == 2 else h
    b = None if {folds} else torch.zeros(1, width)
    lengths = torch.tensor([3, 1])
    with _runtime.forced_plan(1):  # the parallel kernels, whatever the machine's thread count
        out, h_n, saved = kernels.forward(p, w, b, h, lengths, mode)
        kernels.backward(out, h_n, out, saved, w, h, lengths, mode)
    stats = [kernels.{fwd}.stats, kernels.{bwd}.stats]
    print(sum(sum(s.cache_hits.values()) for s in stats), sum(sum(s.cache_misses.values()) for s in stats))
""")


def test_compiled_kernels_are_cached_on_disk_and_reused():
    """A second process loads each cell module's parallel kernels from Numba's on-disk cache
    instead of compiling them again; this process is the first (it compiles or loads them, and
    Numba writes what it compiles to the cache at once).

    The cache is Numba's usual one (NUMBA_CACHE_DIR if set, else kernels/numba/__pycache__): a
    fresh directory would cost 20-30 s of compilation per module. It is keyed on each module's
    source file, so editing one while this test runs fails it."""
    scripts = {}
    for mode in ("RNN_TANH", "GRU", "LSTM"):
        cell = CELLS[mode]
        fwd, _, _, bwd, _, _ = KERNELS[cell.kernel]
        scripts[cell.kernel] = _CACHE_SCRIPT.format(
            module=cell.kernel,
            mode=mode,
            width=cell.gates * 4,
            folds=cell.folds_recurrent_bias,
            states=cell.states,
            fwd=fwd,
            bwd=bwd,
        )
        exec(scripts[cell.kernel], {})  # the same launches here: compiled (and cached) or loaded
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, script in scripts.items()
    }
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        assert stdout.split() == ["2", "0"], f"{name}: a second process should load both kernels, got {stdout}"


def test_warm_up_compiles_every_kernel_for_both_dtypes():
    from fastrnn.kernels.numba.__main__ import warm_up

    warm_up()
    modules = {cell.kernel for cell in CELLS.values()}
    assert modules == set(KERNELS)
    for name in modules:
        module = importlib.import_module(f"fastrnn.kernels.numba.{name}")
        found = {
            n
            for n, v in vars(module).items()
            if isinstance(v, numba.core.registry.CPUDispatcher) and n.endswith("_kernel")
        }
        assert found == set(KERNELS[name]), f"{name}: kernels {sorted(found)}, expected {sorted(KERNELS[name])}"
        for kernel_name in KERNELS[name]:
            kernel = getattr(module, kernel_name)
            dtypes = {str(signature[0].dtype) for signature in kernel.signatures}
            assert dtypes == {"float32", "float64"}, f"{name}.{kernel_name}: {dtypes}"


# --- threads: BLAS pinning, the workqueue layer ------------------------------------------------


@pytest.mark.skipif(_runtime.OPENBLAS is None, reason="SciPy's OpenBLAS not found")
def test_blas_pinning_restores_the_user_setting_across_threads():
    blas = _runtime.OPENBLAS
    original = blas.scipy_openblas_get_num_threads()
    blas.scipy_openblas_set_num_threads(2)
    inside, release = threading.Barrier(3), threading.Event()

    def pinned():
        with _runtime.single_threaded_blas():
            inside.wait()
            release.wait()

    workers = [threading.Thread(target=pinned) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        inside.wait()
        assert blas.scipy_openblas_get_num_threads() == 1
        release.set()
        for worker in workers:
            worker.join()
        assert blas.scipy_openblas_get_num_threads() == 2
    finally:
        release.set()
        blas.scipy_openblas_set_num_threads(original)


def test_python_threads_share_the_workqueue_layer_safely():
    """The workqueue layer aborts the process on concurrent parallel launches unless they are
    serialised; several Python threads calling the kernels of every cell must simply all finish."""
    script = textwrap.dedent("""
        import threading, torch
        from fastrnn.kernels.numba import _runtime, elman, gru, lstm
        torch.set_num_threads(2)
        one = torch.zeros(1, 8, 16); lengths = torch.full((8,), 20)
        cases = [
            (elman, "RNN_TANH", torch.randn(20, 8, 1, 16), torch.randn(1, 16, 16) * 0.1, None, one),
            (gru, "GRU", torch.randn(20, 8, 1, 48), torch.randn(1, 48, 16) * 0.1, torch.zeros(1, 48), one),
            (lstm, "LSTM", torch.randn(20, 8, 1, 64), torch.randn(1, 64, 16) * 0.1, None, (one, one)),
        ]
        def work():
            for _ in range(100):
                for kernels, mode, p, w, b, h in cases:
                    out, h_n, saved = kernels.forward(p, w, b, h, lengths, mode)
                    kernels.backward(out, h_n, out, saved, w, h, lengths, mode)
        threads = [threading.Thread(target=work) for _ in range(4)]
        with _runtime.forced_plan(4):  # the parallel kernels, whatever the core count
            [t.start() for t in threads]; [t.join() for t in threads]
        import numba; print(numba.threading_layer())
    """)
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["workqueue"]


# --- LSTM: two states (h, c), and W_hr with proj_size ----------------------------------------

LSTM_SHAPES = [(1, 1, 1, 1, 0), (7, 5, 2, 13, 0), (7, 5, 2, 13, 5), (30, 9, 2, 64, 16), (3, 130, 1, 512, 0)]


def _lstm_case(T, B, D, H, P, dtype, seed=0, descending=True):
    """(proj, w_hh, h0 = (h0, c0), lengths, w_hr or None) for the LSTM launchers; P = 0: no W_hr."""
    g = torch.Generator().manual_seed(seed)
    width = P or H
    proj = torch.randn(T, B, D, 4 * H, generator=g, dtype=dtype)
    w_hh = torch.randn(D, 4 * H, width, generator=g, dtype=dtype) / width**0.5
    w_hr = torch.randn(D, P, H, generator=g, dtype=dtype) / H**0.5 if P else None
    states = torch.randn(D, B, width, generator=g, dtype=dtype), torch.randn(D, B, H, generator=g, dtype=dtype)
    return proj, w_hh, states, _lengths(T, B, g, descending), w_hr


def _lstm_projection(w_hr):
    return {} if w_hr is None else {"w_hr": w_hr}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,B,D,H,P", LSTM_SHAPES)
@pytest.mark.parametrize("rows_per_task", [None, 1, "planned"])
def test_lstm_launchers_match_reference(dtype, T, B, D, H, P, rows_per_task):
    """forward: out, (h_n, c_n) and the saved [i, f, g, o, c]; backward: grad_proj (the same tensor
    as grad_rec), (grad_h0, grad_c0) and, with W_hr, grad_h; all against autograd through
    reference.layer, float64 tight and float32 scaled by T, on either driver."""
    kernels = _module("LSTM")
    proj, w_hh, (h0, c0), lengths, w_hr = _lstm_case(T, B, D, H, P, dtype)
    leaves = [t.clone().requires_grad_() for t in (proj, h0, c0, w_hh, *(() if w_hr is None else (w_hr,)))]
    select = torch.zeros(D, 4 * H, D * 4 * H, dtype=dtype)
    for d in range(D):
        select[d, :, d * 4 * H : (d + 1) * 4 * H] = torch.eye(4 * H, dtype=dtype)
    with _one_torch_thread():
        ref_out, (ref_h, ref_c) = reference.layer(
            "LSTM",
            leaves[0].reshape(T, B, -1),
            (leaves[1], leaves[2]),
            select,
            leaves[3],
            None,
            None,
            lengths,
            leaves[4] if P else None,
        )
    ref_out = ref_out.view(T, B, D, P or H)
    g = torch.Generator().manual_seed(5)
    upstream = [torch.randn(t.shape, generator=g, dtype=dtype) for t in (ref_out, ref_h, ref_c)]
    expected = _reference_grad((ref_out, ref_h, ref_c), leaves, upstream)
    tol = _tol(dtype, T)
    plan = contextlib.nullcontext() if rows_per_task == "planned" else _runtime.forced_plan(rows_per_task)
    with plan:
        out, (h_n, c_n), saved = kernels.forward(proj, w_hh, None, (h0, c0), lengths, "LSTM", **_lstm_projection(w_hr))
        results = kernels.backward(
            upstream[0], tuple(upstream[1:]), out, saved, w_hh, (h0, c0), lengths, "LSTM", **_lstm_projection(w_hr)
        )
    for name, a, e in (("out", out, ref_out), ("h_n", h_n, ref_h), ("c_n", c_n, ref_c)):
        assert_close(a, e.detach(), tol, name)
    gates = saved[0]
    assert gates.shape == (T, B, D, 5 * H) and not gates[_padding(T, lengths)].any()
    for b in range(B):  # the saved c of a sequence's last step in direction 0 is its c_n
        if lengths[b]:
            assert_close(gates[lengths[b] - 1, b, 0, 4 * H :], c_n[0, b], 0, "saved c")
    grad_proj, grad_rec, (grad_h0, grad_c0), *grad_h = results
    assert grad_rec is grad_proj and len(grad_h) == (1 if P else 0)
    assert not grad_proj[_padding(T, lengths)].any()
    for name, a, e in (
        ("grad_proj", grad_proj, expected[0]),
        ("grad_h0", grad_h0, expected[1]),
        ("grad_c0", grad_c0, expected[2]),
    ):
        assert_close(a, e, tol * 4, name)
    # dW_hh and dW_hr from the launchers' outputs as the glue forms them (CONTRACTS.md).
    prev = _previous_states(out, h0, lengths)
    assert_close(torch.einsum("tbdg,tbdp->dgp", grad_proj, prev), expected[3], tol * 4, "grad_w_hh")
    if P:
        assert not grad_h[0][_padding(T, lengths)].any()
        m = gates[..., 3 * H : 4 * H] * torch.tanh(gates[..., 4 * H :])
        assert_close(torch.einsum("tbdp,tbdh->dph", grad_h[0], m), expected[4], tol * 4, "grad_w_hr")


@pytest.mark.parametrize("T,B,D,H,P", [(7, 5, 2, 13, 0), (7, 5, 2, 13, 5)])
@pytest.mark.parametrize("n_biases", [0, 1, 2])
def test_lstm_layer_launchers_match_the_split_launchers(T, B, D, H, P, n_biases):
    """layer_forward / layer_backward (the whole layer, GEMMs inside) give what the split launchers
    and the glue's GEMMs give, W_hr's gradient included; no gates without keep_saved."""
    kernels = _module("LSTM")
    g = torch.Generator().manual_seed(1)
    width, I = P or H, 3
    shapes = [(4 * H, I), (4 * H, width), *[(4 * H,)] * n_biases, *([(P, H)] if P else [])]
    params = [tuple(torch.randn(s, generator=g, dtype=torch.float64) / 2 for s in shapes) for _ in range(D)]
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    states = (
        torch.randn(D, B, width, generator=g, dtype=torch.float64),
        torch.randn(D, B, H, generator=g, dtype=torch.float64),
    )
    lengths = _lengths(T, B, g, descending=False)
    out, finals, saved = kernels.layer_forward(x, params, states, lengths, "LSTM")
    inference = kernels.layer_forward(x, params, states, lengths, "LSTM", keep_saved=False)
    assert inference[2] == () and torch.equal(inference[0], out)
    leaves = [[t.clone().requires_grad_() for t in p] for p in params]
    flat = [t for p in leaves for t in p]
    with _one_torch_thread():
        ref_out, ref_finals = reference.rnn(x, states, flat, [], lengths, None, T, 1, "LSTM")
    assert_close(out.view(T, B, -1), ref_out.detach(), 1e-12, "out")
    for a, e in zip(finals, ref_finals, strict=True):
        assert_close(a, e.detach(), 1e-12, "final state")
    upstream = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, *finals)]
    grad_x, grad_states, grad_params = kernels.layer_backward(
        upstream[0], tuple(upstream[1:]), x, params, out, saved, states, lengths, "LSTM", True
    )
    expected = _reference_grad((ref_out, *ref_finals), flat, [upstream[0].view(T, B, -1), *upstream[1:]])
    actual = [t for p in grad_params for t in p]
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, 1e-11, f"parameter {i}")
    split_states = [t.contiguous() for t in states]
    ref = kernels.backward(
        upstream[0],
        tuple(upstream[1:]),
        out,
        saved,
        torch.stack([p[1] for p in params]),
        tuple(split_states),
        lengths,
        "LSTM",
        **({"w_hr": torch.stack([p[-1] for p in params])} if P else {}),
    )
    for a, e in zip(grad_states, ref[2], strict=True):
        assert_close(a, e, 1e-12, "grad state")
    assert grad_x.shape == x.shape


@pytest.mark.parametrize(
    "change",
    [
        "b_hh given",
        "c0 missing",
        "c0 wrong hidden",
        "h0 wrong width",
        "w_hr wrong shape",
        "saved missing",
        "lengths too long",
    ],
)
def test_lstm_launchers_reject_bad_arguments(change):
    kernels = _module("LSTM")
    proj, w_hh, (h0, c0), lengths, w_hr = _lstm_case(4, 3, 1, 6, 2, torch.float64)
    kwargs = dict(proj=proj, w_hh=w_hh, b_hh=None, h0=(h0, c0), lengths=lengths, mode="LSTM", w_hr=w_hr)
    if change == "saved missing":
        out, finals, _ = kernels.forward(**kwargs)
        with pytest.raises(ValueError, match="saved"):
            kernels.backward(out, finals, out, (), w_hh, (h0, c0), lengths, "LSTM", w_hr=w_hr)
        return
    kwargs.update(
        {
            "b_hh given": dict(b_hh=torch.zeros(1, 24, dtype=torch.float64)),
            "c0 missing": dict(h0=h0),
            "c0 wrong hidden": dict(h0=(h0, c0[..., :5])),
            "h0 wrong width": dict(h0=(c0, c0)),
            "w_hr wrong shape": dict(w_hr=w_hr[..., :5]),
            "lengths too long": dict(lengths=lengths + 5),
        }[change]
    )
    with pytest.raises((ValueError, TypeError)):
        kernels.forward(**kwargs)
