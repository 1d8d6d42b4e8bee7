"""Keras 3 front end: ``fastrnn.keras.SimpleRNN``, ``fastrnn.keras.GRU`` and ``fastrnn.keras.LSTM``
run the fused Elman, GRU and LSTM kernels on the torch backend, as drop-ins for
``keras.layers.SimpleRNN`` / ``GRU`` / ``LSTM``; ``fastrnn.keras.convert`` swaps them into an existing
Sequential or Functional model.

Install with ``pip install "fastrnn[keras]"`` and set ``KERAS_BACKEND=torch``. Importing ``fastrnn``
alone never imports Keras; importing this module does.
"""

try:
    import keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastrnn.keras needs Keras 3; install it with: pip install 'fastrnn[keras]'") from exc

if int(keras.version().split(".")[0]) != 3:  # pragma: no cover
    raise ImportError(
        f"fastrnn.keras supports Keras 3.x (it overrides the internal RNN.inner_loop); found keras {keras.version()}"
    )

from fastrnn.keras.convert import convert
from fastrnn.keras.layers import GRU, LSTM, SimpleRNN

__all__ = ["GRU", "LSTM", "SimpleRNN", "convert"]
