"""``fastrnn.convert``: swap every ``torch.nn.RNN`` of a model for ``fastrnn.RNN`` in place."""
from torch import nn

from .nn import RNN


def convert(model, *, backend=None):
    """Replace each ``torch.nn.RNN`` submodule (not LSTM/GRU) of ``model`` by ``fastrnn.RNN``.

    The same parameter tensors are moved over, so weights, device, dtype, ``requires_grad`` flags,
    optimizer references and train/eval mode are kept. A bare ``nn.RNN`` passed as ``model`` is
    converted too. Returns ``model``; converting twice changes nothing.
    """
    if type(model) is nn.RNN:
        model.__class__ = RNN
        model.backend = backend
        return model
    for module in model.modules():
        if type(module) is nn.RNN:
            convert(module, backend=backend)
    return model
