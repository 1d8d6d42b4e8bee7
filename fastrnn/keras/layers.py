import keras
import torch
from keras import activations

from fastrnn import backends, functional


@keras.saving.register_keras_serializable(package="fastrnn")
class SimpleRNN(keras.layers.SimpleRNN):
    """Drop-in ``keras.layers.SimpleRNN`` that runs fastrnn's fused kernels on the torch backend.

    Same constructor, weights (``kernel`` (I, H), ``recurrent_kernel`` (H, H), ``bias`` (H,)),
    config and results as the stock layer; only ``inner_loop`` changes. The fused op sees
    ``W_ih = kernel.T``, ``W_hh = recurrent_kernel.T``, ``b_ih = bias``, ``b_hh = 0``.

    Runs fused on the torch backend for activation ``"tanh"`` or ``"relu"``, with or without bias,
    any of ``return_sequences`` / ``return_state`` / ``go_backwards`` / ``stateful`` /
    ``initial_state``, input ``dropout`` (Keras's own per-sequence mask), no mask or a right-padded
    mask (e.g. ``Embedding(mask_zero=True)``). ``unroll`` is ignored on the fused path. Other masks,
    ``recurrent_dropout`` while training, other activations, and dtypes/devices the kernels do not
    cover run Keras's step loop, as do the jax/tensorflow/numpy backends.

    float64 runs in float64 throughout, whereas Keras's torch ``ops.matmul`` rounds float64
    products to float32, so float64 results agree with the stock layer to float32 precision.
    """

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if keras.backend.backend() == "torch":
            if isinstance(mask, (list, tuple)):
                mask = mask[0]
            plan = self._fused_plan(sequences, initial_state, mask, training)
            if plan is not None:
                return self._fused_loop(sequences, initial_state, training, *plan)
        return super().inner_loop(sequences, initial_state, mask=mask, training=training)

    def _fused_plan(self, sequences, initial_state, mask, training):
        """``(nonlinearity, lengths)`` when the fused op reproduces Keras's loop exactly, else None.

        ``lengths`` is an int64 CPU tensor (B,) or None (every step valid).
        """
        cell = self.cell
        if cell.activation is activations.tanh:
            nonlinearity = "tanh"
        elif cell.activation is activations.relu:
            nonlinearity = "relu"
        else:
            return None
        if training and cell.recurrent_dropout > 0:
            return None  # per-sequence mask on h_{t-1} inside the step; no fused equivalent
        if not isinstance(sequences, torch.Tensor) or sequences.ndim != 3:
            return None
        if sequences.shape[1] == 0 or len(initial_state) != 1:
            return None
        # Devices and dtypes no fused kernel covers (including the meta device that
        # compute_output_spec traces on) keep Keras's loop rather than fastrnn's torch reference.
        if backends.resolve(None, sequences.device, sequences.dtype) == "torch":
            return None
        kernel = keras.ops.convert_to_tensor(cell.kernel)
        if kernel.dtype != sequences.dtype or initial_state[0].dtype != sequences.dtype:
            return None
        if mask is None:
            return nonlinearity, None
        lengths = _right_padded_lengths(mask, sequences.shape[0], sequences.shape[1])
        if lengths is False:
            return None
        return nonlinearity, lengths

    def _fused_loop(self, sequences, initial_state, training, nonlinearity, lengths):
        cell = self.cell
        x = sequences  # (B, T, I)
        steps = x.shape[1]
        if training and cell.dropout > 0:
            # The mask RNN.call already drew for this batch, so both paths drop the same units.
            dp_mask = cell.get_dropout_mask(x[:, 0, :])
            x = x * dp_mask.unsqueeze(1)
        h0 = initial_state[0]
        if self.stateful:
            # RNN.call assigns the new state into the variable in place after we return; the op
            # must not have saved that storage for backward.
            h0 = h0.clone()

        kernel = keras.ops.convert_to_tensor(cell.kernel)
        recurrent_kernel = keras.ops.convert_to_tensor(cell.recurrent_kernel)
        bias = keras.ops.convert_to_tensor(cell.bias).unsqueeze(0) if cell.use_bias else None

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

        out, h_n = functional.elman(
            x,
            h0.unsqueeze(0),
            kernel.T.unsqueeze(0),
            recurrent_kernel.T.unsqueeze(0),
            bias,
            lengths=lengths,
            nonlinearity=nonlinearity,
            batch_first=True,
        )
        h = h_n[0]  # (B, H)

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
        return last, out, [h]


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
