"""fastrnn: drop-in ``torch.nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` whose time loop and backward pass run as
fused kernels."""

from importlib import metadata as _metadata

from . import functional
from .backends import available_backends
from .convert import convert
from .nn import GRU, LSTM, RNN

try:
    __version__ = _metadata.version("fastrnn")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["RNN", "GRU", "LSTM", "convert", "functional", "available_backends", "__version__"]
