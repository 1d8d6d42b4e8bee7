"""``fastrnn.convert``: swap every ``torch.nn.RNN`` of a model for ``fastrnn.RNN`` in place."""

from __future__ import annotations

import functools

from torch import nn
from torch.nn.utils import parametrize

from .nn import RNN


def convert(model: nn.Module, *, backend: str | None = None) -> nn.Module:
    """Make each ``torch.nn.RNN`` submodule (not LSTM/GRU) of ``model`` a ``fastrnn.RNN``.

    The modules keep their identity: only their class changes, so weights, device, dtype,
    ``requires_grad`` flags, hooks, optimizer references and train/eval mode are kept. Subclasses
    of ``nn.RNN`` become subclasses of both (their own methods first, so an overridden ``forward``
    still runs; its ``super().forward`` is then fastrnn's), and parametrized RNNs keep their
    parametrizations. A bare ``nn.RNN`` passed as ``model`` is converted too. Returns ``model``;
    converting twice changes nothing.
    """
    for module in model.modules():
        if isinstance(module, nn.RNN) and not isinstance(module, RNN):
            module.__class__ = _fused_class(module)
            module.backend = backend
    return model


def _fused_class(module):
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__ == f"Parametrized{cls.__bases__[0].__name__}":
        # torch.nn.utils.parametrize gives each module a class of its own holding the parametrized
        # names as properties: rebuild it over the fused base, so remove_parametrizations restores that.
        body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        return type(cls.__name__, (_fused_base(cls.__bases__[0]),), body)
    return _fused_base(cls)


def _fused_base(cls):
    return RNN if cls is nn.RNN else _fused_subclass(cls)


@functools.cache
def _fused_subclass(cls):
    """``cls`` (a user's subclass of ``nn.RNN``) with fastrnn's forward under its own methods. Made at
    run time, so it pickles through :func:`_new_fused` and the importable ``cls``."""

    def __reduce_ex__(self, protocol):
        return _new_fused, (cls,), self.__getstate__()

    return type(cls.__name__, (cls, RNN), {"__reduce_ex__": __reduce_ex__, "__module__": cls.__module__})


def _new_fused(cls):
    return nn.Module.__new__(_fused_subclass(cls))
