"""The seed's Keras RNN classifier, trained with stock keras.layers.SimpleRNN and with
fastrnn.keras.SimpleRNN from the same starting weights, on random data.

    KERAS_BACKEND=torch python examples/seed_keras.py [--samples 1024] [--batch 32] [--epochs 3]

Prints epochs per second for each and how far apart the two models' weights end up.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastrnn.keras  # noqa: E402

# The model is defined once, next to the benchmark that times it (python -m fastrnn.bench).
from fastrnn.bench.keras_seed import INPUT_SHAPE, NUM_CLASSES, create_rnn_model, random_data  # noqa: E402


def train(model, x, y, batch, epochs):
    """Epochs per second after one warm-up epoch (numba compiles on first use), and the history."""
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)
    return epochs / (time.perf_counter() - start), history.history


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if keras.backend.backend() != "torch":
        raise SystemExit(f"fastrnn.keras runs fused on the torch backend; KERAS_BACKEND is {keras.backend.backend()}")

    x, y = random_data(args.samples)

    keras.utils.set_random_seed(0)
    stock = create_rnn_model(INPUT_SHAPE, NUM_CLASSES)
    fused = fastrnn.keras.convert(stock)  # same weights, fastrnn.keras.SimpleRNN layers
    fused.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    stock.summary()

    results = {}
    for name, model in (("stock", stock), ("fastrnn", fused)):
        eps, history = train(model, x, y, args.batch, args.epochs)
        results[name] = eps
        print(
            f"{name:>8}: {eps:6.2f} epochs/s ({1000 / eps:7.1f} ms/epoch), "
            f"final loss {history['loss'][-1]:.4f}, accuracy {history['accuracy'][-1]:.3f}"
        )
    print(f"speedup: x{results['fastrnn'] / results['stock']:.2f}")

    diff = max(float(np.abs(a - b).max()) for a, b in zip(stock.get_weights(), fused.get_weights()))
    print(
        f"weights after {args.epochs + 1} epochs: max |stock - fastrnn| = {diff:.2e} "
        f"({'match' if diff < 1e-3 else 'DIFFER'})"
    )


if __name__ == "__main__":
    main()
