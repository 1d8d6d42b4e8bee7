"""The one place a backend is chosen: ``backend=`` argument > ``FASTRNN_BACKEND`` > ``auto``.

- ``numba``: fused CPU kernels (float32, float64).
- ``triton``: fused GPU kernels (float32, float16, bfloat16); on CPU only under ``TRITON_INTERPRET=1``.
- ``torch``: PyTorch's own implementation, for everything the fused kernels do not cover.

The principle, decided here per call: where the fused path cannot serve a mode (tracing,
exporting, autocast, ``torch.func`` transforms, forward-mode AD, tensor subclasses, a dtype or
device it lacks, a kernel that failed to build), fastrnn runs torch's own implementation, with
identical results. A limitation of the fused path is never the user's error.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .cells import CELLS

BACKENDS = ("numba", "triton", "torch")
ENV_VAR = "FASTRNN_BACKEND"
_INSTALL_HINT = {"numba": "pip install numba scipy", "triton": "pip install triton (and a CUDA GPU)"}
_DTYPES = {
    "numba": (torch.float32, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


_REQUIRES = {"numba": ("numba", "scipy"), "triton": ("triton",), "torch": ()}
# Looked up once: a plain dict keeps resolve() cheap and traceable by torch.compile.
INSTALLED = {name: all(importlib.util.find_spec(dep) is not None for dep in deps) for name, deps in _REQUIRES.items()}


def _installed(name):
    return INSTALLED[name]


def _triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """Backends that can run on this machine, fastest first."""
    usable = []
    if _installed("numba"):
        usable.append("numba")
    if _installed("triton") and (torch.cuda.is_available() or _triton_interpreted()):
        usable.append("triton")
    return usable + ["torch"]


def _supports(name, device, dtype):
    if name == "torch":
        return True
    on_device = device.type == "cpu" if name == "numba" else (device.type == "cuda" or _triton_interpreted())
    return on_device and dtype in _DTYPES[name]


def requested(backend: str | None = None) -> str:
    """The validated backend name asked for (argument, then env var, then ``auto``)."""
    name = backend or os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown fastrnn backend {name!r}; choose from 'auto', {', '.join(map(repr, BACKENDS))}")
    if name != "auto" and not _installed(name):
        raise RuntimeError(f"fastrnn backend {name!r} was requested but is not installed: {_INSTALL_HINT[name]}")
    return name


# What ``auto`` runs per device type. CUDA stays on torch (cuDNN) until a committed GPU report shows
# the Triton kernels ahead there; ``backend="triton"`` opts in.
_AUTO = {"cpu": "numba"}
# Fused backends that failed to compile or launch here: they hand every later call to torch.
BROKEN = {}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def autocast_dtype(backend: str | None, device: torch.device, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the Triton kernels run in under autocast, or None where torch runs the call.

    Under ``torch.autocast`` of the tensors' device with ``backend="triton"`` and a float16 or
    bfloat16 autocast dtype, the caller casts input, states and weights (float32, float16 or
    bfloat16 ones; float64 stays, as autocast leaves it) to that dtype and runs the half-precision
    kernels, which return it. torch's cuDNN RNN casts to float16 under any CUDA autocast, bfloat16
    included; fastrnn gives the dtype asked for. Every other autocast call runs torch's own RNN.
    """
    if not torch._C._is_any_autocast_enabled() or dtype == torch.float64 or not dtype.is_floating_point:
        return None
    if (backend or os.environ.get(ENV_VAR)) != "triton" or not torch.is_autocast_enabled(device.type):
        return None
    cast = torch.get_autocast_dtype(device.type)
    return cast if cast in (torch.float16, torch.bfloat16) else None


def torch_only_mode(tensors: Iterable[Tensor | None] = (), *, cast_for_autocast: bool = False) -> str | None:
    """Why the fused kernels cannot serve this call, or None where they can.

    The kernels run on raw memory, outside torch's dispatcher, so every mode that records,
    transforms or reinterprets tensor operations must see torch's own ops instead: tracing
    (``jit.trace``, the legacy ONNX exporter), ``torch.export`` (and the dynamo ONNX exporter),
    autocast, ``torch.func`` transforms (grad, vmap, jvp), forward-mode AD, and tensor subclasses
    (``ExpandedWeights``, ``DTensor``, ...). ``torch.compile`` is none of these: it traces the
    custom ops, which stand for the kernels. Cheap: a handful of flag reads and type checks.
    ``cast_for_autocast``: the caller has cast the tensors for autocast (:func:`autocast_dtype`).
    """
    if torch._C._is_any_autocast_enabled() and not cast_for_autocast:  # torch's RNN casts for itself
        return "autocast"
    if torch.compiler.is_compiling():
        return "exporting" if _is_exporting() else None
    if torch._C._get_tracing_state() is not None:
        return "tracing"
    if _dispatch_modes():  # FlopCounterMode, FakeTensorMode, ...: they must see torch's ops
        return "a torch dispatch mode"
    if _peek_functorch() is not None:
        return "a torch.func transform"
    if forward_ad._current_level >= 0:
        return "forward-mode AD"
    for t in tensors:
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return f"a tensor subclass ({type(t).__name__})"
    return None


def readable_by_kernels(tensors: Iterable[Tensor | None]) -> bool:
    """Whether the kernels can read these tensors' memory: plain tensors, no subclass and no
    functorch wrapper (such as the batched gradients that vmap over a backward pass hands to it)."""
    return all(t is None or (type(t) in _PLAIN_TENSORS and not _is_functorch_wrapped(t)) for t in tensors)


def _is_exporting():
    # torch.compiler.is_exporting arrived in torch 2.6; before it, export records the custom ops.
    return getattr(torch.compiler, "is_exporting", lambda: False)()


_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_functorch = getattr(torch._C, "_functorch", None)
_peek_functorch = getattr(_functorch, "peek_interpreter_stack", lambda: None)
_is_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", lambda t: False)
_is_legacy_batched = getattr(_functorch, "is_legacy_batchedtensor", lambda t: False)  # gradcheck's vmap


def _is_functorch_wrapped(t):
    return _is_wrapped(t) or _is_legacy_batched(t)


def resolve(
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    tensors: Iterable[Tensor | None] = (),
    *,
    cast_for_autocast: bool = False,
) -> str:
    """The backend that will run tensors of this device and dtype.

    Whatever the fused kernels cannot serve runs on ``torch``, so that fastrnn never fails, and is
    never wrong, where ``torch.nn.RNN`` works: a backend named explicitly that does not cover the
    device or dtype, a mode of :func:`torch_only_mode` (given the call's ``tensors``), and a backend
    that failed here before (see :func:`mark_broken`).
    """
    name = requested(backend)
    if torch_only_mode(tensors, cast_for_autocast=cast_for_autocast) is not None:
        return "torch"
    if name == "auto":
        name = _AUTO.get(device.type, "torch")
        if name != "torch" and not _installed(name):
            return "torch"
    if name == "torch" or name in BROKEN or not _supports(name, device, dtype):
        return "torch"
    return name


def mark_broken(name: str, error: BaseException) -> None:
    """A fused backend failed to compile or launch: warn once, and run torch from now on."""
    if name not in BROKEN:
        BROKEN[name] = f"{type(error).__name__}: {error}"  # not the exception: its frames hold tensors
        warnings.warn(
            f"fastrnn: the {name} kernels failed here ({type(error).__name__}: {error}); running torch's "
            f"implementation instead from now on",
            RuntimeWarning,
            stacklevel=3,
        )


@functools.cache
def kernels(name: str, mode: str = "RNN_TANH"):
    """The kernel module of a fused backend for cell ``mode`` (CONTRACTS.md, "Kernel launchers"):
    Numba has one module per cell, Triton one generic over cells."""
    if name == "numba":
        return importlib.import_module(f"fastrnn.kernels.numba.{CELLS[mode].kernel}")
    return importlib.import_module(f"fastrnn.kernels.{name}.recurrence")
