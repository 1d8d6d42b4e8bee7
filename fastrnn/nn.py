"""``fastrnn.RNN``, ``fastrnn.GRU`` and ``fastrnn.LSTM``: the torch modules with their time loop and backward pass in
fused kernels. One forward serves every cell; each class only names its torch base."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import backends, functional
from .cells import CELLS

_BACKEND_DOC = """
    Same constructor, parameters, ``state_dict``, inputs, outputs and errors as ``torch.nn.{0}``
    (see its documentation). One extra keyword-only argument:

    Args:
        backend: ``"auto"`` (default: Numba on CPU, torch's cuDNN on CUDA), ``"numba"``, ``"triton"`` or
            ``"torch"`` (PyTorch's own implementation). ``None`` defers to the ``FASTRNN_BACKEND``
            environment variable. Inputs a fused backend does not cover (dtype, device) run on
            ``torch``.
    """


class _Fused(nn.RNNBase):
    """The forward of every fused module, over the torch base class named after it in the MRO."""

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        backends.requested(backend)
        self.backend = backend

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor | tuple[Tensor, Tensor]]:
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        weights = self._current_weights()
        states = () if hx is None else _states(hx)
        given = input, hx  # what torch's own call gets, should it run this one
        cast = backends.autocast_dtype(getattr(self, "backend", None), data.device, data.dtype)
        if cast is not None:  # autograd carries the gradients back through the casts
            input, weights = input.to(cast), [w.to(cast) for w in weights]
            states = [s.to(cast) if isinstance(s, Tensor) else s for s in states]
            hx = None if hx is None else _in_form(hx, states)
            data = input.data if packed else input
        backend = backends.resolve(
            getattr(self, "backend", None),
            data.device,
            data.dtype,
            (data, *states, *weights),
            cast_for_autocast=cast is not None,
        )
        # States of another dtype or device than the input: torch's call decides (nn.RNN and GRU
        # raise; nn.LSTM accepts some, and converts them).
        if backend == "torch" or any(
            isinstance(s, Tensor) and (s.dtype != data.dtype or s.device != data.device) for s in states
        ):
            return super().forward(*given)
        n_dir = 2 if self.bidirectional else 1
        if packed:
            # The fused op takes the packed rows as they are: no padded copy of the input.
            x, batch_sizes, sorted_indices, unsorted_indices = input
            lengths, packed_rows = functional.packed_layout(batch_sizes, x.device)
            seq_len, batch = batch_sizes.numel(), lengths.numel()
            checked_input = x
        else:
            batch_sizes = sorted_indices = unsorted_indices = packed_rows = None
            if input.dim() not in (2, 3):
                name = CELLS[self.mode].torch_class.__name__
                tensor = " tensor" if name == "RNN" else ""  # torch's own two wordings
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")
            batched = input.dim() == 3
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                _check_state_dims(_states(hx), batched)
                if not batched:
                    hx = _in_form(hx, [s.unsqueeze(1) for s in _states(hx)])
            x = input.transpose(0, 1) if self.batch_first else input
            seq_len, batch = x.shape[:2]
            lengths = torch.full((batch,), seq_len, dtype=torch.int64)
            checked_input = input
        if hx is None:
            h0 = x.new_zeros(self.num_layers * n_dir, batch, self.proj_size or self.hidden_size)
            if CELLS[self.mode].states == 2:
                hx = (h0, x.new_zeros(self.num_layers * n_dir, batch, self.hidden_size))
            else:
                hx = h0
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(checked_input, hx, batch_sizes)
        if seq_len == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        output, h_n = functional.stack(
            x,
            hx,
            weights,
            seq_len=seq_len,
            num_layers=self.num_layers,
            dropout=self.dropout,
            training=self.training,
            mode=self.mode,
            lengths=lengths,
            packed_rows=packed_rows,
            backend=backend,
        )
        if packed:
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                h_n, unsorted_indices
            )
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            return output.squeeze(0 if self.batch_first else 1), _in_form(h_n, [s.squeeze(1) for s in _states(h_n)])
        return output, h_n

    def _current_weights(self) -> list[Tensor]:
        """The weights as they are now, with ``_flat_weights`` (which nn.RNN's checks read) brought up
        to date where functional_call or a parametrization swapped them. nn.RNN's own refresh,
        ``_update_flat_weights``, costs 12 us a call here; this 3 us."""
        params = self._parameters
        weights = [params[name] if name in params else getattr(self, name) for name in self._flat_weights_names]
        if any(new is not old for new, old in zip(weights, self._flat_weights)):
            self._init_flat_weights()
        return weights

    def __prepare_scriptable__(self) -> nn.RNNBase:
        # torch.jit.script compiles the stock module's forward: a plain nn.RNN (nn.GRU) sharing this
        # one's parameters, so scripted models compute what torch computes and load without fastrnn.
        # A converted subclass scripts as the user's own class (its methods kept).
        base = next(c for c in type(self).__mro__ if not issubclass(c, _Fused))
        plain = base.__new__(base)
        plain.__dict__.update(self.__dict__)
        plain.__dict__.pop("backend", None)
        return plain


class RNN(_Fused, nn.RNN):
    __doc__ = "Drop-in replacement for :class:`torch.nn.RNN`.\n" + _BACKEND_DOC.format("RNN")


class GRU(_Fused, nn.GRU):
    __doc__ = "Drop-in replacement for :class:`torch.nn.GRU`.\n" + _BACKEND_DOC.format("GRU")


class LSTM(_Fused, nn.LSTM):
    __doc__ = "Drop-in replacement for :class:`torch.nn.LSTM` (``proj_size`` included).\n" + _BACKEND_DOC.format("LSTM")


def _states(hx):
    """hx as a tuple of state tensors: (h,), or LSTM's (h, c)."""
    return tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)


def _in_form(hx, states):
    """``states`` in hx's form: a tensor for one-state cells, a tuple for LSTM."""
    return tuple(states) if isinstance(hx, (tuple, list)) else states[0]


def _check_state_dims(states, batched):
    """torch's errors for states whose rank does not match the input's (nn.RNN/GRU, then nn.LSTM)."""
    want = 3 if batched else 2
    if all(s.dim() == want for s in states):
        return
    kind = "batched 3-D" if batched else "unbatched 2-D"
    if len(states) == 1:
        raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {states[0].dim()}-D tensor")
    dims = ", ".join(f"{s.dim()}-D" for s in states)
    raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got ({dims}) tensors")


def _let_dynamo_trace_rnn_subclasses():
    # Dynamo refuses every nn.RNN/GRU instance unless allow_rnn is set; fastrnn's forward is plain
    # traceable Python around custom ops, so compiled models would otherwise break the graph here.
    # Set on import (fastrnn modules also arrive by convert() and unpickling, which skip __init__).
    # The flag also lets Dynamo trace stock RNN/LSTM/GRU modules (experimental in torch).
    try:
        import torch._dynamo.config as dynamo_config
    except ImportError:  # torch builds without Dynamo
        return
    dynamo_config.allow_rnn = True


_let_dynamo_trace_rnn_subclasses()
