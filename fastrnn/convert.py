"""``fastrnn.convert``: swap the ``torch.nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` modules of a model for
fastrnn's in place."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import nn
from torch.nn.utils import parametrize

from .nn import GRU, LSTM, RNN

# torch class -> its fused drop-in (a subclass of it).
FUSED = {nn.RNN: RNN, nn.GRU: GRU, nn.LSTM: LSTM}


def convert(
    model: nn.Module, *, backend: str | None = None, classes: Iterable[type[nn.RNNBase]] = tuple(FUSED)
) -> nn.Module:
    """Make each ``torch.nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` submodule of ``model`` a ``fastrnn.RNN`` /
    ``GRU`` / ``LSTM``; ``classes`` limits that to some of them (``classes=[nn.GRU]``).

    The modules keep their identity: only their class changes, so weights, device, dtype,
    ``requires_grad`` flags, hooks, optimizer references and train/eval mode are kept. Subclasses
    of a torch class become subclasses of both (their own methods first, so an overridden
    ``forward`` still runs, and its ``super().forward`` is then the fused one), and parametrized
    modules keep their parametrizations. A bare module passed as ``model`` is converted too.
    Returns ``model``; converting twice changes nothing.
    """
    chosen = tuple(classes)
    unknown = [c for c in chosen if c not in FUSED]
    if unknown:
        raise ValueError(f"convert: no fused class for {unknown}; choose among {[c.__name__ for c in FUSED]}")
    for module in model.modules():
        torch_class = next((c for c in chosen if isinstance(module, c)), None)
        if torch_class is not None and not isinstance(module, FUSED[torch_class]):
            module.__class__ = _fused_class(module, torch_class)
            module.backend = backend
    return model


def _fused_class(module, torch_class):
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__ == f"Parametrized{cls.__bases__[0].__name__}":
        # torch.nn.utils.parametrize gives each module a class of its own holding the parametrized
        # names as properties: rebuild it over the fused base, so remove_parametrizations restores that.
        body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        return type(cls.__name__, (_fused_base(cls.__bases__[0], torch_class),), body)
    return _fused_base(cls, torch_class)


def _fused_base(cls, torch_class):
    return FUSED[torch_class] if cls is torch_class else _fused_subclass(cls, torch_class)


@functools.cache
def _fused_subclass(cls, torch_class):
    """``cls`` (a user's subclass of ``torch_class``) with the fused forward under its own methods.
    Made at run time, so it pickles through :func:`_new_fused` and the importable ``cls``."""

    def __reduce_ex__(self, protocol):
        return _new_fused, (cls, torch_class), self.__getstate__()

    body = {"__reduce_ex__": __reduce_ex__, "__module__": cls.__module__}
    return type(cls.__name__, (cls, FUSED[torch_class]), body)


def _new_fused(cls, torch_class=nn.RNN):
    # The default loads pickles written before GRU was fused (they name the class alone).
    return nn.Module.__new__(_fused_subclass(cls, torch_class))
