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
    """A torch module of class ``cls`` (torch.nn.RNN or torch.nn.GRU) and its fastrnn drop-in
    (fastrnn.RNN or fastrnn.GRU) holding the same weights."""
    torch.manual_seed(seed)
    ref = cls(*args, **kwargs).to(dtype)
    fast = FUSED[cls](*args, **kwargs).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def tolerance(dtype, seq_len):
    # float32 round-off grows with the number of steps the error is carried through.
    return 1e-10 if dtype == torch.float64 else 2e-5 * (1 + seq_len / 16)


def assert_close(actual, expected, tol, what=""):
    scale = 1.0 + expected.abs().max().item() if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol * scale:.3e}"


def run(module, x, hx, upstream):
    """Forward, then backward of a fixed random projection of every output; returns outputs and
    the gradients of the input, hx and every parameter, by name."""
    out, h_n = module(x, hx) if hx is not None else module(x)
    out_data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    loss = (out_data * upstream[0](out_data)).sum() + (h_n * upstream[1](h_n)).sum()
    leaves = {"x": x if not isinstance(x, torch.nn.utils.rnn.PackedSequence) else None, "hx": hx}
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
    o1, h1, g1 = run(ref, leaf(x), leaf(hx), upstream)
    o2, h2, g2 = run(fast, leaf(x), leaf(hx), upstream)
    assert_close(o2, o1, tol, "output")
    assert_close(h2, h1, tol, "h_n")
    assert g1.keys() == g2.keys()
    for name in g1:
        assert_close(g2[name], g1[name], tol * 4, f"grad {name}")
