"""fastrnn: a drop-in ``torch.nn.RNN`` whose time loop and backward pass run as fused kernels."""
from . import functional
from .backends import available_backends
from .convert import convert
from .nn import RNN

__version__ = "0.1.0"
__all__ = ["RNN", "convert", "functional", "available_backends", "__version__"]
