"""fastrnn.keras.SimpleRNN against keras.layers.SimpleRNN on the torch backend.

Every case runs the same weights, inputs and upstream gradients through both layers and compares
outputs, states and each gradient by name; it also asserts which path ran (fused op or Keras's
step loop), so a silent fallback cannot pass for a fused result.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")
if keras.backend.backend() != "torch":  # keras was imported earlier with another backend
    pytest.skip("keras is not on the torch backend in this process", allow_module_level=True)

import fastrnn.keras as fk  # noqa: E402
from fastrnn import functional  # noqa: E402
from helpers import example  # noqa: E402

# Keras 3.15 on numpy 2 warns on every weight read; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

B, T, I, H = 4, 7, 5, 6
ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls into the fused op."""
    calls = []
    elman = functional.elman

    def counting(*args, **kwargs):
        calls.append(kwargs.get("lengths"))
        return elman(*args, **kwargs)

    monkeypatch.setattr(functional, "elman", counting)
    return calls


def _masks():
    right = np.ones((B, T), bool)
    right[1, 4:] = False
    right[2, :] = False  # length 0
    right[3, 1:] = False
    hole = right.copy()
    hole[0, 3] = False
    left = np.zeros((B, T), bool)
    left[:, 2:] = True
    return {"none": None, "right": right, "all": np.ones((B, T), bool), "hole": hole, "left": left}


MASKS = _masks()


def _pair(dtype="float32", **kwargs):
    """A stock and a fused layer with the same (random, nonzero-bias) weights."""
    stock = keras.layers.SimpleRNN(H, dtype=dtype, **kwargs)
    fused = fk.SimpleRNN(H, dtype=dtype, **kwargs)
    shape = (B, T, I)
    stock.build(shape)
    fused.build(shape)
    rng = np.random.default_rng(1)
    weights = [0.5 * rng.standard_normal(w.shape) for w in stock.get_weights()]
    stock.set_weights(weights)
    fused.set_weights(weights)
    return stock, fused


def _run(layer, x, mask=None, h0=None, training=False, dtype=torch.float32):
    """Outputs (list) and gradients by name for a fixed random upstream gradient."""
    x = torch.tensor(x, dtype=dtype, requires_grad=True)
    kwargs = {}
    if mask is not None:
        kwargs["mask"] = torch.tensor(mask)
    leaves = {"dx": x}
    if h0 is not None:
        h = torch.tensor(h0, dtype=dtype, requires_grad=True)
        kwargs["initial_state"] = [h]
        leaves["dh0"] = h
    outs = layer(x, training=training, **kwargs)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    gen = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o.dtype)).sum() for o in outs)
    leaves.update({"d" + w.name: w.value for w in layer.trainable_weights})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    return [o.detach() for o in outs], grads


def _assert_close(a, b, atol=ATOL, rtol=RTOL):
    outs_a, grads_a = a
    outs_b, grads_b = b
    assert len(outs_a) == len(outs_b)
    for i, (p, q) in enumerate(zip(outs_a, outs_b)):
        torch.testing.assert_close(q, p, atol=atol, rtol=rtol, msg=lambda m, i=i: f"output {i}: {m}")
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(
            grads_b[name], grads_a[name], atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )


# (id, layer kwargs, mask, with initial state, training, expected path)
CASES = [
    ("last", {}, "none", False, False, "fused"),
    (
        "seq-state-relu",
        dict(return_sequences=True, return_state=True, activation="relu"),
        "none",
        False,
        False,
        "fused",
    ),
    ("no-bias", dict(return_sequences=True, use_bias=False), "none", False, False, "fused"),
    ("backwards", dict(return_sequences=True, return_state=True, go_backwards=True), "none", False, False, "fused"),
    ("initial-state", dict(return_sequences=True, return_state=True), "none", True, False, "fused"),
    ("unroll", dict(return_sequences=True, unroll=True), "none", False, False, "fused"),
    ("mask-seq", dict(return_sequences=True, return_state=True), "right", False, False, "fused"),
    ("mask-last", dict(return_state=True), "right", True, False, "fused"),
    (
        "mask-backwards",
        dict(return_sequences=True, return_state=True, go_backwards=True),
        "right",
        True,
        False,
        "fused",
    ),
    ("mask-backwards-last", dict(go_backwards=True, activation="relu"), "right", False, False, "fused"),
    ("mask-zero-output", dict(return_sequences=True, zero_output_for_mask=True), "right", False, False, "fused"),
    ("mask-zero-output-last", dict(zero_output_for_mask=True, return_state=True), "right", True, False, "fused"),
    (
        "mask-zero-output-backwards",
        dict(return_sequences=True, zero_output_for_mask=True, go_backwards=True),
        "right",
        False,
        False,
        "fused",
    ),
    ("mask-unroll", dict(return_sequences=True, unroll=True), "right", False, False, "fused"),
    ("mask-all-valid", dict(return_sequences=True, go_backwards=True), "all", False, False, "fused"),
    ("dropout-train", dict(return_sequences=True, dropout=0.4, seed=3), "none", False, True, "fused"),
    ("dropout-infer", dict(return_sequences=True, dropout=0.4, seed=3), "none", False, False, "fused"),
    ("rec-dropout-infer", dict(return_sequences=True, recurrent_dropout=0.4, seed=3), "right", False, False, "fused"),
    (
        "rec-dropout-train",
        dict(return_sequences=True, recurrent_dropout=0.4, dropout=0.2, seed=3),
        "none",
        False,
        True,
        "fallback",
    ),
    ("sigmoid", dict(return_sequences=True, activation="sigmoid"), "none", False, False, "fallback"),
    ("linear", dict(return_sequences=True, activation=None), "none", False, False, "fallback"),
    ("mask-hole", dict(return_sequences=True, return_state=True), "hole", False, False, "fallback"),
    ("mask-left-backwards", dict(return_sequences=True, go_backwards=True), "left", False, False, "fallback"),
]


@pytest.mark.parametrize("kwargs,mask,with_h0,training,path", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parity_with_stock_layer(fused_calls, kwargs, mask, with_h0, training, path):
    stock, fused = _pair(**kwargs)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, T, I))
    h0 = rng.standard_normal((B, H)) if with_h0 else None
    expected = _run(stock, x, MASKS[mask], h0, training)
    assert not fused_calls
    got = _run(fused, x, MASKS[mask], h0, training)
    assert len(fused_calls) == (1 if path == "fused" else 0)
    if path == "fused" and mask == "right":
        assert fused_calls[0].tolist() == MASKS["right"].sum(1).tolist()
    if path == "fallback":
        _assert_close(expected, got, atol=0, rtol=0)  # literally Keras's loop
    else:
        _assert_close(expected, got)


@pytest.mark.parametrize("dtype,path", [("float64", "fused"), ("float16", "fallback")])
def test_dtypes(fused_calls, dtype, path):
    # glorot: torch has no half-precision QR on the CPU for the default orthogonal initializer
    stock, fused = _pair(dtype=dtype, return_sequences=True, return_state=True, recurrent_initializer="glorot_uniform")
    x = np.random.default_rng(3).standard_normal((B, T, I))
    tdtype = getattr(torch, dtype)
    expected = _run(stock, x, MASKS["right"], dtype=tdtype)
    got = _run(fused, x, MASKS["right"], dtype=tdtype)
    assert len(fused_calls) == (1 if path == "fused" else 0)
    # Keras's torch ops.matmul rounds float64 products to float32 (JAX-style promotion), so the
    # stock float64 layer is only float32-accurate; the fused one computes in float64 throughout.
    tol = 1e-6 if dtype == "float64" else 0
    _assert_close(expected, got, atol=tol, rtol=tol)


def test_stateful_carries_state_and_trains(fused_calls):
    stock, fused = _pair(return_sequences=True, stateful=True)
    rng = np.random.default_rng(4)
    for step in range(3):
        x = rng.standard_normal((B, T, I))
        mask = MASKS["right"] if step == 1 else None
        # backward after RNN.call has assigned the new state in place into the variable
        _assert_close(_run(stock, x, mask), _run(fused, x, mask))
        torch.testing.assert_close(fused.states[0].value, stock.states[0].value, atol=ATOL, rtol=RTOL)
    assert len(fused_calls) == 3
    stock.reset_state()
    fused.reset_state()
    assert not fused.states[0].value.any()


def test_bidirectional_with_mask(fused_calls):
    kw = dict(return_sequences=True)
    stock = keras.layers.Bidirectional(keras.layers.SimpleRNN(H, **kw))
    fused = keras.layers.Bidirectional(fk.SimpleRNN(H, **kw))
    stock.build((B, T, I))
    fused.build((B, T, I))
    assert isinstance(fused.backward_layer, fk.SimpleRNN) and fused.backward_layer.go_backwards
    rng = np.random.default_rng(5)
    weights = [0.5 * rng.standard_normal(w.shape) for w in stock.get_weights()]
    stock.set_weights(weights)
    fused.set_weights(weights)
    x = rng.standard_normal((B, T, I))
    _assert_close(_run(stock, x, MASKS["right"]), _run(fused, x, MASKS["right"]))
    assert len(fused_calls) == 2


def _seed_model(rnn=keras.layers.SimpleRNN):
    """The seed's Keras model (Input (10, 20) -> 64 -> 32 -> Dense 16 -> Dense 5), from examples/."""
    return example("seed_keras").create_rnn_model((10, 20), 5, rnn)


def _masked_model(rnn=keras.layers.SimpleRNN):
    tokens = keras.Input((9,), dtype="int32")
    h = keras.layers.Embedding(20, 8, mask_zero=True)(tokens)
    h = keras.layers.Bidirectional(rnn(6, return_sequences=True, dropout=0.2, seed=11))(h)
    h = rnn(5, go_backwards=True, activation="relu")(h)
    return keras.Model(tokens, keras.layers.Dense(3, activation="softmax")(h))


def _nested_model(rnn=keras.layers.SimpleRNN):
    inner = keras.Sequential(
        [
            keras.Input((10, 20)),
            keras.layers.Bidirectional(rnn(6, return_sequences=True)),
            rnn(5, dropout=0.3, seed=5),
        ]
    )
    x = keras.Input((10, 20))
    inner_outer = keras.Model(x, inner(x))
    x = keras.Input((10, 20))
    return keras.Model(x, keras.layers.Dense(5, activation="softmax")(inner_outer(x)))


def _train(model, x, y, steps=3):
    keras.utils.set_random_seed(0)  # unseeded dropout (inside Bidirectional) uses torch's global RNG
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    for i in range(steps):
        model.train_on_batch(x[i::steps], y[i::steps])
    return model.get_weights()


def _data(model_fn, rng):
    if model_fn is _masked_model:
        lengths = rng.integers(0, 10, 24)
        x = rng.integers(1, 20, (24, 9)) * (np.arange(9) < lengths[:, None])
    else:
        x = rng.standard_normal((24, 10, 20)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3 if model_fn is _masked_model else 5, 24))
    return x, y


@pytest.mark.parametrize("model_fn", [_seed_model, _masked_model, _nested_model], ids=["seed", "masked", "nested"])
def test_convert_then_train_matches_stock(fused_calls, model_fn):
    rng = np.random.default_rng(6)
    x, y = _data(model_fn, rng)
    stock = model_fn()
    fused = fk.convert(stock)
    rnns = [l for l in fused._flatten_layers() if isinstance(l, keras.layers.SimpleRNN)]
    assert rnns and all(type(l) is fk.SimpleRNN for l in rnns)
    assert not any(isinstance(l, fk.SimpleRNN) for l in stock._flatten_layers())
    np.testing.assert_allclose(fused.predict(x, verbose=0), stock.predict(x, verbose=0), atol=1e-5)
    fused_calls.clear()
    expected = _train(stock, x, y)
    assert not fused_calls
    got = _train(fused, x, y)
    assert len(fused_calls) == 3 * len(rnns)
    assert all(l is not None for l in fused_calls) == (model_fn is _masked_model)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-3)


def test_save_load_and_weight_files(tmp_path):
    rng = np.random.default_rng(7)
    x, _ = _data(_masked_model, rng)
    model = _masked_model(fk.SimpleRNN)
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    rnns = [l for l in loaded._flatten_layers() if isinstance(l, keras.layers.SimpleRNN)]
    assert len(rnns) == 3 and all(type(l) is fk.SimpleRNN for l in rnns)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    # weight files load either way between stock and fused models
    model.save_weights(tmp_path / "fused.weights.h5")
    stock = _masked_model()
    stock.load_weights(tmp_path / "fused.weights.h5")
    np.testing.assert_allclose(stock.predict(x, verbose=0), expected, atol=1e-5)
    stock.save_weights(tmp_path / "stock.weights.h5")
    again = _masked_model(fk.SimpleRNN)
    again.load_weights(tmp_path / "stock.weights.h5")
    np.testing.assert_allclose(again.predict(x, verbose=0), expected, atol=1e-6)


def test_convert_rejects_subclassed_models():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError):
        fk.convert(Sub())


def test_other_backends_run_the_stock_loop(fused_calls, monkeypatch):
    stock, fused = _pair(return_sequences=True, return_state=True)
    x = np.random.default_rng(8).standard_normal((B, T, I))
    expected = _run(stock, x, MASKS["right"])
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    got = _run(fused, x, MASKS["right"])
    assert not fused_calls
    _assert_close(expected, got, atol=0, rtol=0)


_OTHER_BACKEND = """
import numpy as np, keras, fastrnn.keras as fk
x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype("float32")
mask = np.array([[1] * 5, [1, 1, 0, 0, 0], [0] * 5], bool)
for kw in (dict(return_sequences=True, return_state=True), dict(go_backwards=True)):
    a, b = keras.layers.SimpleRNN(6, **kw), fk.SimpleRNN(6, **kw)
    a.build(x.shape); b.build(x.shape); b.set_weights(a.get_weights())
    for m in (None, mask):
        ya, yb = a(x, mask=m), b(x, mask=m)
        ya, yb = (ya, yb) if isinstance(ya, (list, tuple)) else ([ya], [yb])
        assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(ya, yb))
print("ok")
"""


@pytest.mark.parametrize("backend,needs", [("jax", "jax"), ("tensorflow", "tensorflow"), ("numpy", "jax")])
def test_other_backend_is_stock(backend, needs):
    pytest.importorskip(needs)
    env = {**os.environ, "KERAS_BACKEND": backend}
    res = subprocess.run([sys.executable, "-c", _OTHER_BACKEND], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_importing_fastrnn_does_not_import_keras():
    code = "import sys, fastrnn; assert 'keras' not in sys.modules; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
