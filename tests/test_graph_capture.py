"""Graph capture: models holding fastrnn.RNN (GRU, LSTM) behave like models holding torch.nn.RNN
(GRU, LSTM) under torch.jit.trace / torch.jit.script / torch.export / both ONNX exporters, on NEW
inputs (not the example the graph was captured with), and the artefacts run where fastrnn is not
installed.

The standard is stock nn.RNN's own behaviour in this torch version: where a capture of the stock
model generalises (trace: any seq length and batch; torch.export and the dynamo ONNX exporter:
a dynamic batch, the seq length specialised; the legacy ONNX exporter: dynamic seq length and
batch), the capture of the fastrnn model must generalise the same way and give the same numbers.
Every test also runs with backend="torch" (fastrnn.RNN running nn.RNN's own forward), which shows
the test itself is sound on this torch version.

LSTM models take hx as one argument, the tuple (h0, c0), and return (head(output), (h_n, c_n)): the
nested structure goes through every capture (trace, script, export keep it; ONNX flattens it to
inputs x, h0, c0 and outputs y, h_n, c_n).
"""

import functools
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map, tree_structure, tree_unflatten

import fastrnn
from helpers import assert_close, tolerance


@dataclass(frozen=True)
class Variant:
    hidden: int = 8
    kwargs: dict = field(default_factory=dict)
    h0: bool = False  # the model takes h0 as its second input
    example: tuple = (5, 3)  # (seq_len, batch) of the capture example
    other: tuple = (7, 2)  # a different (seq_len, batch) to run the captured graph on
    cell: str = "RNN"  # the torch class: RNN, GRU or LSTM

    @property
    def batch_first(self):
        return self.kwargs.get("batch_first", False)

    @property
    def states(self):
        """num_layers * num_directions: the first dim of h0 (and of LSTM's c0), not the number of
        state tensors (two for LSTM, see ``lstm``)."""
        return self.kwargs.get("num_layers", 1) * (2 if self.kwargs.get("bidirectional") else 1)

    @property
    def lstm(self):
        return self.cell == "LSTM"

    @property
    def out_width(self):
        """The width of h_n and of each direction's output: proj_size for LSTM with W_hr, else hidden."""
        return self.kwargs.get("proj_size", 0) or self.hidden


INPUT = 4
VARIANTS = {
    "2layer-tanh": Variant(kwargs=dict(num_layers=2)),
    "batch_first-bidir": Variant(kwargs=dict(batch_first=True, bidirectional=True)),
    "relu-nobias-h0": Variant(kwargs=dict(nonlinearity="relu", bias=False, num_layers=2), h0=True),
    # Large enough that Numba splits the layer into torch GEMMs around the recurrence kernel.
    "wide-256": Variant(hidden=256, example=(5, 16), other=(9, 12)),
    "gru-2layer": Variant(kwargs=dict(num_layers=2), cell="GRU"),
    "gru-batch_first-bidir-nobias-h0": Variant(
        kwargs=dict(batch_first=True, bidirectional=True, bias=False), h0=True, cell="GRU"
    ),
    "gru-wide-256": Variant(hidden=256, example=(5, 16), other=(9, 12), cell="GRU"),
    "lstm-2layer": Variant(kwargs=dict(num_layers=2), cell="LSTM"),
    "lstm-batch_first-bidir-nobias-h0": Variant(
        kwargs=dict(batch_first=True, bidirectional=True, bias=False), h0=True, cell="LSTM"
    ),
    # h0 (4, B, 3) and c0 (4, B, 8): the two states of different widths, through 2 bidirectional layers.
    "lstm-proj-2layer-bidir-h0": Variant(
        kwargs=dict(proj_size=3, num_layers=2, bidirectional=True), h0=True, cell="LSTM"
    ),
    "lstm-wide-256": Variant(hidden=256, example=(5, 16), other=(9, 12), cell="LSTM"),
}
BACKENDS = ("auto", "torch")
# The dynamo ONNX exporter takes ~5 s a model here (it rebuilds its op registry and unrolls the
# RNN decomposition each call): two Elman variants that between them cover 1 and 2 layers, h0
# given and not, tanh and relu, bias and none, batch_first and bidirectional, one GRU and one LSTM
# ((h0, c0) given; not one with proj_size, see ONNX_FAILS_FOR_STOCK).
DYNAMO_ONNX_VARIANTS = (
    "batch_first-bidir",
    "relu-nobias-h0",
    "gru-batch_first-bidir-nobias-h0",
    "lstm-batch_first-bidir-nobias-h0",
)
# Stock nn.LSTM with proj_size does not go to ONNX in this torch version: the legacy exporter raises
# SymbolicValueError ("Unsupported: ONNX export of operator LSTM, LSTMs with projections", its
# symbolic_opset9 LSTM), and the dynamo exporter writes a model onnxruntime refuses to load
# ("[ShapeInferenceError] All inputs to Concat must have same rank"). fastrnn.LSTM exports through
# torch's own LSTM, so test_onnx_legacy checks that it fails the same way; the dynamo exporter
# (5 s a model, and a failure found only by onnxruntime) is not run on them.
ONNX_FAILS_FOR_STOCK = tuple(name for name, v in VARIANTS.items() if v.kwargs.get("proj_size"))
assert not set(ONNX_FAILS_FOR_STOCK) & set(DYNAMO_ONNX_VARIANTS)

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
]


class Model(nn.Module):
    """An RNN or GRU followed by a Linear head on its output; returns (head(output), h_n)."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear((rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x: Tensor, h0: Optional[Tensor] = None):
        out, h_n = self.rnn(x, h0)
        return self.head(out), h_n


class LSTMModel(Model):
    """An LSTM followed by the head; takes hx = (h0, c0), returns (head(output), (h_n, c_n))."""

    def forward(self, x: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None):
        out, (h_n, c_n) = self.rnn(x, hx)
        return self.head(out), (h_n, c_n)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return request.param


def models(name, backend):
    """A model holding torch.nn.RNN (GRU, LSTM) and one holding fastrnn.RNN (GRU, LSTM), with the
    same weights."""
    v = VARIANTS[name]
    model = LSTMModel if v.lstm else Model
    torch.manual_seed(0)
    ref = model(getattr(nn, v.cell)(INPUT, v.hidden, **v.kwargs))
    fast = model(getattr(fastrnn, v.cell)(INPUT, v.hidden, **v.kwargs, backend=backend))
    fast.load_state_dict(ref.state_dict())
    assert type(fast.rnn) is getattr(fastrnn, v.cell)
    return ref, fast


def inputs(name, seq_len, batch, seed):
    v = VARIANTS[name]
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, INPUT) if v.batch_first else (seq_len, batch, INPUT)
    args = [torch.randn(shape, generator=g)]
    if v.h0:
        h0 = torch.randn(v.states, batch, v.out_width, generator=g)
        args.append((h0, torch.randn(v.states, batch, v.hidden, generator=g)) if v.lstm else h0)
    return tuple(args)


def new_inputs(name):
    """New inputs (fresh values) of the example's shape and of the variant's other shape."""
    v = VARIANTS[name]
    return [inputs(name, *v.example, seed=100), inputs(name, *v.other, seed=101)]


def seq_len_of(name, args):
    return args[0].shape[1 if VARIANTS[name].batch_first else 0]


def output_names(name):
    return ("output", "h_n", "c_n") if VARIANTS[name].lstm else ("output", "h_n")


def check_outputs(got, expected, name, args, what):
    """got has expected's structure ((output, h_n), or LSTM's (output, (h_n, c_n))) and its values."""
    tol = tolerance(torch.float32, seq_len_of(name, args))
    assert tree_structure(got) == tree_structure(expected), (
        f"{what}: {tree_structure(got)} != {tree_structure(expected)}"
    )
    assert len(tree_leaves(expected)) == len(output_names(name))
    for g, e, part in zip(tree_leaves(got), tree_leaves(expected), output_names(name)):
        assert_close(g.detach(), e.detach(), tol, f"{what} {part} on input shape {tuple(args[0].shape)}")


def gradients(module, args):
    """Gradients of a fixed random projection of every output (LSTM's c_n included), w.r.t. every
    input tensor (LSTM's h0 and c0 each) and every parameter (by name)."""
    args = tree_map(lambda a: a.detach().clone().requires_grad_(), args)
    outputs = tree_leaves(module(*args))
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    params = dict(module.named_parameters())
    leaves = tree_leaves(args)
    grads = torch.autograd.grad(loss, [*leaves, *params.values()])
    return dict(zip([f"input{i}" for i in range(len(leaves))] + list(params), grads))


def check_gradients(module, reference, name, args, what):
    got, expected = gradients(module, args), gradients(reference, args)
    assert got.keys() == expected.keys()
    tol = 4 * tolerance(torch.float32, seq_len_of(name, args))
    for key in expected:
        assert_close(got[key], expected[key], tol, f"{what} grad {key} on input shape {tuple(args[0].shape)}")


def assert_no_fastrnn(text, what):
    assert "fastrnn::" not in text and "fastrnn.ops" not in text, f"{what} calls fastrnn's custom ops:\n{text}"


def capture(kind, model, name):
    """Capture model by kind: trace-no_grad, trace-grad, script or export."""
    example = inputs(name, *VARIANTS[name].example, seed=0)
    if kind.startswith("trace"):
        with torch.set_grad_enabled(kind == "trace-grad"):
            return torch.jit.trace(model, example)
    if kind == "script":
        return torch.jit.script(model)
    assert kind == "export"
    return torch.export.export(model, example, dynamic_shapes=batch_dims(name, torch.export.Dim("batch")))


@functools.cache
def stock_capture(kind, name):
    """The stock model and its capture (the same weights for every backend)."""
    ref, _ = models(name, "torch")
    return ref, capture(kind, ref, name)


@functools.cache
def captured(kind, name, backend):
    """(stock model, stock model's capture, fastrnn model's capture), built once per session: the
    in-process tests and the without-fastrnn subprocess test share them."""
    _, fast = models(name, backend)
    return (*stock_capture(kind, name), capture(kind, fast, name))


def batch_dims(name, batch):
    """Dynamic batch; stock nn.RNN's export specialises the seq length (a Dim on it is an error)."""
    v = VARIANTS[name]
    shapes = [{0 if v.batch_first else 1: batch}]
    if v.h0:
        shapes.append(({1: batch}, {1: batch}) if v.lstm else {1: batch})
    return tuple(shapes)


def exported_calls(name):
    """New inputs an exported program accepts: the example's shape, and another batch."""
    v = VARIANTS[name]
    return [inputs(name, *v.example, seed=100), inputs(name, v.example[0], v.other[1], seed=101)]


# ---------------------------------------------------------------------------------------------
# torch.jit.trace


@pytest.mark.parametrize("grad_mode", ["no_grad", "grad"])
def test_trace(variant, backend, grad_mode, tmp_path):
    ref, ref_traced, fast_traced = captured(f"trace-{grad_mode}", variant, backend)
    assert_no_fastrnn(str(fast_traced.inlined_graph), "traced graph")
    torch.jit.save(fast_traced, tmp_path / "fast.pt")
    loaded = torch.jit.load(tmp_path / "fast.pt")
    assert_no_fastrnn(str(loaded.inlined_graph), "loaded traced graph")

    for args in new_inputs(variant):
        with torch.no_grad():
            expected = ref_traced(*args)  # the trace of stock nn.RNN is the ground truth ...
            check_outputs(expected, ref(*args), variant, args, "stock trace vs eager")  # ... and generalises
            check_outputs(fast_traced(*args), expected, variant, args, "trace")
            check_outputs(loaded(*args), expected, variant, args, "trace, saved and loaded")
        if grad_mode == "grad":
            check_gradients(fast_traced, ref_traced, variant, args, "trace")
            check_gradients(loaded, ref_traced, variant, args, "trace, saved and loaded")


# ---------------------------------------------------------------------------------------------
# torch.jit.script


def test_script(variant, backend, tmp_path):
    ref, ref_scripted, fast_scripted = captured("script", variant, backend)
    assert_no_fastrnn(str(fast_scripted.inlined_graph), "scripted graph")
    torch.jit.save(fast_scripted, tmp_path / "fast.pt")
    loaded = torch.jit.load(tmp_path / "fast.pt")

    calls = new_inputs(variant)
    if VARIANTS[variant].h0:  # the scripted model keeps the optional argument
        calls.append(calls[-1][:1])
    for args in calls:
        with torch.no_grad():
            expected = ref(*args)
            check_outputs(ref_scripted(*args), expected, variant, args, "stock script vs eager")
            check_outputs(fast_scripted(*args), expected, variant, args, "script")
            check_outputs(loaded(*args), expected, variant, args, "script, saved and loaded")
        check_gradients(fast_scripted, ref, variant, args, "script")
        check_gradients(loaded, ref, variant, args, "script, saved and loaded")


@pytest.mark.parametrize(
    "variant,weight", [("2layer-tanh", "weight_hh_l0"), ("lstm-proj-2layer-bidir-h0", "weight_hr_l1_reverse")]
)
def test_script_keeps_the_fastrnn_module_and_shares_its_parameters(variant, weight, backend):
    """torch writes what a submodule's __prepare_scriptable__ returns (here a stock nn.RNN (LSTM)
    sharing the parameters) back into the parent's _modules. The fastrnn.RNN (LSTM) object itself is
    left as it was, and convert() puts it back in the model; the scripted model shares the parameters
    either way (LSTM's W_hr included)."""
    cell = VARIANTS[variant].cell
    ref, fast = models(variant, backend)
    rnn = fast.rnn
    scripted = torch.jit.script(fast)
    assert type(rnn) is getattr(fastrnn, cell) and rnn.backend == backend
    assert type(fast.rnn) is getattr(torch.nn, cell)
    assert all(getattr(fast.rnn, name) is getattr(rnn, name) for name in rnn._flat_weights_names)
    fastrnn.convert(fast, backend=backend)
    assert type(fast.rnn) is getattr(fastrnn, cell)
    with torch.no_grad():
        for model in (ref, fast):
            getattr(model.rnn, weight).mul_(0.5)
        args = new_inputs(variant)[0]
        check_outputs(scripted(*args), ref(*args), variant, args, "script after an in-place weight update")
        check_outputs(fast(*args), ref(*args), variant, args, "the eager model after scripting")


# ---------------------------------------------------------------------------------------------
# torch.export


def assert_no_fastrnn_in_program(ep, what):
    for node in ep.graph.nodes:
        if node.op == "call_function":
            assert "fastrnn" not in str(node.target), f"{what} calls {node.target}"
    assert_no_fastrnn(ep.graph_module.code, what)


def test_export(variant, backend, tmp_path):
    ref, ref_ep, ep = captured("export", variant, backend)
    assert_no_fastrnn_in_program(ep, "exported program")
    # As dynamic as stock's export (the batch), and no more specialised.
    assert sorted(map(str, ep.range_constraints.values())) == sorted(map(str, ref_ep.range_constraints.values()))
    torch.export.save(ep, tmp_path / "fast.pt2")
    loaded = torch.export.load(tmp_path / "fast.pt2")
    assert_no_fastrnn_in_program(loaded, "loaded exported program")

    for args in exported_calls(variant):
        with torch.no_grad():
            expected = ref(*args)
            check_outputs(ref_ep.module()(*args), expected, variant, args, "stock export vs eager")
            check_outputs(ep.module()(*args), expected, variant, args, "export")
            check_outputs(loaded.module()(*args), expected, variant, args, "export, saved and loaded")
        check_gradients(ep.module(), ref, variant, args, "export")


# ---------------------------------------------------------------------------------------------
# The saved artefacts run where fastrnn cannot be imported: one subprocess loads them all.

_WITHOUT_FASTRNN = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoFastrnn(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "fastrnn" or fullname.startswith("fastrnn."):
                raise ImportError(f"{fullname} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoFastrnn())
    sys.modules["fastrnn"] = None
    try:
        import fastrnn  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("fastrnn imported despite the block")

    import torch

    folder = sys.argv[1]
    report = {}
    for item in json.load(open(f"{folder}/manifest.json")):
        try:
            if item["kind"] == "export":
                module = torch.export.load(f"{folder}/{item['file']}").module()
            else:
                module = torch.jit.load(f"{folder}/{item['file']}")
            calls = torch.load(f"{folder}/{item['inputs']}")
            with torch.no_grad():
                outputs = [tuple(module(*args)) for args in calls]
            torch.save(outputs, f"{folder}/out-{item['file']}.pt")
            report[item["file"]] = "ok"
        except Exception as e:
            report[item["file"]] = f"{type(e).__name__}: {e}"[:2000]
    assert not any(m == "fastrnn" or m.startswith("fastrnn.") for m, v in sys.modules.items() if v is not None)
    print(json.dumps(report))
    """
)


def test_artefacts_run_without_fastrnn(tmp_path):
    manifest, expected = [], {}
    for backend in BACKENDS:
        for name in VARIANTS:
            for kind in ("trace-no_grad", "script", "export"):
                ref, _, artefact = captured(kind, name, backend)
                calls = exported_calls(name) if kind == "export" else new_inputs(name)
                file = f"{backend}-{name}-{kind}.pt" + ("2" if kind == "export" else "")
                (torch.export.save if kind == "export" else torch.jit.save)(artefact, tmp_path / file)
                torch.save(calls, tmp_path / f"{file}-inputs.pt")
                manifest.append({"kind": kind, "file": file, "inputs": f"{file}-inputs.pt"})
                with torch.no_grad():
                    expected[file] = (name, calls, [ref(*args) for args in calls])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FASTRNN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    failed = {file: status for file, status in report.items() if status != "ok"}
    assert not failed, "artefacts that fail without fastrnn:\n" + "\n".join(f"{k}: {v}" for k, v in failed.items())
    for file, (name, calls, outputs) in expected.items():
        got = torch.load(tmp_path / f"out-{file}.pt")
        for args, g, e in zip(calls, got, outputs):
            check_outputs(g, e, name, args, f"{file} without fastrnn")


# ---------------------------------------------------------------------------------------------
# ONNX (checked with onnxruntime)


def onnx_names(name):
    """The flat ONNX input and output names (LSTM's hx and h_n are two tensors each)."""
    v = VARIANTS[name]
    states = ["h0", "c0"] if v.lstm else ["h0"]
    return ["x", *(states if v.h0 else [])], ["y", "h_n", *(["c_n"] if v.lstm else [])]


def check_onnx(path, name, calls, what):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    custom = {(n.domain, n.op_type) for n in nodes if "fastrnn" in n.domain or "fastrnn" in n.op_type}
    assert not custom, f"{what}: the ONNX graph calls fastrnn ops {custom}"
    assert not any("fastrnn" in f.domain for f in model.functions), f"{what}: fastrnn ONNX functions"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]
    assert (feed_names, [o.name for o in session.get_outputs()]) == onnx_names(name)
    ref = models(name, "torch")[0]
    for args in calls:
        got = session.run(None, {n: a.numpy() for n, a in zip(feed_names, tree_leaves(args))})
        with torch.no_grad():
            expected = ref(*args)
            got = tree_unflatten([torch.from_numpy(o) for o in got], tree_structure(expected))
            check_outputs(got, expected, name, args, what)


def test_onnx_legacy(variant, backend, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    v = VARIANTS[variant]
    _, fast = models(variant, backend)
    example = inputs(variant, *v.example, seed=0)
    in_names, out_names = onnx_names(variant)
    t, b = (1, 0) if v.batch_first else (0, 1)
    dynamic_axes = {"x": {t: "seq", b: "batch"}, "y": {t: "seq", b: "batch"}}
    dynamic_axes.update({state: {1: "batch"} for state in in_names[1:] + out_names[1:]})
    path = tmp_path / "fast.onnx"

    def export(model, path):
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dynamic_axes,
        )

    if variant in ONNX_FAILS_FOR_STOCK:
        from torch.onnx.errors import SymbolicValueError

        message = "Unsupported: ONNX export of operator LSTM, LSTMs with projections"
        for model in (models(variant, "torch")[0], fast):  # stock nn.LSTM, then fastrnn.LSTM
            with pytest.raises(SymbolicValueError, match=message):
                export(model, tmp_path / "model.onnx")
        return
    export(fast, path)
    # The legacy exporter keeps both the seq length and the batch dynamic for stock nn.RNN.
    check_onnx(path, variant, new_inputs(variant), "legacy ONNX")


@pytest.mark.parametrize("variant", DYNAMO_ONNX_VARIANTS)
def test_onnx_dynamo(variant, backend, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    v = VARIANTS[variant]
    _, fast = models(variant, backend)
    example = inputs(variant, *v.example, seed=0)
    in_names, out_names = onnx_names(variant)
    path = tmp_path / "fast.onnx"
    torch.onnx.export(
        fast,
        example,
        str(path),
        dynamo=True,
        input_names=in_names,
        output_names=out_names,
        dynamic_shapes=batch_dims(variant, torch.export.Dim("batch")),
        verbose=False,
    )
    # Built on torch.export: the batch stays dynamic, the seq length is specialised as for stock.
    check_onnx(path, variant, exported_calls(variant), "dynamo ONNX")


class _Doubling(torch.nn.RNN):
    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return input * 2, input.sum(0)


def test_script_of_a_converted_subclass_keeps_its_methods():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = _Doubling(3, 3)

        def forward(self, x):
            return self.rnn(x)[0]

    model = fastrnn.convert(Wrapper())
    x = torch.randn(4, 2, 3)
    assert torch.equal(torch.jit.script(model)(x), x * 2)
