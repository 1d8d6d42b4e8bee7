"""The seed's Keras model trained with stock keras.layers.SimpleRNN vs fastrnn.keras.SimpleRNN.

``run(quick)`` returns rows for the bench report (``python -m fastrnn.bench`` loads this file);
``[]`` when Keras is not installed or another backend is already loaded in this process.
Standalone: ``python bench/keras_seed.py [--quick]``.
"""
import importlib.util
import os
import statistics
import sys
import time

CASE = "keras seed model"


def _seed_example():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "seed_keras.py")
    spec = importlib.util.spec_from_file_location("fastrnn_examples_seed_keras", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(quick=True):
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
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, 10, 20)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 5, samples), 5)

    keras.utils.set_random_seed(0)
    stock = _seed_example().create_rnn_model((10, 20), 5, keras.layers.SimpleRNN)
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
        rows.append({
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
        })
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
