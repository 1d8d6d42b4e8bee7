"""The Triton launchers against a plain torch loop: forward (out, h_n) and backward (grad_pre, grad_h0).

Without a GPU this runs under TRITON_INTERPRET=1 on CPU tensors, with tiny sizes; with CUDA the
same cases run on the GPU with larger ones.
"""

import importlib
import importlib.util
import os
import pathlib

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must be set before triton is imported: @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")


def _load_module():
    try:
        return importlib.import_module("fastrnn.kernels.triton.elman")
    except ImportError:
        path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "triton" / "elman.py"
        spec = importlib.util.spec_from_file_location("_fastrnn_triton_elman", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


elman = _load_module()
if not CUDA and not elman._INTERPRET:
    pytest.skip("no CUDA and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
# (T, B, D, H): tiny under the interpreter, larger on a GPU. B=3 / 37 is not a multiple of 16.
if not CUDA:
    # BLOCK_B of the float32 reduce path: 8 (H <= 32), 4 (H = 40), 2 (H = 70); B = 17: 3 blocks.
    SHAPES = [(5, 3, 1, 5), (7, 3, 2, 13), (3, 17, 2, 16), (4, 5, 1, 40), (4, 5, 2, 70)]
else:
    SHAPES = [(50, 37, 1, 5), (64, 37, 2, 100), (33, 70, 2, 128), (9, 300, 2, 64)]
TILED_SHAPES = [(4, 3, 2, 37)] if not CUDA else [(40, 37, 2, 200), (20, 19, 1, 1000)]
ATOL = 2e-5 if not CUDA else 1e-4


def reference(proj, w_hh, h0, lengths, relu):
    """The recurrence step by step in float64; returns out, h_n."""
    T, B, D, H = proj.shape
    act = torch.relu if relu else torch.tanh
    out = proj.new_zeros(T, B, D, H)
    h_n = []
    rows = torch.arange(B, device=proj.device)
    for d in range(D):
        h = h0[d]
        for s in range(T):
            active = s < lengths
            t = torch.full_like(lengths, s) if d == 0 else (lengths - 1 - s).clamp(min=0)
            y = act(proj[t, rows, d] + h @ w_hh[d].T)
            h = torch.where(active[:, None], y, h)
            out = out.index_put((t[active], rows[active], torch.full_like(t[active], d)), y[active])
        h_n.append(h)
    return out, torch.stack(h_n)


def make_inputs(T, B, D, H, lengths, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(T, B, D, H, generator=g)
    w_hh = torch.randn(D, H, H, generator=g) / H**0.5
    h0 = torch.randn(D, B, H, generator=g) * 0.5
    grad_out = torch.randn(T, B, D, H, generator=g)
    grad_hn = torch.randn(D, B, H, generator=g)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    return [x.to(DEVICE, dtype) for x in (proj, w_hh, h0, grad_out, grad_hn)] + [lengths.to(DEVICE)]


def lengths_for(T, B):
    # A 0-length row, a full-length row, and others in between.
    return [[0, T, max(1, T // 2)][b % 3] if b < 3 else (b * 7) % (T + 1) for b in range(B)]


def reference_grads(proj, w_hh, h0, grad_out, grad_hn, lengths, relu):
    p, w, h = (x.detach().double().requires_grad_() for x in (proj, w_hh, h0))
    out, h_n = reference(p, w, h, lengths, relu)
    grad_pre, grad_h0 = torch.autograd.grad((out, h_n), (p, h), (grad_out.double(), grad_hn.double()))
    return out, h_n, grad_pre, grad_h0


def check_against_reference(T, B, D, H, relu, atol, dtype=torch.float32, lengths_list=None, scaled=None, **kw):
    lengths_list = lengths_for(T, B) if lengths_list is None else lengths_list
    proj, w_hh, h0, grad_out, grad_hn, lengths = make_inputs(T, B, D, H, lengths_list, dtype)
    out, h_n = elman.elman_forward(proj, w_hh, h0, lengths, relu, **kw)
    grad_pre, grad_h0 = elman.elman_backward(grad_out, grad_hn, out, w_hh, lengths, relu, **kw)
    ref = reference_grads(proj, w_hh, h0, grad_out, grad_hn, lengths, relu)
    for name, got, want in zip(("out", "h_n", "grad_pre", "grad_h0"), (out, h_n, grad_pre, grad_h0), ref):
        assert got.dtype == dtype and got.shape == want.shape, name
        if not (dtype != torch.float32 if scaled is None else scaled):
            torch.testing.assert_close(
                got.double(), want, atol=atol, rtol=atol, msg=lambda m, name=name: f"{name}: {m}"
            )
        else:  # half precision or TF32: error relative to the tensor's scale
            err = (got.double() - want).abs().max().item() if want.numel() else 0.0
            scale = 1.0 + (want.abs().max().item() if want.numel() else 0.0)
            assert err <= atol * scale, f"{name}: max error {err:.3e} > {atol * scale:.3e}"
    # Padded positions are exact zeros in out and grad_pre.
    pad = torch.arange(T, device=DEVICE)[:, None] >= lengths[None, :]
    assert (out[pad] == 0).all() and (grad_pre[pad] == 0).all()


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-D{}-H{}".format(*s))
def test_onchip_matches_reference(shape, relu):
    T, B, D, H = shape
    assert elman._launch_config(B, D, H, torch.float32, torch.device(DEVICE))[0], "expected on-chip kernels"
    check_against_reference(*shape, relu, ATOL)


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("shape", TILED_SHAPES, ids=lambda s: "T{}-B{}-D{}-H{}".format(*s))
def test_tiled_matches_reference(shape, relu, monkeypatch):
    if not CUDA:  # several N and K tiles at a tiny H
        monkeypatch.setattr(elman, "TILE_N", 16)
        monkeypatch.setattr(elman, "TILE_K", 16)
    monkeypatch.setattr(elman, "ONCHIP_MAX_H", 0)
    T, B, D, H = shape
    assert not elman._launch_config(B, D, H, torch.float32, torch.device(DEVICE))[0], "expected tiled kernels"
    check_against_reference(*shape, relu, ATOL)


def test_large_hidden_takes_tiled_path():
    assert not elman._launch_config(4, 2, 1000, torch.float32, torch.device(DEVICE))[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tiled", [False, True], ids=["onchip", "tiled"])
def test_half_precision_close_to_float64(dtype, tiled, monkeypatch):
    if tiled:
        monkeypatch.setattr(elman, "ONCHIP_MAX_H", 0)
    T, B, D, H = (6, 3, 2, 13) if not CUDA else (32, 37, 2, 100)
    check_against_reference(T, B, D, H, dtype == torch.float16, 3e-2, dtype=dtype)


def test_wide_batch_block(monkeypatch):
    # The tensor-core path doubles BLOCK_B once programs outnumber SMs; pretend there is one SM.
    monkeypatch.setattr(elman, "_sm_count", lambda device: 1)
    T, B, D, H = (3, 40, 2, 5) if not CUDA else (20, 300, 2, 100)
    assert elman._launch_config(B, D, H, torch.bfloat16, torch.device(DEVICE))[2]["BLOCK_B"] == 32
    check_against_reference(T, B, D, H, False, 3e-2, dtype=torch.bfloat16)


@pytest.mark.parametrize("tiled", [False, True], ids=["onchip", "tiled"])
def test_float32_tensor_core_path(tiled, monkeypatch):
    # allow_tf32 switches float32 from the CUDA-core reduce to tl.dot (TF32 on a GPU: loose bound).
    if tiled:
        monkeypatch.setattr(elman, "ONCHIP_MAX_H", 0)
    T, B, D, H = (5, 3, 2, 13) if not CUDA else (16, 37, 2, 100)
    assert elman._launch_config(B, D, H, torch.float32, torch.device(DEVICE), True)[2]["MODE"] != "reduce"
    check_against_reference(T, B, D, H, False, 3e-2 if CUDA else ATOL, scaled=CUDA, allow_tf32=True)


@pytest.mark.parametrize("tiled", [False, True], ids=["onchip", "tiled"])
@pytest.mark.parametrize("lens", [[0, 0], [3, 3]], ids=["all-empty", "all-full"])
def test_uniform_lengths(lens, tiled, monkeypatch):
    if tiled:
        monkeypatch.setattr(elman, "ONCHIP_MAX_H", 0)
    check_against_reference(3, 2, 2, 5, False, ATOL, lengths_list=lens)


def test_empty_sequence_returns_h0():
    proj, w_hh, h0, grad_out, grad_hn, lengths = make_inputs(0, 2, 1, 5, [0, 0])
    out, h_n = elman.elman_forward(proj, w_hh, h0, lengths, False)
    grad_pre, grad_h0 = elman.elman_backward(grad_out, grad_hn, out, w_hh, lengths, False)
    assert out.shape == (0, 2, 1, 5) and torch.equal(h_n, h0) and torch.equal(grad_h0, grad_hn)


def test_rejects_bad_inputs():
    proj, w_hh, h0, grad_out, grad_hn, lengths = make_inputs(3, 2, 1, 5, [3, 1])
    with pytest.raises(TypeError):
        elman.elman_forward(proj.double(), w_hh.double(), h0.double(), lengths, False)
    with pytest.raises(TypeError):
        elman.elman_forward(proj, w_hh.half(), h0, lengths, False)
    with pytest.raises(ValueError):
        elman.elman_forward(proj, w_hh[:, :4, :4].contiguous(), h0, lengths, False)
    with pytest.raises(ValueError):
        elman.elman_forward(proj[0], w_hh, h0, lengths, False)
    with pytest.raises(ValueError):
        elman.elman_forward(proj, w_hh, h0, lengths[:1], False)
    with pytest.raises(RuntimeError):
        elman.elman_forward(proj.transpose(0, 1).contiguous().transpose(0, 1), w_hh, h0, lengths, False)
    with pytest.raises(ValueError):
        elman.elman_backward(grad_out[:2].contiguous(), grad_hn, proj, w_hh, lengths, False)
