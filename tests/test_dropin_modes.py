"""Every path a model takes besides plain forward/backward: higher-order and batched gradients,
forward-mode AD, tensor-subclass weights, functional_call, parametrizations and subclasses,
threads and forked processes, dynamic shapes, and the backend fallbacks behind them."""

import copy
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from fastrnn import backends, ops
from helpers import assert_close, compare, initial_states, state_sum, states, twins

SHAPES = [dict(), dict(num_layers=2, bidirectional=True, nonlinearity="relu")]
# Every test of a module path runs for each cell's torch class.
CLASSES = pytest.mark.parametrize("cls", [torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM], ids=["RNN", "GRU", "LSTM"])


def _flat(result):
    """(output, h_n) or an LSTM's (output, (h_n, c_n)) as one flat tuple of tensors."""
    output, h_n = result
    return (output, *states(h_n))


def _on_flat_states(module, n_states):
    """module(x, hx) with hx given as n_states tensors, returning flat outputs (gradcheck's form)."""
    return lambda x, *h: _flat(module(x, h[0] if n_states == 1 else tuple(h)))


@pytest.mark.usefixtures("layer_kernels")
@pytest.mark.parametrize("options", SHAPES)
@CLASSES
def test_gradgradcheck_and_batched_gradients(options, cls):
    if cls is not torch.nn.RNN:
        options = {k: v for k, v in options.items() if k != "nonlinearity"}
    _, fast = twins(3, 4, cls=cls, **options)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h = states(initial_states(fast, 2))
    fn = _on_flat_states(fast, len(h))
    assert gradcheck(fn, (x, *h), check_batched_grad=True)
    assert gradgradcheck(fn, (x, *h), check_batched_grad=True)


@CLASSES
def test_gradgradcheck_packed_with_dropout(cls):
    _, fast = twins(3, 4, num_layers=2, dropout=0.5, bidirectional=True, cls=cls)
    seqs = [torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (2, 4, 3)]

    def run(*seqs):
        torch.manual_seed(0)  # the same dropout masks on every call
        out, h_n = fast(pack_sequence(seqs, enforce_sorted=False))
        return out.data, *states(h_n)

    assert gradgradcheck(run, seqs)


@pytest.mark.usefixtures("layer_kernels")
@CLASSES
def test_gradient_penalty_matches_torch_and_first_order_stays_fused(monkeypatch, cls):
    """create_graph=True: second derivatives are torch's; a plain backward still runs the kernels."""
    ref, fast = twins(3, 5, num_layers=2, cls=cls)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    penalties = {}
    for name, module in (("torch", ref), ("fast", fast)):
        (grad_x,) = torch.autograd.grad(module(x)[0].pow(2).sum(), x, create_graph=True)
        penalties[name] = torch.autograd.grad(grad_x.pow(2).sum(), [x, *module.parameters()])
    for expected, actual in zip(penalties["torch"], penalties["fast"]):
        assert_close(actual, expected, 1e-10, "penalty gradient")
    calls = []
    kernels = backends.kernels("numba", fast.mode)
    for name in ("backward", "layer_backward"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, original=original: calls.append(1) or original(*a))
    fast(x)[0].sum().backward()
    assert calls


@CLASSES
def test_forward_mode_ad_and_jacobians_match_torch(cls):
    ref, fast = twins(3, 4, bidirectional=True, cls=cls)
    x, tangent = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(ref(fwAD.make_dual(x, tangent))[0]).tangent
        actual = fwAD.unpack_dual(fast(fwAD.make_dual(x, tangent))[0]).tangent
    assert_close(actual, expected, 1e-12, "jvp")
    for vectorize in (False, True):
        jac = [torch.autograd.functional.jacobian(lambda x, m=m: m(x)[0], x, vectorize=vectorize) for m in (ref, fast)]
        assert_close(jac[1], jac[0], 1e-12, "jacobian")
    jac_fwd = [
        torch.func.jacfwd(lambda x, m=m: torch.func.functional_call(m, dict(m.named_parameters()), (x,))[0])(x)
        for m in (ref, fast)
    ]
    assert_close(jac_fwd[1], jac_fwd[0], 1e-12, "jacfwd")


@CLASSES
def test_per_sample_gradients_through_expanded_weights(cls):
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    ref, fast = twins(3, 4, batch_first=True, dtype=torch.float32, cls=cls)
    x = torch.randn(5, 6, 3)
    try:
        call_for_per_sample_grads(ref)(x)[0].sum().backward()
    except RuntimeError as error:  # torch's float32 CPU LSTM (oneDNN) has no ExpandedWeights rule
        with pytest.raises(type(error)):
            call_for_per_sample_grads(fast)(x)
        return
    call_for_per_sample_grads(fast)(x)[0].sum().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert_close(p.grad_sample, q.grad_sample, 1e-5, name)


@CLASSES
def test_functional_call_with_other_dtype_parameters(cls):
    ref, fast = twins(3, 4, dtype=torch.float32, cls=cls)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    outputs = [
        torch.func.functional_call(m, {k: v.double() for k, v in m.named_parameters()}, (x,)) for m in (ref, fast)
    ]
    assert outputs[1][0].dtype == torch.float64
    assert_close(outputs[1][0], outputs[0][0], 1e-12, "output")


class _Symmetric(torch.nn.Module):
    def forward(self, w):
        return (w + w.T) / 2


class DoublingRNN(torch.nn.RNN):
    def forward(self, x, hx=None):
        out, h_n = super().forward(x, hx)
        return 2 * out, h_n


def test_convert_handles_parametrized_rnns():
    ref = torch.nn.RNN(3, 3, num_layers=2).double()
    parametrize.register_parametrization(ref, "weight_hh_l0", _Symmetric())
    fast = fastrnn.convert(copy.deepcopy(ref))
    assert isinstance(fast, fastrnn.RNN) and parametrize.is_parametrized(fast, "weight_hh_l0")
    compare(ref, fast, torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True))
    parametrize.remove_parametrizations(fast, "weight_hh_l0")
    assert type(fast) is fastrnn.RNN


def test_convert_handles_subclasses_and_they_pickle(monkeypatch):
    calls = []
    original = ops.rnn
    monkeypatch.setattr(ops, "rnn", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    ref = DoublingRNN(3, 4).double()
    fast = fastrnn.convert(copy.deepcopy(ref))
    assert isinstance(fast, DoublingRNN) and isinstance(fast, fastrnn.RNN)
    compare(ref, fast, torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True))
    assert calls
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert type(clone) is type(fast)
        assert_close(clone(x)[0], ref(x)[0], 1e-12, "clone output")


def _run_script(code, timeout=120):
    """Runs code in a fresh interpreter (thread settings and fork state are per process)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_calls_leave_torch_thread_settings_alone():
    out = _run_script("""
        import torch, fastrnn
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for hidden in (8, 256):  # whole-layer and split kernels
                rnn = fastrnn.RNN(hidden, hidden, bidirectional=True)
                rnn(torch.randn(20, 16, hidden))[0].sum().backward()
                assert torch.get_num_threads() == threads, (threads, torch.get_num_threads())
        print("ok")
    """)
    assert out.strip() == "ok"


def test_forked_children_run_fastrnn_and_stock_rnns():
    """At one thread (as DataLoader workers run) a forked child works after the parent ran the split
    kernels; stock nn.RNN is the bar: it hangs in such a child at two threads on its own."""
    out = _run_script(
        """
        import multiprocessing as mp, torch, fastrnn
        torch.set_num_threads(1)

        def train(cls):
            torch.manual_seed(0)
            rnn = cls(256, 256, bidirectional=True)
            out = rnn(torch.randn(20, 16, 256))[0]
            out.sum().backward()
            return out.detach().sum().item()

        train(fastrnn.RNN)
        for cls in (fastrnn.RNN, torch.nn.RNN):
            child = mp.get_context("fork").Process(target=train, args=(cls,))
            child.start()
            child.join(60)
            assert child.exitcode == 0, (cls, child.exitcode)
        print("ok")
    """,
        timeout=200,
    )
    assert out.strip() == "ok"


@CLASSES
def test_python_threads_share_a_module(cls):
    ref, fast = twins(64, 64, dtype=torch.float32, cls=cls)
    inputs = [torch.randn(30, 8, 64) for _ in range(4)]
    results = [None] * len(inputs)

    def work(i):
        results[i] = fast(inputs[i])[0]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for x, out in zip(inputs, results):
        assert_close(out, ref(x)[0], 1e-4, "threaded output")


def test_schemas_inferred_from_type_hints_take_symbolic_sizes():
    common = "Tensor[] weights, Tensor[] masks, Tensor lengths, Tensor? valid_rows, SymInt seq_len"
    assert str(ops.rnn_fwd._opoverload._schema) == (
        f"fastrnn::rnn_fwd(Tensor x, Tensor[] hx, {common}, SymInt num_layers, str mode, str backend) "
        "-> (Tensor, Tensor[], Tensor[])"
    )
    assert str(ops.rnn_bwd._opoverload._schema) == (
        f"fastrnn::rnn_bwd(Tensor grad_out, Tensor[] grad_hn, Tensor x, Tensor[] hx, {common}, Tensor output, "
        "Tensor[] inner, SymInt num_layers, str mode, str backend) -> (Tensor, Tensor[], Tensor[])"
    )


@CLASSES
def test_compile_with_dynamic_lengths_and_batch_compiles_once(cls):
    from torch._dynamo.testing import CompileCounter

    ref, fast = twins(4, 8, num_layers=2, dtype=torch.float32, cls=cls)
    counter = CompileCounter()
    compiled = torch.compile(fast, backend=counter, fullgraph=True)
    for seq_len, batch in ((5, 2), (7, 3), (12, 4)):
        x = torch.randn(seq_len, batch, 4, requires_grad=True)
        if seq_len == 5:
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(x, 1)
        results = []
        for module in (ref, compiled):
            out, h_n = module(x)
            results.append(
                (
                    out,
                    *states(h_n),
                    *torch.autograd.grad(
                        (out.sum() + state_sum(h_n)),
                        [x, *fast.parameters()] if module is compiled else [x, *ref.parameters()],
                    ),
                )
            )
        for expected, actual in zip(*results):
            assert_close(actual, expected, 1e-5, f"length {seq_len}, batch {batch}")
    assert counter.frame_count == 1


def test_cuda_auto_runs_torch_until_triton_is_measured_ahead(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve(None, torch.device("cuda"), torch.float32) == "torch"
    if backends.INSTALLED["triton"]:
        assert backends.resolve("triton", torch.device("cuda"), torch.float32) == "triton"


@pytest.mark.parametrize("mode", ["tracing", "autocast", "a tensor subclass"])
def test_modes_the_kernels_cannot_serve_run_torch(mode):
    x = torch.randn(2, 2)
    if mode == "tracing":
        seen = []
        torch.jit.trace(lambda t: seen.append(backends.torch_only_mode()) or t * 1, (x,), check_trace=False)
        assert seen == ["tracing"]
    elif mode == "autocast":
        with torch.autocast("cpu"):
            assert backends.torch_only_mode() == "autocast"
    else:
        assert backends.torch_only_mode((x, torch.nn.Parameter(x))) is None
        assert backends.torch_only_mode((x.as_subclass(_Marked),)) == "a tensor subclass (_Marked)"
    assert backends.torch_only_mode() is None


class _Marked(torch.Tensor):
    pass


@pytest.mark.skipif(not backends.INSTALLED["triton"], reason="triton not installed")
def test_failing_triton_kernels_fall_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "BROKEN", {})
    monkeypatch.setattr(backends, "_supports", lambda name, device, dtype: True)

    def broken(*args):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(backends.kernels("triton"), "forward", broken)
    ref, fast = twins(3, 4, dtype=torch.float32)
    fast.backend = "triton"
    x = torch.randn(5, 2, 3)
    with pytest.warns(RuntimeWarning, match="triton kernels failed"):
        assert_close(fast(x)[0], ref(x)[0], 1e-5, "fallback output")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(fast(x)[0], ref(x)[0], 1e-5, "later output")
    assert backends.resolve("triton", x.device, x.dtype) == "torch"


@CLASSES
def test_tied_weights_get_whole_gradients_with_create_graph(cls):
    ref, fast = twins(4, 4, num_layers=2, cls=cls)
    for module in (ref, fast):
        module.weight_hh_l1 = module.weight_hh_l0
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(m(x)[0].pow(2).sum(), m.weight_hh_l0, create_graph=True)[0] for m in (ref, fast)]
    assert_close(grads[1], grads[0], 1e-10, "tied weight gradient")


@CLASSES
def test_dispatch_modes_see_torchs_ops(cls):
    from torch.utils.flop_counter import FlopCounterMode

    ref, fast = twins(8, 8, dtype=torch.float32, cls=cls)
    x = torch.randn(10, 2, 8)
    counts = []
    for module in (ref, fast):
        with FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    # torch counts no FLOPs in the oneDNN LSTM op: equal counts then mean fastrnn ran the same op.
    assert counts[1] == counts[0] and (counts[0] > 0 or cls is torch.nn.LSTM)
