import keras
import torch
from keras import activations

from fastrnn import backends, functional


def _is_activation(fn, name):
    """Whether ``fn`` is Keras's, ``keras.ops``' or torch's ``name``: the functions Keras's own
    ``cudnn_ok`` takes for that activation, all computing the same thing on the torch backend."""
    return any(fn is getattr(module, name, None) for module in (activations, keras.ops, torch))


class _FusedRNN:
    """The fused path SimpleRNN, GRU and LSTM share, mixed in ahead of the stock layer class.

    ``inner_loop`` runs the fused op where :meth:`_fused_plan` finds it reproduces the stock
    loop exactly, and the stock layer's own ``inner_loop`` everywhere else. A layer supplies
    :meth:`_cell_plan` (its cell's conditions) and :meth:`_run_op` (its weights in the op's
    layout, and the op call); the masks, directions, dropout and states are handled here. The
    cell's states (``_state_count`` of them, the output h first: LSTM's [h, c]) travel as a
    tuple, each (B, units) in Keras and (1, B, units) in the op.
    """

    _state_count = 1

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if keras.backend.backend() == "torch":
            if isinstance(mask, (list, tuple)):
                mask = mask[0]
            plan = self._fused_plan(sequences, initial_state, mask, training)
            if plan is not None:
                return self._fused_loop(sequences, initial_state, training, *plan)
        return super().inner_loop(sequences, initial_state, mask=mask, training=training)

    def _cell_plan(self, mask, training):
        """Keyword arguments for :meth:`_run_op` if the cell's settings have a fused equivalent,
        else None."""
        raise NotImplementedError

    def _run_op(self, x, states, lengths, **kwargs):
        """``(output (B, T, H), final states)`` of the fused op on batch-first ``x`` from
        ``states``, a tuple of the cell's initial states, each (1, B, H); the final states are a
        tuple the same way."""
        raise NotImplementedError

    def _fused_plan(self, sequences, initial_state, mask, training):
        """``(op kwargs, lengths)`` when the fused op reproduces Keras's loop exactly, else None.

        ``lengths`` is an int64 CPU tensor (B,) or None (every step valid).
        """
        cell = self.cell
        op_kwargs = self._cell_plan(mask, training)
        if op_kwargs is None:
            return None
        if training and cell.recurrent_dropout > 0:
            return None  # per-sequence mask on h_{t-1} inside the step; no fused equivalent
        if not isinstance(sequences, torch.Tensor) or sequences.ndim != 3:
            return None
        if sequences.shape[1] == 0 or len(initial_state) != self._state_count:
            return None
        # Devices and dtypes no fused kernel covers (including the meta device that
        # compute_output_spec traces on, and CUDA, where ``auto`` leaves torch/cuDNN in charge)
        # keep Keras's loop rather than fastrnn's torch reference.
        if backends.resolve(None, sequences.device, sequences.dtype) == "torch":
            return None
        kernel = keras.ops.convert_to_tensor(cell.kernel)
        if kernel.dtype != sequences.dtype or any(s.dtype != sequences.dtype for s in initial_state):
            return None
        if mask is None:
            return op_kwargs, None
        lengths = _right_padded_lengths(mask, sequences.shape[0], sequences.shape[1])
        if lengths is False:
            return None
        return op_kwargs, lengths

    def _fused_loop(self, sequences, initial_state, training, op_kwargs, lengths):
        cell = self.cell
        x = sequences  # (B, T, I)
        steps = x.shape[1]
        if training and cell.dropout > 0:
            # The mask RNN.call already drew for this batch, so both paths drop the same units.
            dp_mask = cell.get_dropout_mask(x[:, 0, :])
            x = x * dp_mask.unsqueeze(1)
        states = tuple(initial_state)
        if self.stateful:
            # RNN.call assigns the new states into the variables in place after we return; the op
            # must not have saved that storage for backward.
            states = tuple(s.clone() for s in states)

        if lengths is not None and self.go_backwards:
            # Keras flips the whole padded time axis, so each sequence becomes left-padded and its
            # valid steps run in reverse after (T - L) masked steps that keep h0 and output zeros.
            # Same as running each sequence's valid part reversed, then right-aligning the outputs.
            steps_idx = torch.arange(steps, device=x.device)
            lens = lengths.to(x.device)
            src = (lens.unsqueeze(1) - 1 - steps_idx).clamp_min(0)  # (B, T)
            x = torch.gather(x, 1, src.unsqueeze(2).expand(-1, -1, x.shape[2]))
        elif self.go_backwards:
            x = torch.flip(x, (1,))

        out, final = self._run_op(x, tuple(s.unsqueeze(0) for s in states), lengths, **op_kwargs)
        final = [s[0] for s in final]  # each (B, H)
        h = final[0]

        if lengths is not None:
            steps_idx = torch.arange(steps, device=x.device)
            lens = lengths.to(x.device)
            if self.go_backwards:
                pad = (steps - lens).unsqueeze(1)  # leading masked steps, output zeros
                src = (steps_idx - pad).clamp_min(0)
                out = torch.gather(out, 1, src.unsqueeze(2).expand(-1, -1, out.shape[2]))
                out = out * (steps_idx >= pad).unsqueeze(2).to(out.dtype)
            elif not self.zero_output_for_mask:
                # Keras repeats the last valid output over masked steps (zeros if none was valid);
                # the op left zeros there.
                valid = (steps_idx < lens.unsqueeze(1)).unsqueeze(2)
                carry = h * (lens > 0).unsqueeze(1).to(h.dtype)
                out = torch.where(valid, out, carry.unsqueeze(1))
        last = out[:, -1]
        if not self.return_sequences:
            out = last.unsqueeze(1)
        return last, out, final


@keras.saving.register_keras_serializable(package="fastrnn")
class SimpleRNN(_FusedRNN, keras.layers.SimpleRNN):
    """Drop-in ``keras.layers.SimpleRNN`` that runs fastrnn's fused kernels on the torch backend.

    Same constructor, weights (``kernel`` (I, H), ``recurrent_kernel`` (H, H), ``bias`` (H,)),
    config and results as the stock layer; only ``inner_loop`` changes. The fused op
    (:func:`fastrnn.functional.elman`) sees ``W_ih = kernel.T``, ``W_hh = recurrent_kernel.T``,
    ``b_ih = bias``, ``b_hh = 0``.

    Runs fused on the torch backend for activation ``"tanh"`` or ``"relu"``, with or without bias,
    any of ``return_sequences`` / ``return_state`` / ``go_backwards`` / ``stateful`` /
    ``initial_state``, input ``dropout`` (Keras's own per-sequence mask), no mask or a right-padded
    mask (e.g. ``Embedding(mask_zero=True)``). ``unroll`` is ignored on the fused path. Other masks,
    ``recurrent_dropout`` while training, other activations, and dtypes/devices the kernels do not
    cover (CUDA included, unless a fastrnn backend is named) run Keras's step loop, as do the
    jax/tensorflow/numpy backends.

    float64 runs in float64 throughout, whereas Keras's torch ``ops.matmul`` rounds float64
    products to float32, so float64 results agree with the stock layer to float32 precision.
    """

    def _cell_plan(self, mask, training):
        for nonlinearity in ("tanh", "relu"):
            if _is_activation(self.cell.activation, nonlinearity):
                return {"nonlinearity": nonlinearity}
        return None

    def _run_op(self, x, states, lengths, nonlinearity):
        cell = self.cell
        kernel = keras.ops.convert_to_tensor(cell.kernel)
        recurrent_kernel = keras.ops.convert_to_tensor(cell.recurrent_kernel)
        bias = keras.ops.convert_to_tensor(cell.bias).unsqueeze(0) if cell.use_bias else None
        out, h_n = functional.elman(
            x,
            states[0],
            kernel.T.unsqueeze(0),
            recurrent_kernel.T.unsqueeze(0),
            bias,
            lengths=lengths,
            nonlinearity=nonlinearity,
            batch_first=True,
        )
        return out, (h_n,)


@keras.saving.register_keras_serializable(package="fastrnn")
class GRU(_FusedRNN, keras.layers.GRU):
    """Drop-in ``keras.layers.GRU`` that runs fastrnn's fused kernels on the torch backend.

    Same constructor, weights (``kernel`` (I, 3H), ``recurrent_kernel`` (H, 3H), ``bias``
    (2, 3H): input bias row 0, recurrent bias row 1; gate blocks z, r, h), config and results as
    the stock layer; only ``inner_loop`` changes. With ``reset_after=True`` (Keras's default)
    Keras's GRU is torch's, so the fused op (:func:`fastrnn.functional.gru`) sees the same
    weights transposed, with the gate blocks reordered to torch's r, z, n: ``W_ih = kernel.T``,
    ``W_hh = recurrent_kernel.T``, ``b_ih = bias[0]``, ``b_hh = bias[1]``.

    Runs fused on the torch backend for activation ``"tanh"`` and recurrent activation
    ``"sigmoid"`` with ``reset_after=True``, with or without bias, any of ``return_sequences`` /
    ``return_state`` / ``go_backwards`` / ``stateful`` / ``initial_state``, input ``dropout``
    (Keras's own per-sequence mask), no mask or a right-padded mask. ``unroll`` and
    ``use_cudnn="auto"`` / ``False`` do not change the fused path. Keras's loop (its cuDNN path
    where it has one) runs for ``reset_after=False``, other activations, other masks,
    ``recurrent_dropout`` while training, the legacy ``implementation=1`` (one input dropout mask
    per gate) with dropout while training, ``dropout=1`` while training (Keras's two paths treat
    it differently), ``use_cudnn=True`` with a mask or ``recurrent_dropout`` (where Keras raises),
    and dtypes/devices the kernels do not cover (CUDA included, unless a fastrnn backend is named),
    as on the jax/tensorflow/numpy backends. ``Bidirectional`` on CUDA calls Keras's fused
    bidirectional cuDNN GRU and skips both layers' ``inner_loop``.

    float64 runs in float64 throughout (see :class:`SimpleRNN`).
    """

    def _cell_plan(self, mask, training):
        return {} if self.cell.reset_after and _gated_cell_ok(self, mask, training) else None

    def _run_op(self, x, states, lengths):
        cell = self.cell
        w_ih = _torch_gate_order(keras.ops.convert_to_tensor(cell.kernel)).T
        w_hh = _torch_gate_order(keras.ops.convert_to_tensor(cell.recurrent_kernel)).T
        b_ih = b_hh = None
        if cell.use_bias:
            bias = _torch_gate_order(keras.ops.convert_to_tensor(cell.bias))  # (2, 3H)
            b_ih, b_hh = bias[0:1], bias[1:2]
        out, h_n = functional.gru(
            x, states[0], w_ih.unsqueeze(0), w_hh.unsqueeze(0), b_ih, b_hh, lengths=lengths, batch_first=True
        )
        return out, (h_n,)


@keras.saving.register_keras_serializable(package="fastrnn")
class LSTM(_FusedRNN, keras.layers.LSTM):
    """Drop-in ``keras.layers.LSTM`` that runs fastrnn's fused kernels on the torch backend.

    Same constructor, weights (``kernel`` (I, 4H), ``recurrent_kernel`` (H, 4H), ``bias`` (4H,);
    gate blocks i, f, c, o), config, states ``[h, c]`` and results as the stock layer; only
    ``inner_loop`` changes. Keras's LSTM is torch's, gate order included, so the fused op
    (:func:`fastrnn.functional.lstm`) sees ``W_ih = kernel.T``, ``W_hh = recurrent_kernel.T``,
    ``b_ih = bias``, ``b_hh = 0``.

    Runs fused on the torch backend for activation ``"tanh"`` and recurrent activation
    ``"sigmoid"``, with or without bias, any of ``return_sequences`` / ``return_state`` /
    ``go_backwards`` / ``stateful`` / ``initial_state`` ([h, c]), input ``dropout`` (Keras's own
    per-sequence mask), no mask or a right-padded mask. ``unroll``, ``implementation`` (without
    dropout while training) and ``use_cudnn="auto"`` / ``False`` do not change the fused path.
    Keras's loop (its cuDNN path where it has one) runs for other activations, other masks,
    ``recurrent_dropout`` while training, the legacy ``implementation=1`` (one input dropout mask
    per gate) with dropout while training, ``dropout=1`` while training, ``use_cudnn=True`` with a
    mask or ``recurrent_dropout`` (where Keras raises), and dtypes/devices the kernels do not cover
    (CUDA included, unless a fastrnn backend is named), as on the jax/tensorflow/numpy backends.
    ``Bidirectional`` on CUDA calls Keras's fused bidirectional cuDNN LSTM and skips both layers'
    ``inner_loop``.

    float64 runs in float64 throughout (see :class:`SimpleRNN`).
    """

    _state_count = 2  # [h, c]

    def _cell_plan(self, mask, training):
        return {} if _gated_cell_ok(self, mask, training) else None

    def _run_op(self, x, states, lengths):
        cell = self.cell
        w_ih = keras.ops.convert_to_tensor(cell.kernel).T.unsqueeze(0)
        w_hh = keras.ops.convert_to_tensor(cell.recurrent_kernel).T.unsqueeze(0)
        b_ih = b_hh = None
        if cell.use_bias:
            # functional.lstm takes both biases or neither; b_hh folds into the input projection,
            # so a zero b_hh costs one (4H,) add per call.
            b_ih = keras.ops.convert_to_tensor(cell.bias).unsqueeze(0)
            b_hh = torch.zeros_like(b_ih)
        return functional.lstm(x, states, w_ih, w_hh, b_ih, b_hh, lengths=lengths, batch_first=True)


def _gated_cell_ok(layer, mask, training):
    """Whether GRU / LSTM settings other than the cell's own (GRU's ``reset_after``) let the
    fused op reproduce Keras's ``inner_loop``: its tanh / sigmoid activations, and the
    ``use_cudnn`` / dropout cases where Keras's two paths (its backend op without a mask, the
    step loop with one) differ or raise."""
    cell = layer.cell
    if not (_is_activation(cell.activation, "tanh") and _is_activation(cell.recurrent_activation, "sigmoid")):
        return False
    if getattr(layer, "use_cudnn", "auto") is True and (mask is not None or cell.recurrent_dropout):
        return False  # Keras raises a ValueError for these; keep its error
    if training and cell.dropout > 0:
        # dropout=1: Keras's unmasked path drops every input, its step loop none; implementation=1
        # draws one input mask per gate.
        if cell.dropout >= 1 or getattr(cell, "dropout_mask_count", None) is not None:
            return False
    return True


def _torch_gate_order(weight):
    """Keras's GRU gate blocks (z, r, h) along the last axis, in torch's order (r, z, n)."""
    z, r, h = torch.chunk(weight, 3, dim=-1)
    return torch.cat((r, z, h), dim=-1)


def _right_padded_lengths(mask, batch, steps):
    """Per-sequence lengths (B,) int64 on CPU if ``mask`` (B, T) is right-padded; None if all
    steps are valid; False otherwise."""
    mask = keras.ops.convert_to_tensor(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if tuple(mask.shape) != (batch, steps):
        return False
    mask = mask.to(torch.bool)
    lengths = mask.sum(1)
    expected = torch.arange(steps, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    # One host sync per call: the kernels take lengths on the CPU anyway.
    lengths = lengths.to("cpu", torch.int64)
    if not bool(torch.equal(mask, expected)):
        return False
    if bool((lengths == steps).all()):
        return None
    return lengths
