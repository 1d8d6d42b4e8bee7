"""The fused RNN: every layer and direction of one ``nn.RNN`` call as a single autograd node.

Under ``torch.compile`` it runs as the ``torch.library`` custom ops ``fastrnn::rnn_fwd`` and
``fastrnn::rnn_bwd`` (fake kernels, registered autograd), so the compiler sees one opaque node.
In eager mode :func:`rnn` takes a ``torch.autograd.Function`` over the very same functions, which
skips the custom-op dispatch (tens of microseconds a call, the whole budget of a small layer).
One node for the whole stack, rather than one per layer, also keeps weight stacking, bias sums
and inter-layer dropout out of the autograd graph: they cost more than the kernels at small sizes.
A single layer small enough for the backend's whole-layer kernels takes a leaner node of its own.

Per layer, everything that is not the recurrence itself is a GEMM over all T*B rows (with
``valid_rows``, over the valid tokens only): the input projection in forward, and ``dx``,
``dW_ih``, ``dW_hh`` and the bias gradient in backward.

With ``valid_rows`` the op takes and returns the valid rows alone (a PackedSequence's data), not the
padded (T, B, ...) layout: the input then never needs padding, and backward saves the output's
valid rows rather than its padded copy.
"""

import contextlib

# torch.library infers the custom-op schemas from these typing forms (torch 2.4 knows no list[...]).
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends, reference
from .rows import scatter_rows, select_rows


def profiler_label(template, *args):
    """A ``record_function`` range named ``template.format(*args)`` while a profiler runs; free
    otherwise (entering one costs ~10 us, formatting the name ~1 us), and never traced by
    ``torch.compile``."""
    if torch.autograd.profiler._is_profiler_enabled and not torch.compiler.is_compiling():
        return torch.profiler.record_function(template.format(*args))
    return contextlib.nullcontext()


def _layer_params(weights, index, num_layers, n_dir):
    """Layer ``index``'s parameters, one (w_ih, w_hh[, b_ih[, b_hh]]) sequence per direction, from
    the flat list ordered as ``nn.RNN._flat_weights``."""
    per_dir = len(weights) // (num_layers * n_dir)
    first = index * n_dir * per_dir
    return [weights[first + d * per_dir : first + (d + 1) * per_dir] for d in range(n_dir)]


def _stacked(params, with_bias=True):
    """Per-direction parameters -> (w_ih (D, H, I), w_hh (D, H, H), bias (D, H) = b_ih + b_hh or None)."""
    w_ih, w_hh = _stack([p[0] for p in params]), _stack([p[1] for p in params])
    if not with_bias or len(params[0]) == 2:
        return w_ih, w_hh, None
    return w_ih, w_hh, _stack([p[2] if len(p) == 3 else p[2] + p[3] for p in params])


def _per_direction(n_params, grad_w_ih, grad_w_hh, grad_bias):
    """Stacked (D, ...) gradients -> one tuple per direction, matching (w_ih, w_hh[, b_ih[, b_hh]]).
    b_hh gets its own copy: .grad tensors sharing memory would be accumulated, clipped or scaled in
    place twice."""
    return [
        (grad_w_ih[d], grad_w_hh[d], grad_bias[d], grad_bias[d].clone())[:n_params] for d in range(grad_w_ih.shape[0])
    ]


def _stack(tensors):
    # A view for one direction; two directions are copied, transiently (never saved).
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _project(x, w_ih, bias, valid_rows, seq_len, batch):
    """x @ W_ih^T for every direction at once -> (T, B, D, H); with ``valid_rows`` only those rows
    are computed (the others are left unset: kernels never read proj past a length)."""
    n_dir, hidden, n_in = w_ih.shape
    rows, weights = select_rows(x, valid_rows), w_ih.reshape(n_dir * hidden, n_in).t()
    proj = torch.mm(rows, weights) if bias is None else torch.addmm(bias.reshape(-1), rows, weights)
    if valid_rows is not None:
        proj = proj.new_empty(seq_len * batch, n_dir * hidden).index_copy_(0, valid_rows, proj)
    return proj.view(seq_len, batch, n_dir, hidden)


def _padded(x, valid_rows, seq_len, batch):
    """A layer input as (T, B, I), from its valid rows if that is how it came."""
    return x if x.dim() == 3 else scatter_rows(x, valid_rows, seq_len, batch)


def _layer_forward(x, h0, params, lengths, valid_rows, seq_len, relu, backend):
    """x: (T, B, I) padded, or (N, I) valid rows; params: per direction (w_ih, w_hh[, biases]).
    A fused layer gets its parameters as they are (the launcher stacks them in NumPy)."""
    n_dir, (hidden, n_in) = len(params), params[0][0].shape
    batch = h0.shape[1]
    kernels = backends.kernels(backend)
    if kernels.fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden):
        out, h_n = kernels.layer_forward(_padded(x, valid_rows, seq_len, batch), params, h0, lengths, relu)
    else:
        w_ih, w_hh, bias = _stacked(params)
        out, h_n = kernels.elman_forward(_project(x, w_ih, bias, valid_rows, seq_len, batch), w_hh, h0, lengths, relu)
    return out.view(seq_len, batch, n_dir * hidden), h_n


def _grad_w_hh(grad_pre, out, h0, lengths, valid_rows):
    """dW_hh[d] = sum_t dz_t^T h_prev_t as two GEMMs per direction.

    h_prev_t is out[t-1] (direction 0) or out[t+1] (direction 1) inside a sequence, and h0 at the
    sequence's first processed step. ``out`` is zero past each length, so the shifted products
    need no mask; only the h0 term gathers each sequence's first step. With ``valid_rows`` the
    shifted products pair up only the valid rows of dz.
    """
    seq_len, batch, n_dir, hidden = out.shape
    if seq_len == 0:
        return out.new_zeros(n_dir, hidden, hidden)
    # Written in place per direction: out-of-place addmm plus a stack cost ~80 us more at B=1, H=256.
    grads = out.new_empty(n_dir, hidden, hidden)
    rows = torch.arange(batch, device=out.device)
    for d in range(n_dir):
        dz, h = grad_pre[:, :, d], out[:, :, d]
        # shift: how many flat rows h_prev lies before dz's row.
        if d == 0:
            dz_first, later, earlier, shift = dz[0], dz[1:], h[:-1], batch
        else:
            dz_first, later, earlier, shift = dz[(lengths - 1).clamp(min=0), rows], dz[:-1], h[1:], -batch
        if valid_rows is None:
            later, earlier = later.reshape(-1, hidden), earlier.reshape(-1, hidden)
        else:
            previous = valid_rows - shift
            pairs = (previous >= 0) & (previous < seq_len * batch)
            later = dz.reshape(-1, hidden).index_select(0, valid_rows[pairs])
            earlier = h.reshape(-1, hidden).index_select(0, previous[pairs])
        torch.mm(dz_first.t(), h0[d], out=grads[d])
        grads[d].addmm_(later.t(), earlier)
    return grads


def _layer_backward(grad_out, grad_hn, x, h0, params, out, lengths, valid_rows, relu, backend, input_grad):
    """Gradients of one layer: (x or None, h0, per direction a tuple matching ``params``).
    x: (T, B, I) padded, or (N, I) valid rows (its gradient then comes as rows too); out padded."""
    seq_len, batch = out.shape[:2]
    n_dir, (hidden, n_in) = len(params), params[0][0].shape
    out = out.view(seq_len, batch, n_dir, hidden)
    kernels = backends.kernels(backend)
    grad_out, grad_hn = grad_out.reshape(out.shape).contiguous(), grad_hn.contiguous()
    if kernels.fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden):
        grad_x, grad_h0, grad_params = kernels.layer_backward(
            grad_out, grad_hn, _padded(x, valid_rows, seq_len, batch), params, out, h0, lengths, relu, input_grad
        )
        return (grad_x if grad_x is None or x.dim() == 3 else select_rows(grad_x, valid_rows)), grad_h0, grad_params
    w_ih, w_hh, _ = _stacked(params, with_bias=False)
    grad_pre, grad_h0 = kernels.elman_backward(grad_out, grad_hn, out, w_hh, lengths, relu)
    flat = select_rows(grad_pre, valid_rows)
    grad_x = None
    if input_grad:
        grad_x = torch.mm(flat, w_ih.reshape(n_dir * hidden, n_in))
        if x.dim() == 3 and valid_rows is not None:
            grad_x = scatter_rows(grad_x, valid_rows, seq_len, batch)
        grad_x = grad_x.view(x.shape)
    grad_w_ih = torch.mm(flat.t(), select_rows(x, valid_rows)).view(w_ih.shape)
    grad_bias = flat.sum(0).view(n_dir, hidden)
    grad_w_hh = _grad_w_hh(grad_pre, out, h0, lengths, valid_rows)
    return grad_x, grad_h0, _per_direction(len(params[0]), grad_w_ih, grad_w_hh, grad_bias)


def _layer_states(states, index, num_layers):
    """Layer ``index``'s (D, B, H) slice of an (L*D, B, H) hx-shaped tensor."""
    if num_layers == 1:
        return states
    n_dir = states.shape[0] // num_layers
    return states[index * n_dir : (index + 1) * n_dir]


def _layer_input(x, outputs, masks, index):
    """What layer ``index`` read: x, or the previous layer's output after its dropout mask."""
    if index == 0:
        return x
    return outputs[index - 1] * masks[index - 1] if masks else outputs[index - 1]


def _forward(
    x: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    masks: Sequence[Tensor],
    lengths: Tensor,
    valid_rows: Optional[Tensor],
    seq_len: int,
    num_layers: int,
    relu: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """Returns output (T, B, D*H) [its (N, D*H) valid rows with ``valid_rows``], h_n (L*D, B, H)
    and the padded outputs of layers 0..L-2 (for backward)."""
    n_dir = hx.shape[0] // num_layers
    outputs, finals = [], []
    with profiler_label("fastrnn::rnn_fwd[{},L={},D={}]", backend, num_layers, n_dir):
        for index in range(num_layers):
            with profiler_label("fastrnn.layer{}", index):
                out, h_n = _layer_forward(
                    _layer_input(x, outputs, masks, index),
                    _layer_states(hx, index, num_layers),
                    _layer_params(weights, index, num_layers, n_dir),
                    lengths,
                    valid_rows,
                    seq_len,
                    relu,
                    backend,
                )
            outputs.append(out)
            finals.append(h_n)
    h_n = finals[0] if num_layers == 1 else torch.cat(finals)
    output = outputs[-1] if valid_rows is None else select_rows(outputs[-1], valid_rows)
    return output, h_n, outputs[:-1]


def _backward(
    grad_out,
    grad_hn,
    x,
    hx,
    weights,
    masks,
    lengths,
    valid_rows,
    seq_len,
    output,
    inner,
    num_layers,
    relu,
    backend,
    input_grad,
):
    """Gradients of x (None unless ``input_grad``), hx and every weight, in ``weights`` order."""
    n_dir = hx.shape[0] // num_layers
    if valid_rows is not None:  # the kernels run on the padded layout
        output = scatter_rows(output, valid_rows, seq_len, hx.shape[1])
        grad_out = scatter_rows(grad_out, valid_rows, seq_len, hx.shape[1])
    outputs = [*inner, output]
    grad_hx = [grad_hn] * num_layers  # every slot is overwritten below
    grad_weights = []  # each layer's gradients go in front, from the last layer back
    grad_layer_out = grad_out
    with profiler_label("fastrnn::rnn_bwd[{},L={},D={}]", backend, num_layers, n_dir):
        for index in reversed(range(num_layers)):
            with profiler_label("fastrnn.layer{}", index):
                grad_in, grad_hx[index], grad_params = _layer_backward(
                    grad_layer_out,
                    _layer_states(grad_hn, index, num_layers),
                    _layer_input(x, outputs, masks, index),
                    _layer_states(hx, index, num_layers),
                    _layer_params(weights, index, num_layers, n_dir),
                    outputs[index],
                    lengths,
                    valid_rows,
                    relu,
                    backend,
                    input_grad or index > 0,
                )
            grad_weights[:0] = [grad for direction in grad_params for grad in direction]
            if index > 0:
                grad_layer_out = grad_in * masks[index - 1] if masks else grad_in
    return grad_in, grad_hx[0] if num_layers == 1 else torch.cat(grad_hx), grad_weights


# Schemas inferred from the type hints: ints become SymInts, so sequence length and batch stay
# symbolic under torch.compile (no recompile per length).
rnn_fwd = torch.library.custom_op("fastrnn::rnn_fwd", _forward, mutates_args=())


@rnn_fwd.register_fake
def _(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu, backend):
    width = hx.shape[0] // num_layers * hx.shape[2]
    layer_out = lambda: x.new_empty(seq_len, hx.shape[1], width)  # noqa: E731
    output = layer_out() if valid_rows is None else x.new_empty(valid_rows.shape[0], width)
    return output, hx.new_empty(hx.shape), [layer_out() for _ in range(num_layers - 1)]


def _backward_op(
    grad_out: Tensor,
    grad_hn: Tensor,
    x: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    masks: Sequence[Tensor],
    lengths: Tensor,
    valid_rows: Optional[Tensor],
    seq_len: int,
    output: Tensor,
    inner: Sequence[Tensor],
    num_layers: int,
    relu: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, List[Tensor]]:
    grad_x, grad_hx, grad_weights = _backward(
        grad_out,
        grad_hn,
        x,
        hx,
        weights,
        masks,
        lengths,
        valid_rows,
        seq_len,
        output,
        inner,
        num_layers,
        relu,
        backend,
        input_grad=True,
    )
    # A custom op's outputs may not alias each other: the directions' gradients are views of one
    # stacked tensor.
    return grad_x, grad_hx, [g.clone() for g in grad_weights]


rnn_bwd = torch.library.custom_op("fastrnn::rnn_bwd", _backward_op, mutates_args=())


@rnn_bwd.register_fake
def _(grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, seq_len, output, inner, num_layers, relu, backend):
    return torch.empty_like(x), torch.empty_like(hx), [torch.empty_like(w) for w in weights]


def _setup_context(ctx, inputs, output):
    x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu, backend = inputs
    output, _, inner = output
    # Weights are saved as the parameters themselves (stacked copies are remade in backward), and
    # deeper layers' inputs are remade from the previous output and its dropout mask.
    rows = () if valid_rows is None else (valid_rows,)
    ctx.save_for_backward(x, hx, lengths, output, *weights, *masks, *inner, *rows)
    ctx.counts = (len(weights), len(masks), len(rows))
    ctx.seq_len, ctx.config = seq_len, (num_layers, relu, backend)


def _saved_arguments(ctx, grad_out, grad_hn):
    """The arguments of :func:`_backward` (less ``input_grad``) from what forward saved."""
    x, hx, lengths, output, *rest = ctx.saved_tensors
    n_weights, n_masks, n_rows = ctx.counts
    weights, masks = rest[:n_weights], rest[n_weights : n_weights + n_masks]
    inner = rest[n_weights + n_masks : len(rest) - n_rows]
    valid_rows = rest[-1] if n_rows else None
    grad_out = torch.zeros_like(output) if grad_out is None else grad_out
    grad_hn = torch.zeros_like(hx) if grad_hn is None else grad_hn
    return (grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, ctx.seq_len, output, inner, *ctx.config)


def _op_gradients(ctx, grad_out, grad_hn, grad_inner):
    grad_x, grad_hx, grad_weights = rnn_bwd(*_saved_arguments(ctx, grad_out, grad_hn))
    return grad_x, grad_hx, grad_weights, [None] * ctx.counts[1], None, None, None, None, None, None


rnn_fwd.register_autograd(_op_gradients, setup_context=_setup_context)


def _torch_gradients(
    grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu, needs_grad
):
    """Gradients of x, hx and weights (None where ``needs_grad`` is False) from torch's autograd through
    the reference loop: for the backward passes the kernels cannot serve. With ``create_graph``
    (grad mode on in backward) the gradients keep their graph, so higher derivatives are torch's."""
    create_graph = torch.is_grad_enabled()
    inputs = (x, hx, *weights)
    with torch.enable_grad():
        if not create_graph:  # a fresh graph over detached leaves, gone when this returns
            inputs = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs_grad)]
        output, h_n = reference.rnn(
            inputs[0], inputs[1], list(inputs[2:]), masks, lengths, valid_rows, seq_len, num_layers, relu
        )
        # One gradient per distinct tensor: a tensor in two slots (tied weights) gets its whole
        # gradient in its first slot, as autograd sums the slots.
        slots = {}
        for t, need in zip(inputs, needs_grad):
            if need:
                slots.setdefault(id(t), t)
        grads = torch.autograd.grad(
            (output, h_n), list(slots.values()), (grad_out, grad_hn), allow_unused=True, create_graph=create_graph
        )
    by_id = dict(zip(slots, grads))
    return [by_id.pop(id(t), None) if need else None for t, need in zip(inputs, needs_grad)]


def _on_torch_in_backward(backend, grad_out, grad_hn):
    """Whether a backward pass runs :func:`_torch_gradients`: higher-order gradients
    (``create_graph``), gradients the kernels cannot read (vmap over backward, subclasses), or a
    backend that failed here."""
    return (
        torch.is_grad_enabled() or not backends.readable_by_kernels((grad_out, grad_hn)) or backend in backends.BROKEN
    )


def _guarded(backend, fused, fallback):
    """fused(), or for Triton, whose kernels compile on first use, fallback() after a compile or
    launch failure (warned about once; later calls then run torch)."""
    if backend != "triton":
        return fused()
    try:
        return fused()
    except torch.cuda.OutOfMemoryError:  # the caller's to handle (batch-size finders retry it)
        raise
    except Exception as error:  # any compiler or driver error
        backends.mark_broken(backend, error)
        return fallback()


class _EagerRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, hx, lengths, valid_rows, masks, config, *weights):
        output = _forward(x, hx, list(weights), masks, lengths, valid_rows, *config)
        _setup_context(ctx, (x, hx, weights, masks, lengths, valid_rows, *config), output)
        return output[:2]

    @staticmethod
    def backward(ctx, grad_out, grad_hn):
        arguments = _saved_arguments(ctx, grad_out, grad_hn)
        grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, seq_len, _, _, num_layers, relu, backend = (
            arguments
        )
        needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[6:])

        def on_torch():
            return _torch_gradients(
                grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu, needs_grad
            )

        if _on_torch_in_backward(backend, grad_out, grad_hn):
            grad_x, grad_hx, *grad_weights = on_torch()
        else:
            grad_x, grad_hx, grad_weights = _guarded(
                backend, lambda: _backward(*arguments, ctx.needs_input_grad[0]), lambda: _regrouped(on_torch())
            )
        return grad_x, grad_hx, None, None, None, None, *grad_weights


def _regrouped(gradients):
    grad_x, grad_hx, *grad_weights = gradients
    return grad_x, grad_hx, grad_weights


def _fused_layer_forward(x, hx, weights, lengths, relu, backend):
    """One padded layer that the backend runs whole: (output (T, B, D*H), h_n)."""
    n_dir = hx.shape[0]
    with profiler_label("fastrnn::rnn_fwd[{},L=1,D={}]", backend, n_dir):
        return _layer_forward(x, hx, _layer_params(weights, 0, 1, n_dir), lengths, None, x.shape[0], relu, backend)


class _EagerFusedLayer(torch.autograd.Function):
    """One padded layer that the backend runs whole (``fuses_whole_layer``): the same per-layer
    functions and results as :class:`_EagerRNN`, without the stack's bookkeeping (layer loops and
    lists, packing and unpacking the saved arguments), which cost about 20 us of a ~350 us
    training step at T=100, B=1, H=64 (measured in paired rounds on the 2-core EPYC)."""

    @staticmethod
    def forward(ctx, x, hx, lengths, config, *weights):
        output, h_n = _fused_layer_forward(x, hx, weights, lengths, *config)
        ctx.save_for_backward(x, hx, lengths, output, *weights)
        ctx.config = config
        return output, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_hn):
        x, hx, lengths, output, *weights = ctx.saved_tensors
        relu, backend = ctx.config
        if _on_torch_in_backward(backend, grad_out, grad_hn):
            needs_grad = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], *ctx.needs_input_grad[4:])
            grad_x, grad_h0, *grad_weights = _torch_gradients(
                grad_out, grad_hn, x, hx, weights, [], lengths, None, x.shape[0], 1, relu, needs_grad
            )
            return grad_x, grad_h0, None, None, *grad_weights
        n_dir = hx.shape[0]
        with profiler_label("fastrnn::rnn_bwd[{},L=1,D={}]", backend, n_dir):
            grad_x, grad_h0, grad_params = _layer_backward(
                grad_out,
                grad_hn,
                x,
                hx,
                _layer_params(weights, 0, 1, n_dir),
                output,
                lengths,
                None,
                relu,
                backend,
                ctx.needs_input_grad[0],
            )
        return grad_x, grad_h0, None, None, *(grad for direction in grad_params for grad in direction)


def rnn(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu, backend):
    """The fused stack of ``nn.RNN``; returns (output, h_n (L*D, B, H)).

    x and output: padded (T, B, I) and (T, B, D*H), or the valid rows (see valid_rows);
    hx (L*D, B, H); weights as ``nn.RNN._flat_weights`` (per direction w_ih, w_hh and zero, one
    or two biases, which are summed); masks: the L-1 dropout masks (already scaled, padded
    (T, B, D*H)) applied to each layer's output before the next, or []; lengths (B,) int64 on x's
    device; seq_len: T. valid_rows: None, or the flat indices t*B + b with t < lengths[b]
    (ascending: a PackedSequence's order); then x and output are those rows alone, (N, I) and
    (N, D*H), and the GEMMs skip the padding.
    """
    if (valid_rows is None) != (x.dim() == 3):
        raise ValueError(f"x must be (T, B, I) without valid_rows and (N, I) with them, got {tuple(x.shape)}")
    x, hx, weights = x.contiguous(), hx.contiguous(), [w.contiguous() for w in weights]
    if torch.compiler.is_compiling():
        output, h_n, _ = rnn_fwd(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu, backend)
        return output, h_n
    return _guarded(
        backend,
        lambda: _eager(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu, backend),
        lambda: reference.rnn(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu),
    )


def _eager(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu, backend):
    fused_layer = (
        num_layers == 1
        and valid_rows is None
        and backends.kernels(backend).fuses_whole_layer(seq_len, x.shape[1], x.shape[2], hx.shape[0], hx.shape[2])
    )
    if torch.is_grad_enabled() and (x.requires_grad or hx.requires_grad or any(w.requires_grad for w in weights)):
        if fused_layer:
            return _EagerFusedLayer.apply(x, hx, lengths, (relu, backend), *weights)
        return _EagerRNN.apply(x, hx, lengths, valid_rows, masks, (seq_len, num_layers, relu, backend), *weights)
    # Nothing to differentiate: skip the autograd.Function (about 20 us, a fifth of a small call).
    if fused_layer:
        return _fused_layer_forward(x, hx, weights, lengths, relu, backend)
    output, h_n, _ = _forward(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, relu, backend)
    return output, h_n
