"""The fused stack: every layer and direction of one ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` call as a
single autograd node.

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

from . import _layer, backends, reference
from .cells import CELLS
from .rows import scatter_rows, select_rows


def profiler_label(template, *args):
    """A ``record_function`` range named ``template.format(*args)`` while a profiler runs; free
    otherwise (entering one costs ~10 us, formatting the name ~1 us), and never traced by
    ``torch.compile``."""
    if torch.autograd.profiler._is_profiler_enabled and not torch.compiler.is_compiling():
        return torch.profiler.record_function(template.format(*args))
    return contextlib.nullcontext()


def _layer_states(states, index, num_layers):
    """Layer ``index``'s (D, B, ...) slices of the (L*D, B, ...) state tensors, as a tuple."""
    if num_layers == 1:
        return tuple(states)
    n_dir = states[0].shape[0] // num_layers
    return tuple(s[index * n_dir : (index + 1) * n_dir] for s in states)


def _layer_input(x, outputs, masks, index):
    """What layer ``index`` read: x, or the previous layer's output after its dropout mask."""
    if index == 0:
        return x
    return outputs[index - 1] * masks[index - 1] if masks else outputs[index - 1]


def _split_inner(inner, num_layers, mode, valid_rows, seq_len, batch, n_dir):
    """The ``inner`` list of :func:`_forward` -> (outputs of layers 0..L-2, per layer its saved
    tuple, padded (T, B, D, W) again where forward kept only the valid rows)."""
    per_layer = 1 if CELLS[mode].saved_per_step else 0
    outputs, saved = inner[: num_layers - 1], list(inner[num_layers - 1 :])
    if valid_rows is not None:
        saved = [scatter_rows(t, valid_rows, seq_len, batch).view(seq_len, batch, n_dir, -1) for t in saved]
    return outputs, [tuple(saved[i * per_layer : (i + 1) * per_layer]) for i in range(num_layers)]


def _forward(
    x: Tensor,
    hx: Sequence[Tensor],
    weights: Sequence[Tensor],
    masks: Sequence[Tensor],
    lengths: Tensor,
    valid_rows: Optional[Tensor],
    seq_len: int,
    num_layers: int,
    mode: str,
    backend: str,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """hx: the initial states, [h0] or LSTM's [h0, c0], each (L*D, B, ...). Returns output
    (T, B, D*P) [its (N, D*P) valid rows with ``valid_rows``], the final states like hx, and what
    backward needs besides: the padded outputs of layers 0..L-2, then each layer's saved
    tensors (see :func:`_split_inner`)."""
    return _run_layers(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode, backend, True)


def _run_layers(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode, backend, keep_saved):
    """:func:`_forward`; without ``keep_saved`` (inference) the cells may save nothing."""
    n_dir = hx[0].shape[0] // num_layers
    outputs, finals, saved = [], [], []
    with profiler_label("fastrnn::rnn_fwd[{},{},L={},D={}]", backend, mode, num_layers, n_dir):
        for index in range(num_layers):
            with profiler_label("fastrnn.layer{}", index):
                out, layer_finals, layer_saved = _layer.forward(
                    _layer_input(x, outputs, masks, index),
                    _layer_states(hx, index, num_layers),
                    _layer.params_of(weights, index, num_layers, n_dir),
                    lengths,
                    valid_rows,
                    seq_len,
                    mode,
                    backend,
                    keep_saved,
                )
            outputs.append(out)
            finals.append(layer_finals)
            saved.extend(layer_saved)
    h_n = list(finals[0]) if num_layers == 1 else [torch.cat(s) for s in zip(*finals)]
    output = outputs[-1] if valid_rows is None else select_rows(outputs[-1], valid_rows)
    if not keep_saved:
        saved = []
    elif valid_rows is not None:  # kept for backward as valid rows: packed input saves no padding
        saved = [select_rows(t, valid_rows) for t in saved]
    return output, h_n, outputs[:-1] + saved


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
    mode,
    backend,
    input_grad,
):
    """Gradients of x (None unless ``input_grad``), of each state in hx (a list) and of every
    weight, in ``weights`` order."""
    n_dir, batch = hx[0].shape[0] // num_layers, hx[0].shape[1]
    if valid_rows is not None:  # the kernels run on the padded layout
        output = scatter_rows(output, valid_rows, seq_len, batch)
        grad_out = scatter_rows(grad_out, valid_rows, seq_len, batch)
    inner_outputs, saved = _split_inner(inner, num_layers, mode, valid_rows, seq_len, batch, n_dir)
    outputs = [*inner_outputs, output]
    grad_hx = [None] * num_layers  # every slot is overwritten below
    grad_weights = []  # each layer's gradients go in front, from the last layer back
    grad_layer_out = grad_out
    with profiler_label("fastrnn::rnn_bwd[{},{},L={},D={}]", backend, mode, num_layers, n_dir):
        for index in reversed(range(num_layers)):
            with profiler_label("fastrnn.layer{}", index):
                grad_in, grad_hx[index], grad_params = _layer.backward(
                    grad_layer_out,
                    _layer_states(grad_hn, index, num_layers),
                    _layer_input(x, outputs, masks, index),
                    _layer_states(hx, index, num_layers),
                    _layer.params_of(weights, index, num_layers, n_dir),
                    outputs[index],
                    saved[index],
                    lengths,
                    valid_rows,
                    mode,
                    backend,
                    input_grad or index > 0,
                )
            grad_weights[:0] = [grad for direction in grad_params for grad in direction]
            if index > 0:
                grad_layer_out = grad_in * masks[index - 1] if masks else grad_in
    grad_states = list(grad_hx[0]) if num_layers == 1 else [torch.cat(g) for g in zip(*grad_hx)]
    return grad_in, grad_states, grad_weights


# Schemas inferred from the type hints: ints become SymInts, so sequence length and batch stay
# symbolic under torch.compile (no recompile per length).
rnn_fwd = torch.library.custom_op("fastrnn::rnn_fwd", _forward, mutates_args=())


@rnn_fwd.register_fake
def _(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode, backend):
    cell = CELLS[mode]
    n_dir, batch, out_width = hx[0].shape[0] // num_layers, hx[0].shape[1], hx[0].shape[2]
    hidden = weights[1].shape[0] // cell.gates
    layer_out = lambda: x.new_empty(seq_len, batch, n_dir * out_width)  # noqa: E731
    output = layer_out() if valid_rows is None else x.new_empty(valid_rows.shape[0], n_dir * out_width)
    width = cell.saved_per_step * hidden
    shape = (seq_len, batch, n_dir, width) if valid_rows is None else (valid_rows.shape[0], n_dir * width)
    saved = [x.new_empty(shape) for _ in range(num_layers)] if width else []
    return output, [s.new_empty(s.shape) for s in hx], [layer_out() for _ in range(num_layers - 1)] + saved


def _backward_op(
    grad_out: Tensor,
    grad_hn: Sequence[Tensor],
    x: Tensor,
    hx: Sequence[Tensor],
    weights: Sequence[Tensor],
    masks: Sequence[Tensor],
    lengths: Tensor,
    valid_rows: Optional[Tensor],
    seq_len: int,
    output: Tensor,
    inner: Sequence[Tensor],
    num_layers: int,
    mode: str,
    backend: str,
) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
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
        mode,
        backend,
        input_grad=True,
    )
    # A custom op's outputs may not alias each other: the directions' gradients are views of one
    # stacked tensor.
    return grad_x, grad_hx, [g.clone() for g in grad_weights]


rnn_bwd = torch.library.custom_op("fastrnn::rnn_bwd", _backward_op, mutates_args=())


@rnn_bwd.register_fake
def _(grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, seq_len, output, inner, num_layers, mode, backend):
    return torch.empty_like(x), [torch.empty_like(s) for s in hx], [torch.empty_like(w) for w in weights]


def _setup_context(ctx, inputs, output):
    x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode, backend = inputs
    output, _, inner = output
    # Weights are saved as the parameters themselves (stacked copies are remade in backward), and
    # deeper layers' inputs are remade from the previous output and its dropout mask.
    rows = () if valid_rows is None else (valid_rows,)
    ctx.save_for_backward(x, lengths, output, *hx, *weights, *masks, *inner, *rows)
    ctx.counts = (len(hx), len(weights), len(masks), len(rows))
    ctx.seq_len, ctx.config = seq_len, (num_layers, mode, backend)


def _saved_arguments(ctx, grad_out, grad_hn):
    """The arguments of :func:`_backward` (less ``input_grad``) from what forward saved."""
    x, lengths, output, *rest = ctx.saved_tensors
    n_states, n_weights, n_masks, n_rows = ctx.counts
    hx, rest = rest[:n_states], rest[n_states:]
    weights, masks = rest[:n_weights], rest[n_weights : n_weights + n_masks]
    inner = rest[n_weights + n_masks : len(rest) - n_rows]
    valid_rows = rest[-1] if n_rows else None
    grad_out = torch.zeros_like(output) if grad_out is None else grad_out
    grad_hn = [torch.zeros_like(s) if g is None else g for s, g in zip(hx, grad_hn)]
    return (grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, ctx.seq_len, output, inner, *ctx.config)


def _op_gradients(ctx, grad_out, grad_hn, grad_inner):
    grad_x, grad_hx, grad_weights = rnn_bwd(*_saved_arguments(ctx, grad_out, grad_hn))
    return grad_x, grad_hx, grad_weights, [None] * ctx.counts[2], None, None, None, None, None, None


rnn_fwd.register_autograd(_op_gradients, setup_context=_setup_context)


def _torch_gradients(
    grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode, needs_grad
):
    """Gradients of x, each state of hx and the weights (None where ``needs_grad`` is False), as one
    flat list, from torch's autograd through the reference loop: for the backward passes the
    kernels cannot serve. With ``create_graph`` (grad mode on in backward) the gradients keep
    their graph, so higher derivatives are torch's."""
    create_graph = torch.is_grad_enabled()
    inputs = (x, *hx, *weights)
    n_states = len(hx)
    with torch.enable_grad():
        if not create_graph:  # a fresh graph over detached leaves, gone when this returns
            inputs = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs_grad)]
        output, h_n = reference.rnn(
            inputs[0],
            tuple(inputs[1 : 1 + n_states]),
            list(inputs[1 + n_states :]),
            masks,
            lengths,
            valid_rows,
            seq_len,
            num_layers,
            mode,
        )
        # One gradient per distinct tensor: a tensor in two slots (tied weights) gets its whole
        # gradient in its first slot, as autograd sums the slots.
        slots = {}
        for t, need in zip(inputs, needs_grad):
            if need:
                slots.setdefault(id(t), t)
        grads = torch.autograd.grad(
            (output, *h_n), list(slots.values()), (grad_out, *grad_hn), allow_unused=True, create_graph=create_graph
        )
    by_id = dict(zip(slots, grads))
    return [by_id.pop(id(t), None) if need else None for t, need in zip(inputs, needs_grad)]


def _on_torch_in_backward(backend, grad_out, grad_hn):
    """Whether a backward pass runs :func:`_torch_gradients`: higher-order gradients
    (``create_graph``), gradients the kernels cannot read (vmap over backward, subclasses), or a
    backend that failed here."""
    return (
        torch.is_grad_enabled() or not backends.readable_by_kernels((grad_out, *grad_hn)) or backend in backends.BROKEN
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
    # apply(x, lengths, valid_rows, masks, config, n_states, *states, *weights): autograd tracks
    # only tensors given as arguments, so the states come flat.
    @staticmethod
    def forward(ctx, x, lengths, valid_rows, masks, config, n_states, *tensors):
        hx, weights = list(tensors[:n_states]), list(tensors[n_states:])
        output = _forward(x, hx, weights, masks, lengths, valid_rows, *config)
        _setup_context(ctx, (x, hx, weights, masks, lengths, valid_rows, *config), output)
        return output[0], *output[1]

    @staticmethod
    def backward(ctx, grad_out, *grad_hn):
        arguments = _saved_arguments(ctx, grad_out, grad_hn)
        grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, seq_len, _, _, num_layers, mode, backend = (
            arguments
        )
        needs_grad = (ctx.needs_input_grad[0], *ctx.needs_input_grad[6:])

        def on_torch():
            return _torch_gradients(
                grad_out, grad_hn, x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode, needs_grad
            )

        if _on_torch_in_backward(backend, grad_out, grad_hn):
            grad_x, *grads = on_torch()
        else:
            grad_x, grad_hx, grad_weights = _guarded(
                backend, lambda: _backward(*arguments, ctx.needs_input_grad[0]), lambda: _regrouped(on_torch(), len(hx))
            )
            grads = [*grad_hx, *grad_weights]
        return grad_x, None, None, None, None, None, *grads


def _regrouped(gradients, n_states):
    grad_x, *grads = gradients
    return grad_x, grads[:n_states], grads[n_states:]


def _fused_layer_forward(x, hx, weights, lengths, mode, backend, keep_saved=True):
    """One padded layer that the backend runs whole: (output (T, B, D*P), final states, saved)."""
    n_dir = hx[0].shape[0]
    params = _layer.params_of(weights, 0, 1, n_dir)
    with profiler_label("fastrnn::rnn_fwd[{},{},L=1,D={}]", backend, mode, n_dir):
        return _layer.forward(x, tuple(hx), params, lengths, None, x.shape[0], mode, backend, keep_saved)


class _EagerFusedLayer(torch.autograd.Function):
    """One padded layer that the backend runs whole (``fuses_whole_layer``): the same per-layer
    functions and results as :class:`_EagerRNN`, without the stack's bookkeeping (layer loops and
    lists, packing and unpacking the saved arguments), which cost about 20 us of a ~350 us
    training step at T=100, B=1, H=64 (measured in paired rounds on the 2-core EPYC).
    apply(x, lengths, config, n_states, *states, *weights)."""

    @staticmethod
    def forward(ctx, x, lengths, config, n_states, *tensors):
        hx, weights = tensors[:n_states], tensors[n_states:]
        output, finals, saved = _fused_layer_forward(x, hx, weights, lengths, *config)
        ctx.save_for_backward(x, lengths, output, *hx, *saved, *weights)
        ctx.config, ctx.counts = config, (n_states, len(saved))
        return output, *finals

    @staticmethod
    def backward(ctx, grad_out, *grad_hn):
        x, lengths, output, *rest = ctx.saved_tensors
        n_states, n_saved = ctx.counts
        hx, saved, weights = rest[:n_states], tuple(rest[n_states : n_states + n_saved]), rest[n_states + n_saved :]
        mode, backend = ctx.config
        grad_hn = [torch.zeros_like(s) if g is None else g for s, g in zip(hx, grad_hn)]
        if _on_torch_in_backward(backend, grad_out, grad_hn):
            needs_grad = (ctx.needs_input_grad[0], *ctx.needs_input_grad[4:])
            grad_x, *grads = _torch_gradients(
                grad_out, grad_hn, x, hx, weights, [], lengths, None, x.shape[0], 1, mode, needs_grad
            )
            return grad_x, None, None, None, *grads
        n_dir = hx[0].shape[0]
        with profiler_label("fastrnn::rnn_bwd[{},{},L=1,D={}]", backend, mode, n_dir):
            grad_x, grad_states, grad_params = _layer.backward(
                grad_out,
                grad_hn,
                x,
                hx,
                _layer.params_of(weights, 0, 1, n_dir),
                output,
                saved,
                lengths,
                None,
                mode,
                backend,
                ctx.needs_input_grad[0],
            )
        return grad_x, None, None, None, *grad_states, *(grad for direction in grad_params for grad in direction)


def rnn(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode, backend):
    """The fused stack of ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM``; returns (output, h_n), h_n in hx's form.

    x and output: padded (T, B, I) and (T, B, D*P), or the valid rows (see valid_rows);
    hx (L*D, B, H), or for LSTM the tuple (h0 (L*D, B, P), c0 (L*D, B, H)) (P = proj_size, or H);
    weights as ``nn.RNNBase._flat_weights`` (per direction w_ih, w_hh, zero, one or two biases,
    and LSTM's w_hr; Elman sums the biases); masks: the L-1 dropout masks (already scaled, padded
    (T, B, D*P)) applied to each layer's output before the next, or []; lengths (B,) int64 on x's
    device; seq_len: T; mode: the cell (``fastrnn.cells``). valid_rows: None, or the flat indices
    t*B + b with t < lengths[b] (ascending: a PackedSequence's order); then x and output are those
    rows alone, (N, I) and (N, D*P), and the GEMMs skip the padding.
    """
    if (valid_rows is None) != (x.dim() == 3):
        raise ValueError(f"x must be (T, B, I) without valid_rows and (N, I) with them, got {tuple(x.shape)}")
    as_tuple = isinstance(hx, (tuple, list))
    states = [s.contiguous() for s in (hx if as_tuple else (hx,))]
    x, weights = x.contiguous(), [w.contiguous() for w in weights]
    config = (seq_len, num_layers, mode, backend)
    if torch.compiler.is_compiling():
        output, finals, _ = rnn_fwd(x, states, weights, masks, lengths, valid_rows, *config)
    else:
        output, finals = _guarded(
            backend,
            lambda: _eager(x, states, weights, masks, lengths, valid_rows, *config),
            lambda: _flat(reference.rnn(x, tuple(states), weights, masks, lengths, valid_rows, *config[:3])),
        )
    return output, (tuple(finals) if as_tuple else finals[0])


def _flat(result):
    output, finals = result
    return output, list(finals)


def _eager(x, hx, weights, masks, lengths, valid_rows, seq_len, num_layers, mode, backend):
    """(output, final states as a list) of :func:`rnn` outside torch.compile."""
    n_states, config = len(hx), (seq_len, num_layers, mode, backend)
    fused_layer = (
        num_layers == 1
        and valid_rows is None
        and backends.kernels(backend, mode).fuses_whole_layer(
            seq_len, x.shape[1], x.shape[2], hx[0].shape[0], weights[1].shape[0] // CELLS[mode].gates, mode
        )
    )
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in (*hx, *weights))):
        if fused_layer:
            output, *finals = _EagerFusedLayer.apply(x, lengths, (mode, backend), n_states, *hx, *weights)
        else:
            output, *finals = _EagerRNN.apply(x, lengths, valid_rows, masks, config, n_states, *hx, *weights)
        return output, finals
    # Nothing to differentiate: skip the autograd.Function (about 20 us, a fifth of a small call),
    # and let the cells skip what only backward reads (GRU's and LSTM's gates: 4-5x the output's bytes).
    if fused_layer:
        output, finals, _ = _fused_layer_forward(x, hx, weights, lengths, mode, backend, keep_saved=False)
        return output, list(finals)
    output, finals, _ = _run_layers(x, hx, weights, masks, lengths, valid_rows, *config, keep_saved=False)
    return output, finals
