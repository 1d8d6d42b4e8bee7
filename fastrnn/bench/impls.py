"""What is being compared: torch's module of the case's cell (``torch.nn.RNN``, ``nn.GRU`` or
``nn.LSTM``, ``proj_size`` included), an optional ``torch.compile`` of it, and fastrnn's fused one
(``fastrnn.RNN``, ``fastrnn.GRU`` or ``fastrnn.LSTM``) on each available backend, all with the same
weights and inputs.

A :class:`Runner` owns one module and its inputs and exposes the three calls the timers need:
``forward()``, ``backward(outputs)`` and ``infer()``.
"""

import dataclasses

import torch
from torch.nn.utils.rnn import PackedSequence

from ..cells import CELLS
from ..profile import make_input
from .cases import DTYPES

TORCH = "torch"
COMPILE = "torch.compile"


def fastrnn_backends(device="cpu"):
    """fastrnn's fused backends usable on ``device`` (its ``torch`` backend is the baseline itself)."""
    try:
        import fastrnn
    except ImportError:
        return []
    device = torch.device(device)
    usable = [b for b in fastrnn.available_backends() if b != "torch"]
    return [b for b in usable if (b == "numba") == (device.type == "cpu")]


def impl_names(device="cpu", backends=None, compile=False):
    """``torch`` first (the baseline), then ``torch.compile`` if asked, then ``fastrnn[<backend>]``."""
    if backends is None:
        backends = fastrnn_backends(device)
    names = [TORCH] + ([COMPILE] if compile else [])
    return names + [f"fastrnn[{b}]" for b in backends]


def backend_of(impl):
    return impl[len("fastrnn[") : -1] if impl.startswith("fastrnn[") else None


def torch_class(case):
    """torch's module class of ``case.cell``: ``torch.nn.RNN``, ``nn.GRU`` or ``nn.LSTM``."""
    return CELLS[case.mode].torch_class


def fused_class(case):
    """fastrnn's drop-in of ``case.cell``: ``fastrnn.RNN``, ``fastrnn.GRU`` or ``fastrnn.LSTM``."""
    from ..convert import FUSED

    return FUSED[torch_class(case)]


def _module_kwargs(case, device):
    kwargs = dict(num_layers=case.layers, bidirectional=case.bidirectional, device=device, dtype=DTYPES[case.dtype])
    if case.cell == "RNN":
        kwargs["nonlinearity"] = case.nonlinearity
    if case.proj_size:
        kwargs["proj_size"] = case.proj_size
    return kwargs


def reference_module(case, device, seed=0):
    torch.manual_seed(seed)
    return torch_class(case)(case.input_size, case.H, **_module_kwargs(case, device))


def build(impl, case, device, reference=None):
    """A module for ``impl`` holding the same weights as ``reference`` (built if not given)."""
    reference = reference if reference is not None else reference_module(case, device)
    if impl in (TORCH, COMPILE):
        module = reference_module(case, device)
        module.load_state_dict(reference.state_dict())
        if impl == COMPILE:
            # nn.RNN.forward is one code object for every instance: reset so that each case gets
            # its own graph instead of hitting the recompile limit and silently running eagerly.
            torch._dynamo.reset()
            module = torch.compile(module, dynamic=False)
        return module
    backend = backend_of(impl)
    if backend is None:
        raise ValueError(f"unknown implementation {impl!r}")
    module = fused_class(case)(case.input_size, case.H, backend=backend, **_module_kwargs(case, device))
    module.load_state_dict(reference.state_dict())
    return module


def make_inputs(case, device, seed=1):
    """x (T, B, I) [as a PackedSequence when the case is packed], a leaf that requires grad."""
    return make_input(
        case.T, case.B, case.input_size, dtype=DTYPES[case.dtype], device=device, packed=case.packed, seed=seed
    )


def _sync(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@dataclasses.dataclass
class Runner:
    """One implementation on one case: module, inputs, fixed upstream gradients (for the output and
    h_n, and LSTM's c_n: ``forward()`` returns the states flat, ``(out, h_n[, c_n])``)."""

    impl: str
    case: object
    device: str
    module: torch.nn.Module
    x: object
    grads: tuple = ()

    @classmethod
    def create(cls, impl, case, device, reference=None):
        module = build(impl, case, device, reference)
        rows = case.tokens if case.packed else (case.T, case.B)
        width, n_states = case.proj_size or case.H, CELLS[case.mode].states
        shapes = (
            (*([rows] if case.packed else rows), case.directions * width),
            (case.layers * case.directions, case.B, width),
            *[(case.layers * case.directions, case.B, case.H)] * (n_states - 1),
        )
        gen = torch.Generator().manual_seed(2)
        grads = tuple(torch.randn(s, generator=gen).to(device=device, dtype=DTYPES[case.dtype]) for s in shapes)
        return cls(impl, case, device, module, make_inputs(case, device), grads)

    @property
    def sync(self):
        return _sync(self.device)

    def forward(self):
        out, h_n = self.module(self.x)
        states = h_n if isinstance(h_n, tuple) else (h_n,)  # LSTM's (h_n, c_n)
        return (out.data if isinstance(out, PackedSequence) else out), *states

    def backward(self, outputs):
        torch.autograd.backward(outputs, self.grads)

    def zero_grad(self):
        self.module.zero_grad(set_to_none=True)
        (self.x.data if isinstance(self.x, PackedSequence) else self.x).grad = None

    def infer(self):
        with torch.no_grad():
            return self.module(self.x)

    def train_step(self):
        self.zero_grad()
        self.backward(self.forward())
