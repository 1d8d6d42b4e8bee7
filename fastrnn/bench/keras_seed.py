"""The seed's Keras model trained with stock keras.layers.SimpleRNN vs fastrnn.keras.SimpleRNN.

The model is defined here, once: ``python -m fastrnn.bench`` times it through :func:`run`,
examples/seed_keras.py trains it and tests/test_keras.py converts it (through the example).
``run(quick)`` returns rows for the bench report; ``[]`` when Keras is not installed or another
backend is already loaded in this process. Standalone: ``python -m fastrnn.bench.keras_seed [--quick]``.

Keras is imported inside the functions: the backend is fixed by the first import, and the bench
must pick torch only if nothing imported Keras before it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Any

CASE = "keras seed model"
INPUT_SHAPE, NUM_CLASSES = (10, 20), 5


def create_rnn_model(input_shape: tuple[int, int] = INPUT_SHAPE, num_classes: int = NUM_CLASSES, rnn: Any = None):
    """The seed's classifier, Input -> rnn(64) -> rnn(32) -> Dense 16 -> softmax, compiled.

    ``rnn`` is the recurrent layer class (default ``keras.layers.SimpleRNN``).
    """
    import keras

    rnn = rnn or keras.layers.SimpleRNN
    model = keras.Sequential(
        [
            keras.layers.Input(shape=input_shape),
            rnn(64, return_sequences=True),
            rnn(32),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def random_data(
    samples: int, input_shape: tuple[int, int] = INPUT_SHAPE, num_classes: int = NUM_CLASSES, seed: int = 0
):
    """Random inputs and one-hot labels for :func:`create_rnn_model` (numpy arrays)."""
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, *input_shape)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, num_classes, samples), num_classes)
    return x, y


def run(quick: bool = True) -> list[dict]:
    """Epochs per second of the stock and the converted model, trained alternately on the same data."""
    if importlib.util.find_spec("keras") is None:
        return []
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    import keras
    import numpy as np
    import torch

    if keras.backend.backend() != "torch":
        return []
    import fastrnn.keras

    samples, batch = 1024, 32
    repeats = 3 if quick else 7
    x, y = random_data(samples)

    keras.utils.set_random_seed(0)
    stock = create_rnn_model()
    models = {"stock": stock, "fastrnn": fastrnn.keras.convert(stock)}
    for model in models.values():
        model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)  # warm-up / JIT

    times = {name: [] for name in models}
    for _ in range(repeats):  # alternate so that load drifts hit both alike
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
            times[name].append(time.perf_counter() - start)

    weight_diff = max(
        float(np.abs(a - b).max()) for a, b in zip(models["stock"].get_weights(), models["fastrnn"].get_weights())
    )
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    stock_median = statistics.median(times["stock"])
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        rows.append(
            {
                "case": CASE,
                "impl": name,
                "epochs_per_s": 1 / median,
                "ms_per_epoch": 1000 * median,
                "ms_per_epoch_min": 1000 * min(ts),
                "speedup": stock_median / median,
                "samples": samples,
                "batch": batch,
                "repeats": repeats,
                "max_weight_diff": weight_diff,
                "device": device,
                "keras": keras.version(),
                "torch": torch.__version__,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn.bench.keras_seed", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed epochs each instead of 7")
    rows = run(quick=parser.parse_args(argv).quick)
    if not rows:
        print("keras seed: Keras is not installed, or is loaded on another backend than torch", file=sys.stderr)
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
