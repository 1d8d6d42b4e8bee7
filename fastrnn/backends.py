"""The one place a backend is chosen: ``backend=`` argument > ``FASTRNN_BACKEND`` > ``auto``.

- ``numba``: fused CPU kernels (float32, float64).
- ``triton``: fused GPU kernels (float32, float16, bfloat16); on CPU only under ``TRITON_INTERPRET=1``.
- ``torch``: PyTorch's own implementation, for everything the fused kernels do not cover.
"""
import functools
import importlib
import importlib.util
import os

import torch

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


def available_backends():
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


def requested(backend=None):
    """The validated backend name asked for (argument, then env var, then ``auto``)."""
    name = backend or os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"unknown fastrnn backend {name!r}; choose from 'auto', {', '.join(map(repr, BACKENDS))}")
    if name != "auto" and not _installed(name):
        raise RuntimeError(f"fastrnn backend {name!r} was requested but is not installed: {_INSTALL_HINT[name]}")
    return name


def _under_functorch():
    """torch.func transforms (grad, vmap, jvp) wrap tensors without storage: kernels cannot run.
    Dynamo's tracing also shows a functorch interpreter, but there the custom ops are traced, so
    compiling is not a transform."""
    if torch.compiler.is_compiling():
        return False
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def resolve(backend, device, dtype):
    """The backend that will run tensors of this device and dtype.

    A backend named explicitly but not covering the device or dtype falls back to ``torch``, so
    that fastrnn never fails where ``torch.nn.RNN`` works. So does autocast: torch's RNN casts its
    weights and inputs itself there, which the fused ops do not.
    """
    name = requested(backend)
    if torch._C._is_any_autocast_enabled() or _under_functorch():
        return "torch"
    if name != "auto":
        return name if _supports(name, device, dtype) else "torch"
    device_default = "triton" if device.type == "cuda" else "numba"
    if _installed(device_default) and _supports(device_default, device, dtype):
        return device_default
    return "torch"


@functools.lru_cache(maxsize=None)
def kernels(name):
    """The kernel module of a fused backend (``elman_forward`` / ``elman_backward``)."""
    return importlib.import_module(f"fastrnn.kernels.{name}.elman")
