"""The fused Elman layer: forward and backward on tensors, and their autograd glue.

Under ``torch.compile`` they run as the ``torch.library`` custom ops ``fastrnn::elman_fwd`` and
``fastrnn::elman_bwd`` (fake kernels, registered autograd), so the compiler sees one opaque node
per layer. In eager mode :func:`elman` takes a ``torch.autograd.Function`` over the very same
functions, which skips the custom-op dispatch (tens of microseconds a call, the whole budget of a
small layer). Everything that is not the recurrence itself is a GEMM over all T*B rows: the input
projection in forward, and ``dx``, ``dW_ih``, ``dW_hh`` and the bias gradient in backward.
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import backends


def profiler_label(name):
    """A ``record_function`` range while a profiler runs; free otherwise (entering one costs ~10 us),
    and never traced by ``torch.compile``."""
    if torch.autograd.profiler._is_profiler_enabled and not torch.compiler.is_compiling():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _project(x, w_ih, bias):
    """x (T, B, I) @ W_ih^T for every direction at once -> (T, B, D, H)."""
    seq_len, batch, n_in = x.shape
    n_dir, hidden, _ = w_ih.shape
    rows, weights = x.reshape(seq_len * batch, n_in), w_ih.reshape(n_dir * hidden, n_in).t()
    proj = torch.mm(rows, weights) if bias is None else torch.addmm(bias.reshape(-1), rows, weights)
    return proj.view(seq_len, batch, n_dir, hidden)


def _forward(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    bias: Optional[Tensor],
    lengths: Tensor,
    relu: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    seq_len, batch, _ = x.shape
    n_dir, hidden, _ = w_hh.shape
    with profiler_label(f"fastrnn::elman_fwd[{backend},D={n_dir}]"):
        proj = _project(x, w_ih, bias)
        out, h_n = backends.kernels(backend).elman_forward(proj, w_hh, h0, lengths, relu)
    return out.view(seq_len, batch, n_dir * hidden), h_n


elman_fwd = torch.library.custom_op("fastrnn::elman_fwd", _forward, mutates_args=())


@elman_fwd.register_fake
def _(x, h0, w_ih, w_hh, bias, lengths, relu, backend):
    n_dir, hidden, _ = w_hh.shape
    return x.new_empty(x.shape[0], x.shape[1], n_dir * hidden), h0.new_empty(h0.shape)


def _grad_w_hh(grad_pre, out, h0, lengths):
    """dW_hh[d] = sum_t dz_t^T h_prev_t as two GEMMs per direction.

    h_prev_t is out[t-1] (direction 0) or out[t+1] (direction 1) inside a sequence, and h0 at the
    sequence's first processed step. ``out`` is zero past each length, so the shifted products
    need no mask; only the h0 term gathers each sequence's first step.
    """
    seq_len, batch, n_dir, hidden = out.shape
    if seq_len == 0:
        return out.new_zeros(n_dir, hidden, hidden)
    grads = []
    rows = torch.arange(batch, device=out.device)
    for d in range(n_dir):
        dz, h = grad_pre[:, :, d], out[:, :, d]
        if d == 0:
            dz_first, later, earlier = dz[0], dz[1:], h[:-1]
        else:
            dz_first, later, earlier = dz[(lengths - 1).clamp(min=0), rows], dz[:-1], h[1:]
        grad = torch.mm(dz_first.t(), h0[d])
        grads.append(torch.addmm(grad, later.reshape(-1, hidden).t(), earlier.reshape(-1, hidden)))
    return torch.stack(grads)


def _backward(
    grad_out: Tensor,
    grad_hn: Tensor,
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    out: Tensor,
    lengths: Tensor,
    relu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    seq_len, batch, n_in = x.shape
    n_dir, hidden, _ = w_hh.shape
    with profiler_label(f"fastrnn::elman_bwd[{backend},D={n_dir}]"):
        out = out.view(seq_len, batch, n_dir, hidden)
        grad_pre, grad_h0 = backends.kernels(backend).elman_backward(
            grad_out.reshape(out.shape).contiguous(), grad_hn.contiguous(), out, w_hh, lengths, relu
        )
        flat = grad_pre.view(seq_len * batch, n_dir * hidden)
        grad_x = torch.mm(flat, w_ih.reshape(n_dir * hidden, n_in)).view(x.shape)
        grad_w_ih = torch.mm(flat.t(), x.reshape(seq_len * batch, n_in)).view(w_ih.shape)
        grad_bias = flat.sum(0).view(n_dir, hidden)
        grad_w_hh = _grad_w_hh(grad_pre, out, h0, lengths)
    return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_bias


elman_bwd = torch.library.custom_op("fastrnn::elman_bwd", _backward, mutates_args=())


@elman_bwd.register_fake
def _(grad_out, grad_hn, x, h0, w_ih, w_hh, out, lengths, relu, backend):
    n_dir, hidden, _ = w_hh.shape
    return (
        torch.empty_like(x),
        torch.empty_like(h0),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        w_hh.new_empty(n_dir, hidden),
    )


def _setup_context(ctx, inputs, output):
    x, h0, w_ih, w_hh, bias, lengths, relu, backend = inputs
    # Only inputs and the hidden sequence are kept: the activation derivative comes from out.
    ctx.save_for_backward(x, h0, w_ih, w_hh, output[0], lengths)
    ctx.relu, ctx.backend, ctx.has_bias = relu, backend, bias is not None


def _gradients(ctx, grad_out, grad_hn, backward):
    x, h0, w_ih, w_hh, out, lengths = ctx.saved_tensors
    grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_bias = backward(
        grad_out, grad_hn, x, h0, w_ih, w_hh, out, lengths, ctx.relu, ctx.backend
    )
    return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_bias if ctx.has_bias else None, None, None, None


elman_fwd.register_autograd(
    lambda ctx, grad_out, grad_hn: _gradients(ctx, grad_out, grad_hn, elman_bwd), setup_context=_setup_context
)


class _EagerElman(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_hn):
        # Under create_graph, go through the custom op: it has no autograd of its own, so a double
        # backward fails loudly naming fastrnn::elman_bwd instead of silently missing terms.
        return _gradients(ctx, grad_out, grad_hn, elman_bwd if torch.is_grad_enabled() else _backward)


def elman(x, h0, w_ih, w_hh, bias, lengths, relu, backend):
    """One fused layer; arguments as ``fastrnn::elman_fwd``. Returns (output (T, B, D*H), h_n)."""
    if torch.compiler.is_compiling():
        return elman_fwd(x, h0, w_ih, w_hh, bias, lengths, relu, backend)
    return _EagerElman.apply(x, h0, w_ih, w_hh, bias, lengths, relu, backend)
