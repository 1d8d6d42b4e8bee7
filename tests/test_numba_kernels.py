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
from fastrnn.cells import CELLS
from fastrnn.kernels.numba import _linalg, _runtime
from helpers import assert_close

MODES = list(CELLS)  # RNN_TANH, RNN_RELU, GRU
SHAPES = [(1, 1, 1, 1), (7, 5, 2, 13), (30, 9, 2, 64), (12, 40, 1, 70), (3, 130, 1, 512)]  # (T, B, D, H)
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


def _case(mode, T, B, D, H, dtype, seed=0, descending=False):
    """(proj, w_hh, b_hh, h0, lengths) for the launchers; b_hh None for a cell that folds it."""
    cell = CELLS[mode]
    g = torch.Generator().manual_seed(seed)
    width = cell.gates * H
    proj = torch.randn(T, B, D, width, generator=g, dtype=dtype)
    w_hh = torch.randn(D, width, H, generator=g, dtype=dtype) / H**0.5
    b_hh = None if cell.folds_recurrent_bias else torch.randn(D, width, generator=g, dtype=dtype)
    h0 = torch.randn(D, B, H, generator=g, dtype=dtype)
    return proj, w_hh, b_hh, h0, _lengths(T, B, g, descending)


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
def _reference(mode, proj, w_hh, b_hh, h0, lengths):
    """reference.layer fed x = proj and a W_ih that selects each direction's block of it; b_hh
    (zeros where the cell folds it, which is what folding means) joins the recurrent side."""
    T, B, D, width = proj.shape
    H = h0.shape[2]
    select = torch.zeros(D, width, D * width, dtype=proj.dtype)
    for d in range(D):
        select[d, :, d * width : (d + 1) * width] = torch.eye(width, dtype=proj.dtype)
    out, h_n = reference.layer(mode, proj.reshape(T, B, D * width), h0, select, w_hh, None, b_hh, lengths)
    return out.view(T, B, D, H), h_n


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


def _recurrent_gradients(grad_rec, out, h0, lengths):
    """dW_hh[d] = sum_t grad_rec_t^T h_prev_t and db_hh[d] = sum_t grad_rec_t."""
    prev = _previous_states(out, h0, lengths)
    grad_w_hh = torch.einsum("tbdg,tbdh->dgh", grad_rec, prev)
    return grad_w_hh, grad_rec.sum((0, 1))


def _gru_gates(proj, w_hh, b_hh, prev):
    """[r, z, n, W_hn h_prev + b_hn] per step, from the inputs and the previous states."""
    h_proj = torch.einsum("tbdh,dgh->tbdg", prev, w_hh) + b_hh
    x_r, x_z, x_n = proj.chunk(3, -1)
    h_r, h_z, h_n = h_proj.chunk(3, -1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    return torch.cat([r, z, torch.tanh(x_n + r * h_n), h_n], -1)


# --- the recurrence launchers: forward(...) and backward(...) --------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,B,D,H", SHAPES)
@pytest.mark.parametrize("descending", [False, True])
def test_forward_and_backward_match_reference(dtype, mode, T, B, D, H, descending):
    kernels, cell = _module(mode), CELLS[mode]
    proj, w_hh, b_hh, h0, lengths = _case(mode, T, B, D, H, dtype, descending=descending)
    padded = _padding(T, lengths)
    proj_in = proj.clone()
    proj_in[padded] = float("nan")  # kernels never read proj past a length
    out, h_n, saved = kernels.forward(proj_in, w_hh, b_hh, h0, lengths, mode)
    ref_b_hh = torch.zeros(D, cell.gates * H, dtype=dtype) if b_hh is None else b_hh
    leaves = [t.clone().requires_grad_() for t in (proj, h0, w_hh, ref_b_hh)]
    proj_leaf, h0_leaf, w_hh_leaf, b_hh_leaf = leaves
    ref_out, ref_h_n = _reference(mode, proj_leaf, w_hh_leaf, b_hh_leaf, h0_leaf, lengths)
    tol = _tol(dtype, T)
    assert out.shape == (T, B, D, H) and h_n.shape == (D, B, H)
    assert_close(out, ref_out, tol, "out")
    assert_close(h_n, ref_h_n, tol, "h_n")
    assert bool((out[padded] == 0).all()), "out must be exactly zero past each length"
    assert torch.equal(h_n[:, lengths == 0], h0[:, lengths == 0]), "h_n is h0 where a sequence has no steps"

    if cell.saved_per_step:
        (gates,) = saved
        assert gates.shape == (T, B, D, cell.saved_per_step * H)
        valid = ~padded
        expected = _gru_gates(proj, w_hh, b_hh, _previous_states(ref_out.detach(), h0, lengths))
        assert_close(gates[valid], expected[valid], tol, "saved [r, z, n, W_hn h + b_hn]")
    else:
        assert saved == ()

    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grad_hn = torch.randn(h_n.shape, generator=g, dtype=dtype)
    grad_proj, grad_rec, grad_h0 = kernels.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode)
    ref = _reference_grad([ref_out, ref_h_n], leaves, [grad_out, grad_hn])
    ref_grad_proj, ref_grad_h0, ref_grad_w_hh, ref_grad_b_hh = ref
    assert_close(grad_proj, ref_grad_proj, tol * 4, "grad_proj")
    assert_close(grad_h0, ref_grad_h0, tol * 4, "grad_h0")
    assert bool((grad_proj[padded] == 0).all()), "grad_proj must be exactly zero past each length"
    assert bool((grad_rec[padded] == 0).all()), "grad_rec must be exactly zero past each length"
    if cell.folds_recurrent_bias:
        assert grad_rec is grad_proj, "a folded b_hh: both sides' gradient is one tensor"
    else:
        # r and z take their two sides as a sum; n's recurrent side is multiplied by r.
        r = saved[0][..., :H]
        assert torch.equal(grad_rec[..., : 2 * H], grad_proj[..., : 2 * H])
        assert_close(grad_rec[..., 2 * H :], grad_proj[..., 2 * H :] * r.where(~padded[..., None, None], 0), tol * 4)
    grad_w_hh, grad_b_hh = _recurrent_gradients(grad_rec, out, h0, lengths)
    assert_close(grad_w_hh, ref_grad_w_hh, tol * 4, "dW_hh from grad_rec")
    assert_close(grad_b_hh, ref_grad_b_hh, tol * 4, "db_hh from grad_rec")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,B", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("D", [1, 2])
def test_no_steps_or_no_rows(mode, T, B, D):
    """T = 0 (h_n = h0, grad_h0 = grad_hn) and B = 0 (empty outputs), on every path."""
    kernels, H = _module(mode), 5
    proj, w_hh, b_hh, h0, _ = _case(mode, max(T, 1), max(B, 1), D, H, torch.float64)
    proj, h0 = proj[:T, :B].contiguous(), h0[:, :B].contiguous()
    lengths = torch.full((B,), T)
    for rows_per_task in (None, 1):
        with _runtime.forced_plan(rows_per_task):
            out, h_n, saved = kernels.forward(proj, w_hh, b_hh, h0, lengths, mode)
            assert out.shape == (T, B, D, H) and torch.equal(h_n, h0)
            grad_hn = torch.randn_like(h_n)
            grad_proj, grad_rec, grad_h0 = kernels.backward(out, grad_hn, out, saved, w_hh, h0, lengths, mode)
            assert grad_proj.shape == grad_rec.shape == proj.shape and torch.equal(grad_h0, grad_hn)
    x, params, _, _ = _layer_case(mode, max(T, 1), max(B, 1), 3, D, H, torch.float64, 4, False)
    x = x[:T, :B].contiguous()
    out, h_n, saved = kernels.layer_forward(x, params, h0, lengths, mode)
    assert out.shape == (T, B, D, H) and torch.equal(h_n, h0)
    grad_x, grad_h0, grads = kernels.layer_backward(out, grad_hn, x, params, out, saved, h0, lengths, mode, True)
    assert grad_x.shape == x.shape and torch.equal(grad_h0, grad_hn)
    assert all(bool((g == 0).all()) and g.shape == p.shape for gs, ps in zip(grads, params) for g, p in zip(gs, ps))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,B,D,H", [(7, 5, 2, 13), (3, 130, 1, 512)])
@pytest.mark.parametrize("rows_per_task", [None, 1, 3, "planned"])
def test_serial_and_parallel_drivers_agree(mode, T, B, D, H, rows_per_task):
    """The serial kernels (what one thread runs, BLAS included where planned) and the parallel
    ones at any task split compute the same recurrence, forward and backward (float64)."""
    kernels = _module(mode)
    proj, w_hh, b_hh, h0, lengths = _case(mode, T, B, D, H, torch.float64, seed=2, descending=True)
    ref_out, ref_h_n = _reference(mode, proj, w_hh, b_hh, h0, lengths)
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    grad_hn = torch.randn(ref_h_n.shape, generator=g, dtype=torch.float64)
    plan = contextlib.nullcontext() if rows_per_task == "planned" else _runtime.forced_plan(rows_per_task)
    with plan:
        out, h_n, saved = kernels.forward(proj, w_hh, b_hh, h0, lengths, mode)
        grads = kernels.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode)
    assert_close(out, ref_out, 1e-12, "out")
    assert_close(h_n, ref_h_n, 1e-12, "h_n")
    with _runtime.forced_plan(None):
        expected = kernels.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode)
    for name, a, e in zip(("grad_proj", "grad_rec", "grad_h0"), grads, expected):
        assert_close(a, e, 1e-12, name)


# --- the whole-layer launchers: layer_forward(...) and layer_backward(...) --------------------


def _layer_case(mode, T, B, I, D, H, dtype, n_params, descending, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = CELLS[mode].gates * H
    shapes = [(width, I), (width, H), (width,), (width,)][:n_params]
    params = [tuple(torch.randn(s, generator=g, dtype=dtype) / H**0.5 for s in shapes) for _ in range(D)]
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    h0 = torch.randn(D, B, H, generator=g, dtype=dtype)
    return x, params, h0, _lengths(T, B, g, descending)


@_one_torch_thread()
def _layer_reference(mode, x, params, h0, lengths):
    stacked = [torch.stack([p[i] for p in params]) if len(params[0]) > i else None for i in range(4)]
    out, h_n = reference.layer(mode, x, h0, *stacked, lengths)
    return out.view(*x.shape[:2], len(params), h0.shape[2]), h_n


def _overlapping(tensors):
    """Whether any two of the (contiguous) tensors share a byte of memory."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    return any(start < end for (_, end), (start, _) in zip(spans, spans[1:]))


def _split_forward(mode, x, params, h0, lengths):
    """The split path by hand: the projection GEMM, then the recurrence launcher."""
    cell, kernels = CELLS[mode], _module(mode)
    w_ih, w_hh = torch.stack([p[0] for p in params]), torch.stack([p[1] for p in params])
    biases = [torch.stack([p[i] for p in params]) for i in range(2, len(params[0]))]
    width = w_ih.shape[1]
    b_ih = biases[0] if biases else torch.zeros(len(params), width, dtype=x.dtype)
    b_hh = biases[1] if len(biases) > 1 else torch.zeros_like(b_ih)
    proj = torch.einsum("tbi,dgi->tbdg", x, w_ih) + b_ih
    if cell.folds_recurrent_bias:
        proj, b_hh = proj + b_hh, None
    return kernels.forward(proj.contiguous(), w_hh, b_hh, h0, lengths, mode), w_ih, w_hh


def _layer_cases():
    for mode in MODES:
        for n_params in (2, 3, 4) if CELLS[mode].folds_recurrent_bias else (2, 4):
            for T, B, I, D, H in [(1, 1, 1, 1, 1), (5, 3, 4, 2, 6), (9, 4, 3, 1, 17), (6, 7, 5, 2, 33)]:
                yield mode, n_params, T, B, I, D, H


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,n_params,T,B,I,D,H", list(_layer_cases()))
@pytest.mark.parametrize("descending", [False, True])
def test_layer_launchers_match_reference(dtype, mode, n_params, T, B, I, D, H, descending):
    kernels = _module(mode)
    x, params, h0, lengths = _layer_case(mode, T, B, I, D, H, dtype, n_params, descending)
    out, h_n, saved = kernels.layer_forward(x, params, h0, lengths, mode)
    x_leaf, h0_leaf = x.clone().requires_grad_(), h0.clone().requires_grad_()
    param_leaves = [tuple(t.clone().requires_grad_() for t in p) for p in params]
    ref_out, ref_h_n = _layer_reference(mode, x_leaf, param_leaves, h0_leaf, lengths)
    tol = _tol(dtype, T)
    padded = _padding(T, lengths)
    assert_close(out, ref_out, tol, "out")
    assert_close(h_n, ref_h_n, tol, "h_n")
    assert bool((out[padded] == 0).all()), "out must be exactly zero past each length"
    assert len(saved) == (1 if CELLS[mode].saved_per_step else 0)

    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grad_hn = torch.randn(h_n.shape, generator=g, dtype=dtype)
    flat_leaves = [x_leaf, h0_leaf, *(t for p in param_leaves for t in p)]
    ref_grad_x, ref_grad_h0, *ref_grad_params = _reference_grad([ref_out, ref_h_n], flat_leaves, [grad_out, grad_hn])
    grad_tol = tol * 4
    grad_x, grad_h0, grad_params = kernels.layer_backward(
        grad_out, grad_hn, x, params, out, saved, h0, lengths, mode, True
    )
    assert_close(grad_x, ref_grad_x, grad_tol, "grad_x")
    assert_close(grad_h0, ref_grad_h0, grad_tol, "grad_h0")
    assert len(grad_params) == D and all(len(p) == n_params for p in grad_params)
    flat_grads = [t for p in grad_params for t in p]
    for i, (a, e) in enumerate(zip(flat_grads, ref_grad_params)):
        assert_close(a, e, grad_tol, f"direction {i // n_params} parameter {i % n_params}")
    assert not _overlapping(flat_grads), "no two gradients may share memory (.grad is updated in place)"

    no_x, grad_h0_again, grads_again = kernels.layer_backward(
        grad_out, grad_hn, x, params, out, saved, h0, lengths, mode, False
    )
    assert no_x is None
    assert torch.equal(grad_h0_again, grad_h0)
    assert all(torch.equal(a, b) for p, q in zip(grads_again, grad_params) for a, b in zip(p, q))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_params", [2, 4])
def test_either_backward_path_after_either_forward_path(mode, n_params):
    """layer_backward after the split forward, and the split backward after layer_forward."""
    kernels, dtype = _module(mode), torch.float64
    x, params, h0, lengths = _layer_case(mode, 6, 5, 3, 2, 7, dtype, n_params, descending=False, seed=4)
    x_leaf, h0_leaf = x.clone().requires_grad_(), h0.clone().requires_grad_()
    param_leaves = [tuple(t.clone().requires_grad_() for t in p) for p in params]
    ref_out, ref_h_n = _layer_reference(mode, x_leaf, param_leaves, h0_leaf, lengths)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(ref_out.shape, generator=g, dtype=dtype)
    grad_hn = torch.randn(ref_h_n.shape, generator=g, dtype=dtype)
    ref_grads = _reference_grad(
        [ref_out, ref_h_n], [x_leaf, h0_leaf, *(p[1] for p in param_leaves)], [grad_out, grad_hn]
    )
    ref_grad_x, ref_grad_h0, ref_grad_w_hh = ref_grads[0], ref_grads[1], torch.stack(ref_grads[2:])

    (out, h_n, saved), w_ih, w_hh = _split_forward(mode, x, params, h0, lengths)
    assert_close(out, ref_out, 1e-12, "split forward out")
    grad_x, grad_h0, grad_params = kernels.layer_backward(
        grad_out, grad_hn, x, params, out, saved, h0, lengths, mode, True
    )
    assert_close(grad_x, ref_grad_x, 1e-11, "layer_backward after forward: grad_x")
    assert_close(grad_h0, ref_grad_h0, 1e-11, "layer_backward after forward: grad_h0")
    assert_close(torch.stack([p[1] for p in grad_params]), ref_grad_w_hh, 1e-11, "layer_backward: grad_w_hh")

    out, h_n, saved = kernels.layer_forward(x, params, h0, lengths, mode)
    grad_proj, grad_rec, grad_h0 = kernels.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode)
    assert_close(
        torch.einsum("tbdg,dgi->tbi", grad_proj, w_ih), ref_grad_x, 1e-11, "backward after layer_forward: grad_x"
    )
    assert_close(grad_h0, ref_grad_h0, 1e-11, "backward after layer_forward: grad_h0")
    grad_w_hh, _ = _recurrent_gradients(grad_rec, out, h0, lengths)
    assert_close(grad_w_hh, ref_grad_w_hh, 1e-11, "backward after layer_forward: grad_w_hh")


def test_fuses_whole_layer_counts_every_gate(monkeypatch):
    """Up to WHOLE_LAYER_MACS multiply-adds (T·B·D·G·H·(I+H)) a layer runs whole, half that with
    more than 2 threads; the GRU's three gates count, and -1 sends every layer to the split path."""
    elman, gru = _module("RNN_TANH"), _module("GRU")
    limit = _runtime.WHOLE_LAYER_MACS
    assert torch.get_num_threads() <= 2
    assert elman.fuses_whole_layer(1, 1, limit - 1, 1, 1, "RNN_TANH")  # 1·(I + 1) = limit
    assert not elman.fuses_whole_layer(1, 1, limit, 1, 1, "RNN_RELU")
    assert elman.fuses_whole_layer(2, 4, limit // 32 - 2, 2, 2, "RNN_TANH")  # 2·4·2·2·(I + 2) = limit
    assert not elman.fuses_whole_layer(2, 4, limit // 32 - 1, 2, 2, "RNN_TANH")
    assert gru.fuses_whole_layer(1, 1, limit // 3 - 1, 1, 1, "GRU")  # 3·(I + 1) <= limit
    assert not gru.fuses_whole_layer(1, 1, limit // 3, 1, 1, "GRU")
    assert not gru.fuses_whole_layer(1, 1, limit - 1, 1, 1, "GRU")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert elman.fuses_whole_layer(1, 1, limit // 2 - 1, 1, 1, "RNN_TANH")
        assert not elman.fuses_whole_layer(1, 1, limit // 2, 1, 1, "RNN_TANH")
        assert not gru.fuses_whole_layer(1, 1, limit // 6, 1, 1, "GRU")
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(_runtime, "WHOLE_LAYER_MACS", -1)
    assert not elman.fuses_whole_layer(1, 1, 1, 1, 1, "RNN_TANH")
    assert not gru.fuses_whole_layer(1, 1, 1, 1, 1, "GRU")


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
# float64 case, the error). Every change must be refused before a kernel runs.
_BAD_FORWARD = [
    (MODES, lambda p, w, b, h, n: (p.float(), w, b, h, n), TypeError),
    (MODES, lambda p, w, b, h, n: (p.half(), w.half(), b if b is None else b.half(), h.half(), n), TypeError),
    (MODES, lambda p, w, b, h, n: (p.transpose(0, 1), w, b, h, n), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w[:, :, :2].contiguous(), b, h, n), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w[:, :-1].contiguous(), b, h, n), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w, b, h, n.int()), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w, b, h, n[:2]), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w, b, h.transpose(1, 2).contiguous().transpose(1, 2), n), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w, b, h[:, :2].contiguous(), n), ValueError),
    (MODES, lambda p, w, b, h, n: (p, w, b, h.float(), n), TypeError),
    (MODES, lambda p, w, b, h, n: (p[..., :-1].contiguous(), w, b, h, n), ValueError),
    (["GRU"], lambda p, w, b, h, n: (p, w, b[:, :-1].contiguous(), h, n), ValueError),
    (["GRU"], lambda p, w, b, h, n: (p, w, b.float(), h, n), TypeError),
    (["GRU"], lambda p, w, b, h, n: (p, w, b.repeat_interleave(2, 1)[:, ::2], h, n), ValueError),
]
_BAD_FORWARD_CASES = [(mode, i) for i, (modes, _, _) in enumerate(_BAD_FORWARD) for mode in modes]


@pytest.mark.parametrize("mode,index", _BAD_FORWARD_CASES)
def test_forward_launcher_rejects_bad_arguments(mode, index):
    _, bad, error = _BAD_FORWARD[index]
    args = bad(*_case(mode, 4, 3, 1, 3, torch.float64))
    with pytest.raises(error):
        _module(mode).forward(*args, mode)


@pytest.mark.parametrize("mode", MODES)
def test_launchers_refuse_tensors_off_the_cpu(mode):
    proj, w_hh, b_hh, h0, lengths = (t if t is None else t.to("meta") for t in _case(mode, 4, 3, 1, 3, torch.float64))
    with pytest.raises(RuntimeError, match="CPU"):
        _module(mode).forward(proj, w_hh, b_hh, h0, lengths, mode)


@pytest.mark.parametrize("mode", MODES)
def test_backward_launcher_checks_shapes_before_running(mode):
    kernels = _module(mode)
    proj, w_hh, b_hh, h0, lengths = _case(mode, 4, 3, 1, 3, torch.float64)
    out, h_n, saved = kernels.forward(proj, w_hh, b_hh, h0, lengths, mode)
    kernels.backward(out, h_n, out, saved, w_hh, h0, lengths, mode)
    bad = [
        ((out[:3].contiguous(), h_n, out, saved, w_hh, h0, lengths), ValueError),
        ((out, h_n[:, :2].contiguous(), out, saved, w_hh, h0, lengths), ValueError),
        ((out.float(), h_n, out, saved, w_hh, h0, lengths), TypeError),
        ((out, h_n, out.transpose(0, 1).contiguous().transpose(0, 1), saved, w_hh, h0, lengths), ValueError),
        ((out, h_n, out, saved, w_hh[:, :, :2].contiguous(), h0, lengths), ValueError),
        ((out, h_n, out, saved, w_hh, h0, lengths.int()), ValueError),
    ]
    if saved:
        bad += [
            ((out, h_n, out, (saved[0][..., :-1].contiguous(),), w_hh, h0, lengths), ValueError),
            ((out, h_n, out, (saved[0].float(),), w_hh, h0, lengths), TypeError),
            ((out, h_n, out, saved, w_hh, h0[:, :2].contiguous(), lengths), ValueError),
        ]
    for args, error in bad:
        with pytest.raises(error):
            kernels.backward(*args, mode)


@pytest.mark.parametrize("mode", MODES)
def test_layer_launchers_check_shapes_before_running(mode):
    kernels, width = _module(mode), CELLS[mode].gates * 6
    x, w, h0, lengths = torch.randn(4, 3, 5), torch.randn(width, 6), torch.zeros(1, 3, 6), torch.full((3,), 4)
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
        kernels.layer_forward(x, [params[0], params[0][:2]], torch.zeros(2, 3, 6), lengths, mode)
    with pytest.raises(ValueError):  # W_hh of an Elman cell (H, H) in a GRU, or of a GRU in an Elman cell
        other = torch.randn(6 if CELLS[mode].gates > 1 else 18, 6)
        kernels.layer_forward(x, [(params[0][0], other)], h0, lengths, mode)
    with pytest.raises(TypeError, match="direction 0 parameter 1"):
        kernels.layer_forward(x, [(params[0][0], w.double())], h0, lengths, mode)
    with pytest.raises(ValueError, match="direction 0 parameter 0"):
        kernels.layer_forward(x, [(params[0][0].t().contiguous().t(), w)], h0, lengths, mode)
    with pytest.raises(ValueError):
        kernels.layer_forward(x, params, h0, lengths[:2], mode)
    with pytest.raises(ValueError):
        kernels.layer_forward(x.transpose(0, 1).contiguous().transpose(0, 1), params, h0, lengths, mode)
    with pytest.raises(ValueError):
        kernels.layer_forward(x[..., :4].contiguous(), params, h0, lengths, mode)
    with pytest.raises(ValueError):
        kernels.layer_backward(out[:3].contiguous(), h_n, x, params, out, saved, h0, lengths, mode, True)
    with pytest.raises(ValueError):
        kernels.layer_backward(out, h_n[:, :2].contiguous(), x, params, out, saved, h0, lengths, mode, True)
    with pytest.raises(TypeError):
        kernels.layer_backward(out.double(), h_n, x, params, out, saved, h0, lengths, mode, True)
    if saved:
        with pytest.raises(ValueError):
            kernels.layer_backward(out, h_n, x, params, out, (saved[0][:3].contiguous(),), h0, lengths, mode, True)


# --- compilation: the on-disk cache and the warm-up --------------------------------------------

_CACHE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from fastrnn.kernels.numba import _runtime, {module} as kernels
    mode, width = "{mode}", {width}
    p = torch.randn(3, 2, 1, width); w = torch.randn(1, width, 4); h = torch.zeros(1, 2, 4)
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
    for mode in ("RNN_TANH", "GRU"):
        cell = CELLS[mode]
        fwd, _, _, bwd, _, _ = KERNELS[cell.kernel]
        scripts[cell.kernel] = _CACHE_SCRIPT.format(
            module=cell.kernel, mode=mode, width=cell.gates * 4, folds=cell.folds_recurrent_bias, fwd=fwd, bwd=bwd
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
    serialised; several Python threads calling the kernels of both cells must simply all finish."""
    script = textwrap.dedent("""
        import threading, torch
        from fastrnn.kernels.numba import _runtime, elman, gru
        torch.set_num_threads(2)
        h = torch.zeros(1, 8, 16); lengths = torch.full((8,), 20)
        cases = [
            (elman, "RNN_TANH", torch.randn(20, 8, 1, 16), torch.randn(1, 16, 16) * 0.1, None),
            (gru, "GRU", torch.randn(20, 8, 1, 48), torch.randn(1, 48, 16) * 0.1, torch.zeros(1, 48)),
        ]
        def work():
            for _ in range(100):
                for kernels, mode, p, w, b in cases:
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
