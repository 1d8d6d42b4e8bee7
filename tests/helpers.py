"""Shared test helpers: build torch/fastrnn twins and compare everything they produce."""

import functools
import importlib.util
from pathlib import Path

import torch

from fastrnn.convert import FUSED


@functools.cache
def example(name):
    """A script of examples/ as a module: the seed models live there, once."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def twins(*args, dtype=torch.float64, seed=0, cls=torch.nn.RNN, **kwargs):
    """A torch module of class ``cls`` (torch.nn.RNN, GRU or LSTM) and its fastrnn drop-in
    (fastrnn.RNN, GRU or LSTM) holding the same weights."""
    torch.manual_seed(seed)
    ref = cls(*args, **kwargs).to(dtype)
    fast = FUSED[cls](*args, **kwargs).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def initial_states(module, batch, dtype=torch.float64, requires_grad=True, batched=True, generator=None):
    """A random hx for ``module``: (L*D, B, H), or an LSTM's (h0 (L*D, B, P), c0 (L*D, B, H)) with
    P its proj_size (or H); without the batch dim when not ``batched``."""
    n = module.num_layers * (1 + module.bidirectional)

    def make(width):
        shape = (n, batch, width) if batched else (n, width)
        return torch.randn(shape, dtype=dtype, generator=generator).requires_grad_(requires_grad)

    h0 = make(module.proj_size or module.hidden_size)
    return (h0, make(module.hidden_size)) if isinstance(module, torch.nn.LSTM) else h0


def state_sum(h_n, fn=lambda s: s):
    """sum(fn(s).sum()) over the final states (h_n, or an LSTM's (h_n, c_n)): a scalar loss term."""
    return sum(fn(s).sum() for s in states(h_n))


def tolerance(dtype, seq_len):
    # float32 round-off grows with the number of steps the error is carried through.
    return 1e-10 if dtype == torch.float64 else 2e-5 * (1 + seq_len / 16)


def assert_close(actual, expected, tol, what=""):
    scale = 1.0 + expected.abs().max().item() if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol * scale:.3e}"


def states(hx):
    """hx as a tuple of state tensors: (h,), or an LSTM's (h, c); () for None."""
    return () if hx is None else tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)


def run(module, x, hx, upstream):
    """Forward, then backward of a fixed random projection of every output; returns outputs, h_n
    (a tensor, or LSTM's (h_n, c_n)) and the gradients of the input, each state of hx and every
    parameter, by name."""
    out, h_n = module(x, hx) if hx is not None else module(x)
    out_data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    loss = (out_data * upstream[0](out_data)).sum() + sum((s * upstream[1](s)).sum() for s in states(h_n))
    leaves = {"x": x if not isinstance(x, torch.nn.utils.rnn.PackedSequence) else None}
    leaves.update(zip(("hx", "cx"), states(hx)))
    leaves = {k: v for k, v in leaves.items() if v is not None and v.requires_grad}
    leaves.update(dict(module.named_parameters()))
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return out_data, h_n, dict(zip(leaves, grads))


def fixed_upstream(seed=1):
    """Random upstream gradients that are the same for both modules (keyed by shape)."""
    cache = {}

    def make(t):
        key = tuple(t.shape)
        if key not in cache:
            g = torch.Generator().manual_seed(seed + len(cache))
            cache[key] = torch.randn(key, generator=g, dtype=torch.float64)
        return cache[key].to(t.dtype)

    return make, make


def compare(ref, fast, x, hx=None, seq_len=None):
    """Outputs, h_n and all gradients of fast against ref, at a tolerance for the dtype."""
    dtype = next(ref.parameters()).dtype
    seq_len = seq_len or (x.shape[1] if getattr(ref, "batch_first", False) and x.dim() == 3 else x.shape[0])
    tol = tolerance(dtype, seq_len)
    upstream = fixed_upstream()
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
    leaves = lambda hx: tuple(leaf(s) for s in hx) if isinstance(hx, tuple) else leaf(hx)  # noqa: E731
    o1, h1, g1 = run(ref, leaf(x), leaves(hx), upstream)
    o2, h2, g2 = run(fast, leaf(x), leaves(hx), upstream)
    assert_close(o2, o1, tol, "output")
    assert type(h2) is type(h1) and len(states(h2)) == len(states(h1)), "h_n's form"
    for name, a, e in zip(("h_n", "c_n"), states(h2), states(h1)):
        assert_close(a, e, tol, name)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert_close(g2[name], g1[name], tol * 4, f"grad {name}")
