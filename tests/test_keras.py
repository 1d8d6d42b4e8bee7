"""fastrnn.keras.SimpleRNN, GRU and LSTM against keras.layers.SimpleRNN / GRU / LSTM on the torch
backend.

Every case runs the same weights, inputs and upstream gradients through the stock and the fused
layer and compares outputs, states and each gradient by name; it also asserts which path ran (the
layer's fused op, or Keras's own loop), so a silent fallback cannot pass for a fused result. Keras's
own tests of the three layers run with the fused layers in their place too.
"""

import os
import subprocess
import sys
from unittest import mock

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
KINDS = ("SimpleRNN", "GRU", "LSTM")
OP = {"SimpleRNN": "elman", "GRU": "gru", "LSTM": "lstm"}  # the fused op each layer calls
N_STATES = {"SimpleRNN": 1, "GRU": 1, "LSTM": 2}  # LSTM's [h, c]


@pytest.fixture(autouse=True)
def _keras_on_cpu():
    """The fused kernels serve the CPU (on CUDA ``auto`` leaves Keras in charge): keep Keras's
    tensors there even where it would pick a GPU."""
    with keras.device("cpu"):
        yield


def _counting(calls, name):
    op = getattr(functional, name)

    def counting(*args, **kwargs):
        calls.append((name, kwargs.get("lengths")))
        return op(*args, **kwargs)

    return counting


@pytest.fixture
def fused_calls(monkeypatch):
    """``(op name, lengths)`` for each call into a fused op."""
    calls = []
    for name in OP.values():
        monkeypatch.setattr(functional, name, _counting(calls, name))
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


def _pair(kind, dtype="float32", stock_kwargs=(), **kwargs):
    """A stock and a fused layer of ``kind`` with the same (random, nonzero-bias) weights."""
    stock = getattr(keras.layers, kind)(H, dtype=dtype, **kwargs, **dict(stock_kwargs))
    fused = getattr(fk, kind)(H, dtype=dtype, **kwargs)
    shape = (B, T, I)
    stock.build(shape)
    fused.build(shape)
    rng = np.random.default_rng(1)
    weights = [0.5 * rng.standard_normal(w.shape) for w in stock.get_weights()]
    stock.set_weights(weights)
    fused.set_weights(weights)
    return stock, fused


def _run(layer, x, mask=None, h0=None, training=False, dtype=torch.float32):
    """Outputs (list) and gradients by name for a fixed random upstream gradient; ``h0``: the
    initial states (one array per state) or None."""
    x = torch.tensor(x, dtype=dtype, requires_grad=True)
    kwargs = {}
    if mask is not None:
        kwargs["mask"] = torch.tensor(mask)
    leaves = {"dx": x}
    if h0 is not None:
        states = [torch.tensor(s, dtype=dtype, requires_grad=True) for s in h0]
        kwargs["initial_state"] = states
        leaves.update({f"d{name}0": s for name, s in zip("hc", states)})
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


def _ops(kind, n=1):
    """The fused calls ``n`` runs of a fused ``kind`` layer make."""
    return [OP[kind]] * n


SEQ, STATE, BACK = dict(return_sequences=True), dict(return_state=True), dict(go_backwards=True)
SEQ_STATE = {**SEQ, **STATE}

# (id, layer kwargs, mask, with initial state, training, expected path); both layers
COMMON_CASES = [
    ("last", {}, "none", False, False, "fused"),
    ("seq-state", SEQ_STATE, "none", False, False, "fused"),
    ("no-bias", dict(SEQ, use_bias=False), "none", False, False, "fused"),
    ("no-bias-mask", dict(SEQ_STATE, use_bias=False), "right", True, False, "fused"),
    ("backwards", {**SEQ_STATE, **BACK}, "none", False, False, "fused"),
    ("initial-state", SEQ_STATE, "none", True, False, "fused"),
    ("unroll", dict(SEQ, unroll=True), "none", False, False, "fused"),
    ("mask-seq", SEQ_STATE, "right", False, False, "fused"),
    ("mask-last", STATE, "right", True, False, "fused"),
    ("mask-backwards", {**SEQ_STATE, **BACK}, "right", True, False, "fused"),
    ("mask-backwards-last", BACK, "right", False, False, "fused"),
    ("mask-zero-output", dict(SEQ, zero_output_for_mask=True), "right", False, False, "fused"),
    ("mask-zero-output-last", dict(STATE, zero_output_for_mask=True), "right", True, False, "fused"),
    ("mask-zero-output-backwards", {**SEQ, **BACK, "zero_output_for_mask": True}, "right", False, False, "fused"),
    ("mask-unroll", dict(SEQ, unroll=True), "right", False, False, "fused"),
    ("mask-all-valid", {**SEQ, **BACK}, "all", False, False, "fused"),
    ("dropout-train", dict(SEQ, dropout=0.4, seed=3), "none", False, True, "fused"),
    ("dropout-train-mask", dict(SEQ_STATE, dropout=0.4, seed=3), "right", True, True, "fused"),
    ("dropout-infer", dict(SEQ, dropout=0.4, seed=3), "none", False, False, "fused"),
    ("rec-dropout-infer", dict(SEQ, recurrent_dropout=0.4, seed=3), "right", False, False, "fused"),
    ("rec-dropout-train", dict(SEQ, recurrent_dropout=0.4, dropout=0.2, seed=3), "none", False, True, "fallback"),
    ("mask-hole", SEQ_STATE, "hole", False, False, "fallback"),
    ("mask-left-backwards", {**SEQ, **BACK}, "left", False, False, "fallback"),
]
SIMPLE_RNN_CASES = [
    ("relu", dict(SEQ_STATE, activation="relu"), "none", False, False, "fused"),
    ("relu-mask-backwards", dict(BACK, activation="relu"), "right", False, False, "fused"),
    ("ops-tanh", dict(SEQ, activation=keras.ops.tanh), "right", False, False, "fused"),
    ("sigmoid", dict(SEQ, activation="sigmoid"), "none", False, False, "fallback"),
    ("linear", dict(SEQ, activation=None), "none", False, False, "fallback"),
]
OPS_ACTIVATIONS = dict(activation=keras.ops.tanh, recurrent_activation=torch.sigmoid)  # what cudnn_ok takes too
LEGACY_DROPOUT = dict(dropout=0.4, seed=3, implementation=1, use_cudnn=False)
LSTM_CASES = [
    ("ops-activations", {**SEQ_STATE, **OPS_ACTIVATIONS}, "right", True, False, "fused"),
    ("implementation-1", dict(SEQ_STATE, implementation=1), "right", True, False, "fused"),
    ("use-cudnn-false", dict(SEQ_STATE, use_cudnn=False), "right", True, False, "fused"),
    ("use-cudnn-true", dict(SEQ_STATE, use_cudnn=True), "none", True, False, "fused"),
    ("no-forget-bias", dict(SEQ, unit_forget_bias=False), "none", False, False, "fused"),
    ("relu", dict(SEQ, activation="relu"), "none", False, False, "fallback"),
    ("hard-sigmoid-mask", dict(SEQ_STATE, recurrent_activation="hard_sigmoid"), "right", True, False, "fallback"),
    ("dropout-1-train", dict(SEQ, dropout=1.0, seed=3), "none", False, True, "fallback"),
    ("dropout-1-train-mask", dict(SEQ, dropout=1.0, seed=3), "right", False, True, "fallback"),
    ("implementation-1-dropout-train", {**SEQ, **LEGACY_DROPOUT}, "right", False, True, "fallback"),
]
GRU_CASES = [
    ("ops-activations", {**SEQ, **OPS_ACTIVATIONS}, "none", False, False, "fused"),
    ("implementation-1", dict(SEQ, implementation=1), "right", False, False, "fused"),
    ("use-cudnn-false", dict(SEQ_STATE, use_cudnn=False), "right", True, False, "fused"),
    ("use-cudnn-true", dict(SEQ_STATE, use_cudnn=True), "none", True, False, "fused"),
    ("reset-before", dict(SEQ_STATE, reset_after=False), "none", False, False, "fallback"),
    ("reset-before-mask", {**SEQ_STATE, **BACK, "reset_after": False}, "right", True, False, "fallback"),
    ("reset-before-no-bias", dict(SEQ, reset_after=False, use_bias=False), "none", False, False, "fallback"),
    ("relu", dict(SEQ, activation="relu"), "none", False, False, "fallback"),
    ("hard-sigmoid", dict(SEQ, recurrent_activation="hard_sigmoid"), "right", False, False, "fallback"),
    # Keras's two paths treat dropout=1 differently (all inputs dropped unmasked, none masked)
    ("dropout-1-train", dict(SEQ, dropout=1.0, seed=3), "none", False, True, "fallback"),
    ("dropout-1-train-mask", dict(SEQ, dropout=1.0, seed=3), "right", False, True, "fallback"),
    # one input dropout mask per gate (the stock layer needs use_cudnn=False to run it at all)
    ("implementation-1-dropout-train", {**SEQ, **LEGACY_DROPOUT}, "right", False, True, "fallback"),
]
CASES = [
    (kind, *case)
    for kind, cases in (
        ("SimpleRNN", COMMON_CASES + SIMPLE_RNN_CASES),
        ("GRU", COMMON_CASES + GRU_CASES),
        ("LSTM", COMMON_CASES + LSTM_CASES),
    )
    for case in cases
]


@pytest.mark.parametrize(
    "kind,kwargs,mask,with_h0,training,path", [(c[0], *c[2:]) for c in CASES], ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_parity_with_stock_layer(fused_calls, kind, kwargs, mask, with_h0, training, path):
    stock, fused = _pair(kind, **kwargs)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, T, I))
    h0 = [rng.standard_normal((B, H)) for _ in range(N_STATES[kind])] if with_h0 else None
    expected = _run(stock, x, MASKS[mask], h0, training)
    assert not fused_calls
    got = _run(fused, x, MASKS[mask], h0, training)
    assert [op for op, _ in fused_calls] == (_ops(kind) if path == "fused" else [])
    if path == "fused" and mask == "right":
        assert fused_calls[0][1].tolist() == MASKS["right"].sum(1).tolist()
    if path == "fallback":
        _assert_close(expected, got, atol=0, rtol=0)  # literally Keras's loop
    else:
        _assert_close(expected, got)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("kwargs", [dict(use_cudnn=True), dict(use_cudnn=True, recurrent_dropout=0.2)])
def test_use_cudnn_true_raises_where_keras_does(fused_calls, kind, kwargs):
    # Keras's GRU and LSTM refuse use_cudnn=True where their own fast path does not apply; so do
    # ours, even where the fused op could have run.
    x = np.random.default_rng(9).standard_normal((B, T, I))
    for layer in _pair(kind, **kwargs):
        with pytest.raises(ValueError, match="use_cudnn"):
            _run(layer, x, MASKS["right"])
    assert not fused_calls


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,path", [("float64", "fused"), ("float16", "fallback")])
def test_dtypes(fused_calls, kind, dtype, path):
    # glorot: torch has no half-precision QR on the CPU for the default orthogonal initializer
    stock, fused = _pair(kind, dtype=dtype, **SEQ_STATE, recurrent_initializer="glorot_uniform")
    x = np.random.default_rng(3).standard_normal((B, T, I))
    tdtype = getattr(torch, dtype)
    for mask in ("right", "none"):
        expected = _run(stock, x, MASKS[mask], dtype=tdtype)
        got = _run(fused, x, MASKS[mask], dtype=tdtype)
        # Keras's torch ops.matmul rounds float64 products to float32 (JAX-style promotion), so the
        # stock float64 layer is only float32-accurate; the fused one computes in float64 throughout.
        tol = 1e-6 if dtype == "float64" else 0
        _assert_close(expected, got, atol=tol, rtol=tol)
    assert [op for op, _ in fused_calls] == (_ops(kind, 2) if path == "fused" else [])


@pytest.mark.parametrize("kind", KINDS)
def test_stateful_carries_state_and_trains(fused_calls, kind):
    # Stock Keras 3.15's stateful GRU / LSTM cannot backward on the torch backend where it takes
    # backend.gru / lstm (its state variables are assigned in place under the graph); its loop can.
    stock_kwargs = {"use_cudnn": False} if kind in ("GRU", "LSTM") else {}
    stock, fused = _pair(kind, **SEQ, stateful=True, stock_kwargs=stock_kwargs)
    rng = np.random.default_rng(4)
    for step in range(3):
        x = rng.standard_normal((B, T, I))
        mask = MASKS["right"] if step == 1 else None
        # backward after RNN.call has assigned the new state in place into the variable
        _assert_close(_run(stock, x, mask), _run(fused, x, mask))
        assert len(fused.states) == N_STATES[kind]
        for got, expected in zip(fused.states, stock.states):
            torch.testing.assert_close(got.value, expected.value, atol=ATOL, rtol=RTOL)
    assert [op for op, _ in fused_calls] == _ops(kind, 3)
    stock.reset_state()
    fused.reset_state()
    assert not any(state.value.any() for state in fused.states)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask", ["right", "none"])
def test_bidirectional(fused_calls, kind, mask):
    stock = keras.layers.Bidirectional(getattr(keras.layers, kind)(H, **SEQ))
    fused = keras.layers.Bidirectional(getattr(fk, kind)(H, **SEQ))
    stock.build((B, T, I))
    fused.build((B, T, I))
    assert isinstance(fused.backward_layer, getattr(fk, kind)) and fused.backward_layer.go_backwards
    rng = np.random.default_rng(5)
    weights = [0.5 * rng.standard_normal(w.shape) for w in stock.get_weights()]
    stock.set_weights(weights)
    fused.set_weights(weights)
    x = rng.standard_normal((B, T, I))
    _assert_close(_run(stock, x, MASKS[mask]), _run(fused, x, MASKS[mask]))
    assert [op for op, _ in fused_calls] == _ops(kind, 2)


def _seed_model(rnn):
    """The seed's Keras model (Input (10, 20) -> 64 -> 32 -> Dense 16 -> Dense 5), from examples/."""
    return example("seed_keras").create_rnn_model((10, 20), 5, rnn)


def _masked_model(rnn):
    tokens = keras.Input((9,), dtype="int32")
    h = keras.layers.Embedding(20, 8, mask_zero=True)(tokens)
    h = keras.layers.Bidirectional(rnn(6, return_sequences=True, dropout=0.2, seed=11))(h)
    last = {"activation": "relu"} if issubclass(rnn, keras.layers.SimpleRNN) else {"use_bias": False}
    h = rnn(5, go_backwards=True, **last)(h)
    return keras.Model(tokens, keras.layers.Dense(3, activation="softmax")(h))


def _nested_model(rnn):
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


def _rnns(model, kind):
    return [layer for layer in model._flatten_layers() if isinstance(layer, getattr(keras.layers, kind))]


CONVERT_CASES = {
    "seed-SimpleRNN": (_seed_model, "SimpleRNN"),
    "masked-SimpleRNN": (_masked_model, "SimpleRNN"),
    "nested-SimpleRNN": (_nested_model, "SimpleRNN"),
    "masked-GRU": (_masked_model, "GRU"),  # Sequential is covered by the nested model's inner one
    "nested-GRU": (_nested_model, "GRU"),
    "masked-LSTM": (_masked_model, "LSTM"),
    "nested-LSTM": (_nested_model, "LSTM"),
}


@pytest.mark.parametrize("model_fn,kind", CONVERT_CASES.values(), ids=CONVERT_CASES.keys())
def test_convert_then_train_matches_stock(fused_calls, model_fn, kind):
    rng = np.random.default_rng(6)
    x, y = _data(model_fn, rng)
    stock = model_fn(getattr(keras.layers, kind))
    fused = fk.convert(stock)
    rnns = _rnns(fused, kind)
    assert rnns and all(type(layer) is getattr(fk, kind) for layer in rnns)
    assert not any(isinstance(layer, (fk.SimpleRNN, fk.GRU, fk.LSTM)) for layer in stock._flatten_layers())
    np.testing.assert_allclose(fused.predict(x, verbose=0), stock.predict(x, verbose=0), atol=1e-5)
    fused_calls.clear()
    expected = _train(stock, x, y)
    assert not fused_calls
    got = _train(fused, x, y)
    assert [op for op, _ in fused_calls] == _ops(kind, 3 * len(rnns))
    assert all(lengths is not None for _, lengths in fused_calls) == (model_fn is _masked_model)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-4, rtol=1e-3)


def test_convert_swaps_every_kind_and_keeps_seeds(fused_calls):
    x = keras.Input((10, 20))
    h = keras.layers.GRU(6, return_sequences=True, dropout=0.3, seed=7)(x)
    h = keras.layers.LSTM(5, return_sequences=True, dropout=0.2, seed=8)(h)
    h = keras.layers.SimpleRNN(5, return_sequences=True)(h)
    h = keras.layers.LSTM(4, return_sequences=True, activation="relu")(h)  # converted, runs Keras's loop
    h = keras.layers.GRU(4, reset_after=False)(h)  # converted, runs Keras's loop
    stock = keras.Model(x, h)
    fused = fk.convert(stock)
    assert [type(layer) for layer in fused.layers[1:]] == [fk.GRU, fk.LSTM, fk.SimpleRNN, fk.LSTM, fk.GRU]
    assert fused.layers[1].cell.seed == 7 and fused.layers[2].cell.seed == 8
    assert all(fused.layers[i].get_config() == stock.layers[i].get_config() for i in (4, 5))
    data = np.random.default_rng(10).standard_normal((B, 10, 20)).astype("float32")
    keras.utils.set_random_seed(0)
    expected = stock(data, training=True)
    got = fused(data, training=True)
    assert [op for op, _ in fused_calls] == ["gru", "lstm", "elman"]
    np.testing.assert_allclose(got.detach().numpy(), expected.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_and_weight_files(tmp_path, kind):
    rng = np.random.default_rng(7)
    x, _ = _data(_masked_model, rng)
    model = _masked_model(getattr(fk, kind))
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    rnns = _rnns(loaded, kind)
    assert len(rnns) == 3 and all(type(layer) is getattr(fk, kind) for layer in rnns)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    # weight files load either way between stock and fused models
    model.save_weights(tmp_path / "fused.weights.h5")
    stock = _masked_model(getattr(keras.layers, kind))
    stock.load_weights(tmp_path / "fused.weights.h5")
    np.testing.assert_allclose(stock.predict(x, verbose=0), expected, atol=1e-5)
    stock.save_weights(tmp_path / "stock.weights.h5")
    again = _masked_model(getattr(fk, kind))
    again.load_weights(tmp_path / "stock.weights.h5")
    np.testing.assert_allclose(again.predict(x, verbose=0), expected, atol=1e-6)


def test_convert_rejects_subclassed_models():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError):
        fk.convert(Sub())


@pytest.mark.parametrize("kind", KINDS)
def test_other_backends_run_the_stock_loop(fused_calls, monkeypatch, kind):
    stock, fused = _pair(kind, **SEQ_STATE)
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
for kind in ("SimpleRNN", "GRU", "LSTM"):
    for kw in (dict(return_sequences=True, return_state=True), dict(go_backwards=True)):
        a, b = getattr(keras.layers, kind)(6, **kw), getattr(fk, kind)(6, **kw)
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


# Keras's own tests of the stock layers (shipped in the keras package), with `layers.<kind>` there
# patched to fastrnn's layer. Each test must reach the fused op, except those listed as running
# Keras's loop throughout: masks with holes, and the checks of Keras's own cuDNN / TensorFlow paths.
_KERAS_SUITES = {
    "SimpleRNN": ("simple_rnn_test", "SimpleRNNTest", {"test_masking"}),
    "GRU": (
        "gru_test",
        "GRUTest",
        {"test_masking", "test_torch_cudnn_dispatch_fires", "test_stateful_with_symbolic_batch_size"},
    ),
    "LSTM": ("lstm_test", "LSTMTest", set()),
}


def _keras_suite(kind):
    module, case, stock_only = _KERAS_SUITES[kind]
    try:
        base = getattr(__import__(f"keras.src.layers.rnn.{module}", fromlist=[case]), case)
    except ImportError:  # a keras build without its tests, or without absl
        return None

    class Suite(base):
        def setUp(self):
            super().setUp()  # clears Keras's global state, the device scope included
            self._fused_calls = []
            for context in (
                mock.patch.object(keras.src.layers, kind, getattr(fk, kind)),
                mock.patch.object(functional, OP[kind], _counting(self._fused_calls, OP[kind])),
                keras.device("cpu"),
            ):
                context.__enter__()
                self.addCleanup(context.__exit__, None, None, None)

        def tearDown(self):
            fused = bool(self._fused_calls)
            test = self._testMethodName.rstrip("0123456789")  # parameterized tests end in a number
            super().tearDown()
            assert fused == (test not in stock_only), f"{test}: fused op {'ran' if fused else 'never ran'}"

    Suite.__name__ = Suite.__qualname__ = f"TestKeras{case}WithFastrnn"
    return Suite


TestKerasSimpleRNNTestWithFastrnn = _keras_suite("SimpleRNN")
TestKerasGRUTestWithFastrnn = _keras_suite("GRU")
TestKerasLSTMTestWithFastrnn = _keras_suite("LSTM")
