"""Backend choice: argument > FASTRNN_BACKEND > auto, in one place."""

import copy

import pytest
import torch

import fastrnn
from fastrnn import backends
from helpers import compare, states, twins


def test_available_backends_lists_numba_and_torch():
    available = fastrnn.available_backends()
    assert "numba" in available and available[-1] == "torch"


def test_auto_picks_numba_on_cpu_and_torch_for_half(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    assert backends.resolve(None, cpu, torch.float32) == "numba"
    assert backends.resolve("auto", cpu, torch.float64) == "numba"
    assert backends.resolve(None, cpu, torch.bfloat16) == "torch"
    assert backends.resolve("numba", cpu, torch.float16) == "torch"


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve(None, torch.device("cpu"), torch.float32) == "torch"
    assert backends.resolve("numba", torch.device("cpu"), torch.float32) == "numba"


def test_environment_is_validated(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="FASTRNN_BACKEND|unknown"):
        backends.resolve(None, torch.device("cpu"), torch.float32)


def test_missing_backend_named_explicitly_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backends, "INSTALLED", {"numba": False, "triton": False, "torch": True})
    with pytest.raises(RuntimeError, match="pip install numba"):
        fastrnn.RNN(3, 4, backend="numba")
    assert backends.resolve(None, torch.device("cpu"), torch.float32) == "torch"


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_env_var_selects_what_runs(monkeypatch, backend):
    monkeypatch.setenv(backends.ENV_VAR, backend)
    ref, fast = twins(3, 4)
    calls = []
    kernels = backends.kernels("numba", "RNN_TANH")
    for name in ("forward", "layer_forward"):  # small layers take the whole-layer kernel
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, original=original: calls.append(1) or original(*a))
    compare(ref, fast, torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True))
    assert bool(calls) == (backend == "numba")


@pytest.mark.skipif("triton" not in fastrnn.available_backends(), reason="triton not installed")
@pytest.mark.parametrize("packed", [False, True])
def test_triton_backend_end_to_end_through_the_module(packed):
    """Under TRITON_INTERPRET=1 (no GPU) the Triton kernels run on CPU tensors."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = torch.nn.RNN(4, 6, num_layers=2, bidirectional=True).to(device)
    fast = fastrnn.RNN(4, 6, num_layers=2, bidirectional=True, backend="triton").to(device)
    fast.load_state_dict(ref.state_dict())
    if not packed:
        with torch.backends.cudnn.flags(enabled=False):
            compare(ref, fast, torch.randn(5, 3, 4, device=device, requires_grad=True))
        return
    seqs = [torch.randn(n, 4, device=device) for n in (5, 2, 3)]
    x = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    (o1, h1), (o2, h2) = ref(x), fast(x)
    assert torch.allclose(o1.data, o2.data, atol=1e-5) and torch.allclose(h1, h2, atol=1e-5)


@pytest.mark.skipif("triton" not in fastrnn.available_backends(), reason="triton not installed")
@pytest.mark.parametrize("cls", [fastrnn.RNN, fastrnn.GRU, fastrnn.LSTM], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_backend_runs_half_precision_under_autocast(cls, dtype):
    """Under autocast the Triton backend casts input, states and weights to the autocast dtype and
    runs its half-precision kernels: what a module cast to that dtype computes, bit for bit, with
    float32 gradients for the float32 parameters and input."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    fast = cls(4, 6, bidirectional=True, backend="triton").to(device)
    half = copy.deepcopy(fast).to(dtype)
    x = torch.randn(5, 3, 4, device=device, requires_grad=True)
    x_half = x.detach().to(dtype).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        out, h_n = fast(x)
    want_out, want_h = half(x_half)
    assert out.dtype == dtype and torch.equal(out, want_out)
    for got, want in zip(states(h_n), states(want_h), strict=True):
        assert got.dtype == dtype and torch.equal(got, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want_out.backward(grad)
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x_half.grad.float())
    for (name, p), p_half in zip(fast.named_parameters(), half.parameters(), strict=True):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, p_half.grad.float()), name
    # and close to torch's float32 module
    ref = getattr(torch.nn, cls.__name__)(4, 6, bidirectional=True).to(device)
    ref.load_state_dict(fast.state_dict())
    torch.testing.assert_close(out.float(), ref(x)[0], atol=5e-2, rtol=5e-2)
