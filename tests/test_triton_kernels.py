"""The Triton launchers (kernels/triton/recurrence.py) of every cell against fastrnn.reference's
float64 torch loop: forward (out, h_n, the saved gates of GRU and LSTM) and backward (grad_proj,
grad_h0, and grad_rec through the weight gradients it yields, dW_hh and db_hh; for the LSTM also
c_n, grad_c0 and, with proj_size, grad_h through dW_hr).

Without a GPU this runs under TRITON_INTERPRET=1 on CPU tensors, with tiny sizes; with CUDA the
same cases run on the GPU with larger ones.
"""

import importlib
import importlib.util
import os
import pathlib
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Must be set before triton is imported: @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from fastrnn import reference  # noqa: E402


def _load_module():
    try:
        return importlib.import_module("fastrnn.kernels.triton.recurrence")
    except ImportError:  # a checkout that was never installed: kernels/ is not fastrnn.kernels
        path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "triton"
        spec = importlib.util.spec_from_file_location(
            "_fastrnn_triton", path / "__init__.py", submodule_search_locations=[str(path)]
        )
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
        return importlib.import_module("_fastrnn_triton.recurrence")


rec = _load_module()
if not CUDA and not importlib.import_module(rec.__package__ + "._common").INTERPRET:
    pytest.skip("no CUDA and triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
MODES = ["RNN_TANH", "RNN_RELU", "GRU", "LSTM"]
# (T, B, D, H): tiny under the interpreter, larger on a GPU. B = 3, 5, 17, 37 are not multiples
# of any BLOCK_B. Under the interpreter, float32 reduce BLOCK_B is 8 (H <= 32), 4 (H = 40) and
# 2 (Elman H = 70); GRU's H = 70 is above its on-chip limit and runs tiled.
if not CUDA:
    SHAPES = [(5, 3, 1, 5), (7, 3, 2, 13), (3, 17, 2, 16), (4, 5, 1, 40), (4, 5, 2, 70)]
else:
    SHAPES = [(50, 37, 1, 5), (64, 37, 2, 100), (33, 70, 2, 128), (9, 300, 2, 64)]
TILED_SHAPES = [(4, 3, 2, 37)] if not CUDA else [(40, 37, 2, 200), (20, 19, 1, 1000)]
ATOL = 2e-5 if not CUDA else 1e-4


def lengths_for(T, B):
    # A 0-length row, a full-length row, and others in between.
    return [[0, T, max(1, T // 2)][b % 3] if b < 3 else (b * 7) % (T + 1) for b in range(B)]


def make_inputs(mode, T, B, D, H, lengths, dtype=torch.float32, seed=0, scale=1.0, proj_size=None):
    """The launchers' arguments (proj, w_hh, b_hh, h0, grad_out, grad_hn, lengths, w_hr) on DEVICE,
    with NaN in proj and grad_out past each length: the kernels must never read them there. For
    the LSTM h0 and grad_hn are the pairs (h, c), and proj_size P gives a w_hr (D, P, H)."""
    G = rec.GATES[mode]
    P = H if proj_size is None else proj_size
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(T, B, D, G * H, generator=g) * scale
    w_hh = torch.randn(D, G * H, P, generator=g) / P**0.5
    b_hh = torch.randn(D, G * H, generator=g) * 0.5 if mode == "GRU" else None
    h0 = torch.randn(D, B, P, generator=g) * 0.5
    grad_out = torch.randn(T, B, D, P, generator=g)
    grad_hn = torch.randn(D, B, P, generator=g)
    lstm = mode == "LSTM"
    c0, grad_cn = (torch.randn(D, B, H, generator=g), torch.randn(D, B, H, generator=g)) if lstm else (None, None)
    w_hr = None if proj_size is None else torch.randn(D, P, H, generator=g) / H**0.5
    lengths = torch.tensor(lengths, dtype=torch.int64)
    pad = torch.arange(T)[:, None] >= lengths[None, :]
    proj[pad] = float("nan")
    grad_out[pad] = float("nan")
    tensors = (proj, w_hh, b_hh, h0, grad_out, grad_hn, c0, grad_cn, w_hr)
    proj, w_hh, b_hh, h0, grad_out, grad_hn, c0, grad_cn, w_hr = (
        None if x is None else x.to(DEVICE, dtype) for x in tensors
    )
    if lstm:
        h0, grad_hn = (h0, c0), (grad_hn, grad_cn)
    return [proj, w_hh, b_hh, h0, grad_out, grad_hn, lengths.to(DEVICE), w_hr]


def previous_states(out, h0, lengths):
    """h_{t-1} of every step (T, B, D, H): the output one step before in the direction's order, h0
    at a sequence's first step (t = 0 forward, t = L-1 reversed)."""
    h_prev = [torch.cat([h0[0][None], out[:-1, :, 0]])]
    if out.shape[2] == 2:
        t = torch.arange(out.shape[0], device=out.device)[:, None]
        later = torch.cat([out[1:, :, 1], torch.zeros_like(out[:1, :, 1])])
        h_prev.append(torch.where((t == lengths[None, :] - 1)[..., None], h0[1][None], later))
    return torch.stack(h_prev, dim=2)


def lstm_cell_states(i, f, g, c0, lengths):
    """c_t of every step (T, B, D, H) from the gates, each direction in its order from c0; zero
    for t >= L_b."""
    c = torch.zeros_like(i)
    for d in range(i.shape[2]):
        prev = c0[d]
        for t in range(i.shape[0]) if d == 0 else range(i.shape[0] - 1, -1, -1):
            if d == 1:  # a reversed sequence starts at its own last step
                prev = torch.where((t == lengths - 1)[:, None], c0[d], prev)
            valid = (t < lengths)[:, None]
            new = f[t, :, d] * prev + i[t, :, d] * g[t, :, d]
            c[t, :, d] = torch.where(valid, new, 0.0)
            prev = torch.where(valid, new, prev)
    return c


def reference_results(mode, proj, w_hh, b_hh, h0, grad_out, grad_hn, lengths, w_hr=None):
    """What the launchers should return, in float64 from fastrnn.reference.layer, which runs from
    x with W_ih: x = proj flattened and a W_ih that selects each direction's block of it. The
    LSTM's c_n, grad_c0 and grad_w_hr are entries of their own."""
    T, B, D, GH = proj.shape
    lstm = mode == "LSTM"
    pad = (torch.arange(T, device=proj.device)[:, None] >= lengths[None, :])[..., None, None]
    # The reference computes every step (and differentiates through the padded ones), so it gets
    # zeros where the kernels got NaN.
    p = torch.where(pad, 0.0, proj.double()).requires_grad_()
    states = h0 if lstm else (h0,)
    h, c, w = (x.double().requires_grad_() for x in (states[0], states[-1], w_hh))
    b = None if b_hh is None else b_hh.double().requires_grad_()
    wr = None if w_hr is None else w_hr.double().requires_grad_()
    leaves = [p, h, w] + ([] if b is None else [b]) + ([c] if lstm else []) + ([] if wr is None else [wr])
    select = torch.eye(D * GH, dtype=torch.float64, device=proj.device).reshape(D * GH, D, GH).permute(1, 2, 0)
    out, h_n = reference.layer(mode, p.reshape(T, B, D * GH), (h, c) if lstm else h, select, w, None, b, lengths, wr)
    out = out.reshape(T, B, D, -1)
    finals = h_n if lstm else (h_n,)
    grad_states = [x.double() for x in (grad_hn if lstm else (grad_hn,))]
    grads = torch.autograd.grad((out, *finals), leaves, (torch.where(pad, 0.0, grad_out.double()), *grad_states))
    want = dict(out=out.detach(), h_n=finals[0].detach(), grad_proj=grads[0], grad_h0=grads[1], grad_w_hh=grads[2])
    want["h_prev"] = previous_states(want["out"], h.detach(), lengths)
    if lstm:
        want.update(c_n=finals[1].detach(), grad_c0=grads[3])
        if wr is not None:
            want["grad_w_hr"] = grads[4]
        # The saved [i, f, g, o, c_t] from the reference's states.
        z = torch.einsum("tbdk,dgk->tbdg", want["h_prev"], w.detach()) + p.detach()
        z_i, z_f, z_g, z_o = z.chunk(4, -1)
        i, f, g, o = torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g), torch.sigmoid(z_o)
        want["saved"] = torch.cat([i, f, g, o, lstm_cell_states(i, f, g, c.detach(), lengths)], -1)
    elif b is not None:
        want["grad_b_hh"] = grads[3]
        # The GRU's saved gates [r, z, n, W_hn h + b_hn] from the reference's states.
        a = torch.einsum("tbdk,dgk->tbdg", want["h_prev"], w.detach()) + b.detach()
        x_r, x_z, x_n = p.detach().chunk(3, -1)
        a_r, a_z, a_n = a.chunk(3, -1)
        r = torch.sigmoid(x_r + a_r)
        want["saved"] = torch.cat([r, torch.sigmoid(x_z + a_z), torch.tanh(x_n + r * a_n), a_n], -1)
    return want


def assert_close(name, got, want, atol, scaled):
    if not scaled:
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
    else:  # half precision or TF32: error relative to the tensor's scale
        err = (got.double() - want).abs().max().item() if want.numel() else 0.0
        scale = 1.0 + (want.abs().max().item() if want.numel() else 0.0)
        assert err <= atol * scale, f"{name}: max error {err:.3e} > {atol * scale:.3e}"


def check_against_reference(
    mode,
    T,
    B,
    D,
    H,
    atol,
    dtype=torch.float32,
    lengths_list=None,
    scaled=None,
    scale=1.0,
    proj_size=None,
    between=None,
    **kw,
):
    """Forward and backward of cell ``mode`` against the reference; ``between()`` runs after the
    forward (to send the backward down the other path)."""
    lengths_list = lengths_for(T, B) if lengths_list is None else lengths_list
    inputs = make_inputs(mode, T, B, D, H, lengths_list, dtype, scale=scale, proj_size=proj_size)
    proj, w_hh, b_hh, h0, grad_out, grad_hn, lengths, w_hr = inputs
    lstm = mode == "LSTM"
    extra = dict(kw, w_hr=w_hr) if lstm else kw
    out, h_n, saved = rec.forward(proj, w_hh, b_hh, h0, lengths, mode, **extra)
    pad = torch.arange(T, device=DEVICE)[:, None] >= lengths[None, :]
    for kept in saved:  # unset past each length, and backward must not read it there
        kept[pad] = float("nan")
    if between is not None:
        between()
    grads = rec.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, **extra)
    assert len(grads) == (4 if w_hr is not None else 3)
    grad_proj, grad_rec, grad_h0 = grads[:3]
    want = reference_results(mode, proj, w_hh, b_hh, h0, grad_out, grad_hn, lengths, w_hr)
    scaled = dtype != torch.float32 if scaled is None else scaled

    valid = ~pad
    got = dict(out=out, h_n=h_n, grad_proj=grad_proj, grad_h0=grad_h0)
    if lstm:
        got["h_n"], got["c_n"] = h_n
        got["grad_h0"], got["grad_c0"] = grad_h0
    # grad_rec is checked through the weight gradients it gives with the previous states.
    got["grad_w_hh"] = torch.einsum("tbdg,tbdk->dgk", grad_rec.double(), want["h_prev"])
    if mode == "GRU":
        got["grad_b_hh"] = grad_rec.double().sum((0, 1))
        assert grad_rec is not grad_proj
    else:
        assert grad_rec is grad_proj
    if rec.SAVED[mode]:
        (got["saved"],) = saved
        got["saved"], want["saved"] = got["saved"][valid], want["saved"][valid]
    else:
        assert saved == ()
    if w_hr is not None:
        # grad_h, dLoss/dh_t in full, through the gradient of W_hr it gives with m_t = o * tanh(c_t).
        grad_h = grads[3]
        assert grad_h.dtype == dtype and grad_h.shape == out.shape and (grad_h[pad] == 0).all()
        o, c = saved[0].double().nan_to_num()[..., 3 * H :].chunk(2, -1)
        got["grad_w_hr"] = torch.einsum("tbdp,tbdh->dph", grad_h.double(), o * torch.tanh(c))
    for name, value in got.items():
        assert value.dtype == (dtype if name not in ("grad_w_hh", "grad_b_hh", "grad_w_hr") else torch.float64), name
        assert value.shape == want[name].shape, name
        assert_close(name, value, want[name], atol, scaled)
    # Padded positions are exact zeros in out, grad_proj and grad_rec.
    assert (out[pad] == 0).all() and (grad_proj[pad] == 0).all() and (grad_rec[pad] == 0).all()


def expect_onchip(mode, B, D, H, dtype=torch.float32):
    return rec._launch_config(B, D, H, dtype, torch.device(DEVICE), mode)[0]


# Under the interpreter the LSTM skips H = 70 (tiled at the default tiles, 6 s there): its tiled
# kernels run in test_tiled_matches_reference and the projection tests.
MATCH_CASES = [
    pytest.param(shape, mode, id="T{}-B{}-D{}-H{}-{}".format(*shape, mode))
    for shape in SHAPES
    for mode in MODES
    if CUDA or mode != "LSTM" or shape[3] <= rec.ONCHIP_MAX_H["LSTM"]
]


@pytest.mark.parametrize("shape, mode", MATCH_CASES)
def test_matches_reference(shape, mode):
    T, B, D, H = shape
    assert expect_onchip(mode, B, D, H) == (max(16, triton.next_power_of_2(H)) <= rec.ONCHIP_MAX_H[mode])
    check_against_reference(mode, *shape, ATOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", TILED_SHAPES, ids=lambda s: "T{}-B{}-D{}-H{}".format(*s))
def test_tiled_matches_reference(shape, mode, monkeypatch):
    if not CUDA:  # several N and K tiles at a tiny H
        monkeypatch.setattr(rec, "TILE_N", 16)
        monkeypatch.setattr(rec, "TILE_K", 16)
    monkeypatch.setitem(rec.ONCHIP_MAX_H, mode, 0)
    T, B, D, H = shape
    assert not expect_onchip(mode, B, D, H), "expected tiled kernels"
    check_against_reference(mode, *shape, ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_onchip_limits(mode):
    # GRU keeps three H x H blocks on chip and the LSTM four, so they go tiled above H = 64; Elman
    # above 128.
    limit = rec.ONCHIP_MAX_H[mode]
    assert limit == (64 if mode in ("GRU", "LSTM") else 128)
    assert expect_onchip(mode, 4, 2, limit) and not expect_onchip(mode, 4, 2, limit + 1)
    assert not expect_onchip(mode, 4, 2, 1000)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tiled", [False, True], ids=["onchip", "tiled"])
def test_half_precision_close_to_float64(mode, dtype, tiled, monkeypatch):
    if tiled:
        monkeypatch.setitem(rec.ONCHIP_MAX_H, mode, 0)
    T, B, D, H = (6, 3, 2, 13) if not CUDA else (32, 37, 2, 100)
    check_against_reference(mode, T, B, D, H, 3e-2, dtype=dtype)


def test_wide_batch_block(monkeypatch):
    # The tensor-core path doubles BLOCK_B once programs outnumber SMs; pretend there is one SM.
    # GRU and LSTM keep 16 rows (32 spill with their three or four W blocks).
    monkeypatch.setattr(rec, "sm_count", lambda device: 1)
    T, B, D, H = (3, 40, 2, 5) if not CUDA else (20, 300, 2, 100)
    for mode in ("GRU", "LSTM"):
        assert rec._launch_config(B, D, H, torch.bfloat16, torch.device(DEVICE), mode)[2]["BLOCK_B"] == 16
    assert rec._launch_config(B, D, H, torch.bfloat16, torch.device(DEVICE), "RNN_TANH")[2]["BLOCK_B"] == 32
    check_against_reference("RNN_TANH", T, B, D, H, 3e-2, dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tiled", [False, True], ids=["onchip", "tiled"])
def test_float32_tensor_core_path(mode, tiled, monkeypatch):
    # allow_tf32 switches float32 from the CUDA-core reduce to tl.dot (TF32 on a GPU: loose bound).
    if tiled:
        monkeypatch.setitem(rec.ONCHIP_MAX_H, mode, 0)
    T, B, D, H = (5, 3, 2, 13) if not CUDA else (16, 37, 2, 100)
    assert rec._launch_config(B, D, H, torch.float32, torch.device(DEVICE), mode, True)[2]["MODE"] != "reduce"
    check_against_reference(mode, T, B, D, H, 3e-2 if CUDA else ATOL, scaled=CUDA, allow_tf32=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tiled", [False, True], ids=["onchip", "tiled"])
@pytest.mark.parametrize("lens", [[0, 0], [3, 3]], ids=["all-empty", "all-full"])
def test_uniform_lengths(mode, lens, tiled, monkeypatch):
    if tiled:
        monkeypatch.setitem(rec.ONCHIP_MAX_H, mode, 0)
    check_against_reference(mode, 3, 2, 2, 5, ATOL, lengths_list=lens)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("tiled", [False, True], ids=["onchip", "tiled"])
def test_saturated_gates(mode, tiled, monkeypatch):
    # Pre-activations of +-100s: the sigmoid and tanh must saturate, not overflow to NaN.
    if tiled:
        monkeypatch.setitem(rec.ONCHIP_MAX_H, mode, 0)
    check_against_reference(mode, 4, 3, 2, 5, ATOL, scale=200.0)


# The LSTM with proj_size (h = W_hr (o * tanh(c)), P < H): (T, B, D, H, P). Under the interpreter,
# B = 11 is two row blocks of the float32 reduce, H = 40 its BLOCK_B 4 with P's block (32) below
# H's (64), H = 13 with P = 6 a P block (32) above H's (16).
if not CUDA:
    PROJ_SHAPES = [(5, 11, 2, 13, 6), (4, 5, 1, 40, 20)]
    PROJ_TILED_SHAPES = [(4, 3, 2, 37, 21)]
else:
    PROJ_SHAPES = [(50, 37, 2, 64, 32), (33, 70, 2, 30, 7)]
    PROJ_TILED_SHAPES = [(40, 37, 2, 200, 100), (20, 19, 1, 1000, 250)]


@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=lambda s: "T{}-B{}-D{}-H{}-P{}".format(*s))
def test_lstm_projection_matches_reference(shape):
    T, B, D, H, P = shape
    assert expect_onchip("LSTM", B, D, H)
    meta = rec._launch_config(B, D, H, torch.float32, torch.device(DEVICE), "LSTM", None, P, True)[2]
    assert meta["PROJECT"] and meta["BLOCK_P"] == max(32, triton.next_power_of_2(P))
    check_against_reference("LSTM", T, B, D, H, ATOL, proj_size=P)


@pytest.mark.parametrize("shape", PROJ_TILED_SHAPES, ids=lambda s: "T{}-B{}-D{}-H{}-P{}".format(*s))
def test_lstm_projection_tiled_matches_reference(shape, monkeypatch):
    if not CUDA:  # several N and K tiles over both H and P
        monkeypatch.setattr(rec, "TILE_N", 16)
        monkeypatch.setattr(rec, "TILE_K", 16)
    monkeypatch.setitem(rec.ONCHIP_MAX_H, "LSTM", 0)
    T, B, D, H, P = shape
    check_against_reference("LSTM", T, B, D, H, ATOL, proj_size=P)


@pytest.mark.parametrize(
    "dtype, tiled", [(torch.bfloat16, False), (torch.float16, True)], ids=["bf16-onchip", "fp16-tiled"]
)
def test_lstm_projection_half_precision(dtype, tiled, monkeypatch):
    if tiled:
        monkeypatch.setitem(rec.ONCHIP_MAX_H, "LSTM", 0)
    T, B, D, H, P = (6, 3, 2, 13, 6) if not CUDA else (32, 37, 2, 100, 40)
    check_against_reference("LSTM", T, B, D, H, 3e-2, dtype=dtype, proj_size=P)


@pytest.mark.parametrize("first", ["onchip", "tiled"])
@pytest.mark.parametrize("proj_size", [None, 3], ids=["no-proj", "proj"])
def test_lstm_backward_after_other_path(first, proj_size, monkeypatch):
    # Either backward path after either forward path, on descending lengths (a packed batch).
    tiled = lambda: monkeypatch.setitem(rec.ONCHIP_MAX_H, "LSTM", 0)  # noqa: E731
    onchip = lambda: monkeypatch.setitem(rec.ONCHIP_MAX_H, "LSTM", 64)  # noqa: E731
    (tiled if first == "tiled" else onchip)()
    lengths = [5, 4, 4, 2, 1, 0]
    between = onchip if first == "tiled" else tiled
    check_against_reference("LSTM", 5, 6, 2, 7, ATOL, lengths_list=lengths, proj_size=proj_size, between=between)


@pytest.mark.parametrize("mode", MODES)
def test_empty_sequence_returns_h0(mode):
    proj, w_hh, b_hh, h0, grad_out, grad_hn, lengths, w_hr = make_inputs(mode, 0, 2, 1, 5, [0, 0])
    out, h_n, saved = rec.forward(proj, w_hh, b_hh, h0, lengths, mode)
    grad_proj, grad_rec, grad_h0 = rec.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode)
    pairs = zip(h_n, h0, grad_h0, grad_hn) if mode == "LSTM" else [(h_n, h0, grad_h0, grad_hn)]
    for h_n, h0, grad_h0, grad_hn in pairs:
        assert torch.equal(h_n, h0) and torch.equal(grad_h0, grad_hn)
    assert out.shape == (0, 2, 1, 5)
    assert grad_proj.shape == grad_rec.shape == (0, 2, 1, rec.GATES[mode] * 5)
    assert not rec.fuses_whole_layer(0, 2, 5, 1, 5, mode)


def test_lstm_empty_sequence_with_projection():
    proj, w_hh, b_hh, h0, grad_out, grad_hn, lengths, w_hr = make_inputs("LSTM", 0, 2, 1, 5, [0, 0], proj_size=3)
    out, (h_n, c_n), saved = rec.forward(proj, w_hh, None, h0, lengths, "LSTM", w_hr=w_hr)
    assert out.shape == (0, 2, 1, 3) and torch.equal(h_n, h0[0]) and torch.equal(c_n, h0[1])
    grads = rec.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, "LSTM", w_hr=w_hr)
    assert len(grads) == 4 and grads[3].shape == (0, 2, 1, 3)
    assert torch.equal(grads[2][0], grad_hn[0]) and torch.equal(grads[2][1], grad_hn[1])


@pytest.mark.parametrize("mode", MODES)
def test_rejects_bad_inputs(mode):
    proj, w_hh, b_hh, h0, grad_out, grad_hn, lengths, w_hr = make_inputs(mode, 3, 2, 1, 5, [3, 1])
    d = lambda x: None if x is None else (tuple(map(d, x)) if isinstance(x, tuple) else x.double())  # noqa: E731
    with pytest.raises(TypeError):
        rec.forward(d(proj), d(w_hh), d(b_hh), d(h0), lengths, mode)
    with pytest.raises(TypeError):
        rec.forward(proj, w_hh.half(), b_hh, h0, lengths, mode)
    with pytest.raises(ValueError):
        rec.forward(proj, w_hh[:, :4, :4].contiguous(), b_hh, h0, lengths, mode)
    with pytest.raises(ValueError):
        rec.forward(proj[0], w_hh, b_hh, h0, lengths, mode)
    with pytest.raises(ValueError):
        rec.forward(proj, w_hh, b_hh, h0, lengths[:1], mode)
    with pytest.raises(RuntimeError):
        rec.forward(proj.transpose(0, 1).contiguous().transpose(0, 1), w_hh, b_hh, h0, lengths, mode)
    with pytest.raises(ValueError):  # b_hh is GRU's alone; Elman and LSTM fold it into proj
        rec.forward(proj, w_hh, None if mode == "GRU" else proj[0, 0], h0, lengths, mode)
    with pytest.raises(ValueError):
        rec.forward(proj, w_hh, b_hh, h0, lengths, "UNKNOWN")
    out, h_n, saved = rec.forward(proj, w_hh, b_hh, h0, lengths, mode)
    with pytest.raises(ValueError):
        rec.backward(grad_out[:2].contiguous(), grad_hn, out, saved, w_hh, h0, lengths, mode)
    if rec.SAVED[mode]:
        with pytest.raises(ValueError):
            rec.backward(grad_out, grad_hn, out, (), w_hh, h0, lengths, mode)
        with pytest.raises(ValueError):
            rec.backward(grad_out, grad_hn, out, (saved[0][..., :5].contiguous(),), w_hh, h0, lengths, mode)
    if mode != "LSTM":
        with pytest.raises(ValueError):  # W_hr is the LSTM's alone
            rec.forward(proj, w_hh, b_hh, h0, lengths, mode, w_hr=w_hh[:, :2].contiguous())
        return
    h, c = h0
    with pytest.raises(ValueError):  # the LSTM's state is the pair (h0, c0)
        rec.forward(proj, w_hh, None, h, lengths, mode)
    with pytest.raises(ValueError):
        rec.backward(grad_out, grad_hn[0], out, saved, w_hh, h0, lengths, mode)
    with pytest.raises(ValueError):
        rec.forward(proj, w_hh, None, (h, c[..., :4].contiguous()), lengths, mode)
    with pytest.raises(TypeError):
        rec.forward(proj, w_hh, None, (h, c.double()), lengths, mode)
    with pytest.raises(ValueError):  # h narrower than c needs a W_hr
        rec.forward(proj, w_hh[..., :3].contiguous(), None, (h[..., :3].contiguous(), c), lengths, mode)
    with pytest.raises(ValueError):  # W_hr (D, P, H)
        rec.forward(proj, w_hh, None, h0, lengths, mode, w_hr=w_hh[:, :3].contiguous())
    with pytest.raises(ValueError):
        rec.backward(grad_out, (grad_hn[0], grad_hn[1][..., :4].contiguous()), out, saved, w_hh, h0, lengths, mode)


# The split across SMs (W_hh's rows cut into column slices, one program each, see recurrence.py):
# under the interpreter the per-step twin with k > 1 and the persistent kernel with k = 1 (its
# grid barrier runs, with one program per counter); on a GPU both with k > 1.
SPLIT_SHAPE = (4, 3, 2, 37) if not CUDA else (30, 37, 2, 200)
SPLIT_SLICE = 16 if not CUDA else 32
# The persistent kernel's slice: all of H in one program under the interpreter.
PERSISTENT_SLICE = None if not CUDA else SPLIT_SLICE


def split_layer(monkeypatch, mode, split, proj_size=None, tiles=16, slice_=SPLIT_SLICE):
    """Forward and backward outputs of the tiled kernels at SPLIT_SHAPE under ``split``, flat, with
    the Split the launch used."""
    monkeypatch.setattr(rec, "SPLIT", split)
    monkeypatch.setattr(rec, "SPLIT_SLICE", slice_)
    monkeypatch.setattr(rec, "TILE_N", tiles)
    monkeypatch.setattr(rec, "TILE_K", tiles)
    monkeypatch.setitem(rec.ONCHIP_MAX_H, mode, 0)
    T, B, D, H = SPLIT_SHAPE
    inputs = make_inputs(mode, T, B, D, H, lengths_for(T, B), proj_size=proj_size)
    proj, w_hh, b_hh, h0, grad_out, grad_hn, lengths, w_hr = inputs
    extra = dict(w_hr=w_hr) if mode == "LSTM" else {}
    plan = rec._launch_config(B, D, H, torch.float32, torch.device(DEVICE), mode, None, proj_size, w_hr is not None)
    out, h_n, saved = rec.forward(proj, w_hh, b_hh, h0, lengths, mode, **extra)
    grads = rec.backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, **extra)
    flat = [out, *saved, *(h_n if mode == "LSTM" else (h_n,))]
    for g in grads:
        flat.extend(g if isinstance(g, tuple) else (g,))
    return flat, plan[3]


@pytest.mark.parametrize("mode", MODES)
def test_split_per_step_matches_reference(mode, monkeypatch):
    _, split = split_layer(monkeypatch, mode, "per_step")
    assert split.k > 1 and split.per_step and not split.grid_sync
    check_against_reference(mode, *SPLIT_SHAPE, ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_split_persistent_matches_reference(mode, monkeypatch):
    _, split = split_layer(monkeypatch, mode, "persistent", slice_=PERSISTENT_SLICE)
    assert split.grid_sync and not split.per_step and split.k == (1 if not CUDA else 7)
    check_against_reference(mode, *SPLIT_SHAPE, ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_split_variants_agree_bitwise(mode, monkeypatch):
    # One program, the per-step twin and the persistent kernel run the same step code on the
    # same tiles: every output, saved gate and gradient is equal, not just close.
    want, _ = split_layer(monkeypatch, mode, "off")
    for split, slice_ in (("per_step", SPLIT_SLICE), ("persistent", PERSISTENT_SLICE)):
        got, _ = split_layer(monkeypatch, mode, split, slice_=slice_)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"{split}: output {i} differs from one program's"


# With W_hr two exchanges per step: H columns (gates, c, m_t), then P columns (h_t = m_t @ W_hr^T).
# P = 21 under the interpreter: 16-column slices of P too, and k = 3 slices of H leave one program
# without P columns.
SPLIT_PROJ = 21 if not CUDA else 50


@pytest.mark.parametrize("split", ["per_step", "persistent"])
def test_split_lstm_projection_matches_reference(split, monkeypatch):
    slice_ = SPLIT_SLICE if split == "per_step" else PERSISTENT_SLICE
    _, plan = split_layer(monkeypatch, "LSTM", split, proj_size=SPLIT_PROJ, slice_=slice_)
    H = SPLIT_SHAPE[3]
    assert plan.per_step == (split == "per_step") and plan.k * plan.slice >= H and plan.k * plan.slice_k >= SPLIT_PROJ
    assert plan.k == (1 if split == "persistent" and not CUDA else (3 if not CUDA else 7))
    check_against_reference("LSTM", *SPLIT_SHAPE, ATOL, proj_size=SPLIT_PROJ)


def test_split_lstm_projection_variants_agree_bitwise(monkeypatch):
    want, _ = split_layer(monkeypatch, "LSTM", "off", proj_size=SPLIT_PROJ)
    for split, slice_ in (("per_step", SPLIT_SLICE), ("persistent", PERSISTENT_SLICE)):
        got, _ = split_layer(monkeypatch, "LSTM", split, proj_size=SPLIT_PROJ, slice_=slice_)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(g, w), f"{split}: output {i} differs from one program's"


def test_split_plan(monkeypatch):
    # A 132-SM GPU (H100/H200): as many programs as fill the SMs, never more, in 16-column slices.
    monkeypatch.setattr(rec, "sm_count", lambda device: 132)
    monkeypatch.setattr(rec, "_cooperative_launch", lambda device: True)
    cuda = torch.device("cuda")

    def plan(B, D, H, mode="RNN_TANH", P=None, project=False):
        return rec._launch_config(B, D, H, torch.float32, cuda, mode, None, P, project)

    onchip, grid, meta, split = plan(16, 1, 1024)
    assert not onchip and (split.k, split.slice) == (64, 16) and grid == (1, 1, 64)
    assert split.grid_sync and not split.per_step and meta["GRID_SYNC"] and meta["launch_cooperative_grid"]
    _, grid, _, split = plan(64, 2, 1024, "LSTM")  # 8 (direction, batch block) pairs
    assert (split.k, split.slice) == (16, 64) and grid == (2, 4, 16) and 2 * 4 * 16 <= 132
    _, _, meta, split = plan(1, 1, 256, "LSTM", 64, True)  # W_hr's 64 columns: 4 slices of 16
    assert (split.k, split.slice, split.slice_k) == (16, 16, 16) and meta["GRID_SYNC"]
    # 19 batch blocks leave 6 SMs each: 34 columns, rounded up to 48, make 5 slices (95 programs).
    assert plan(300, 1, 200)[3][:2] == (5, 48)
    monkeypatch.setattr(rec, "_cooperative_launch", lambda device: False)
    split = plan(16, 1, 1024)[3]
    assert split.per_step and not split.grid_sync and split.k == 64
    monkeypatch.setattr(rec, "SPLIT", "off")
    assert plan(16, 1, 1024)[3].k == 1
    monkeypatch.setattr(rec, "SPLIT", "persistent")
    monkeypatch.setattr(rec, "SPLIT_SLICE", 16)
    with pytest.raises(ValueError, match="SMs"):  # 128 programs per direction, 256 > 132 SMs
        plan(16, 2, 2048)
    monkeypatch.setattr(rec, "SPLIT_SLICE", None)  # 256 batch blocks fill the SMs: k = 1, no barrier needed
    _, grid, meta, split = plan(4096, 2, 1024, "GRU")
    assert split.k == 1 and "launch_cooperative_grid" not in meta and split.grid_sync == rec.INTERPRET
    monkeypatch.setattr(rec, "SPLIT_SLICE", 0)
    with pytest.raises(ValueError, match="SPLIT_SLICE"):
        plan(16, 1, 1024)
    monkeypatch.setattr(rec, "SPLIT", "sideways")
    with pytest.raises(ValueError, match="SPLIT"):
        plan(16, 1, 1024)


@pytest.mark.skipif(CUDA, reason="the interpreter's limit")
def test_split_persistent_refuses_what_would_deadlock(monkeypatch):
    # The interpreter runs programs one after another: a grid barrier across k > 1 programs would
    # spin forever, so the launcher refuses it instead.
    with pytest.raises(ValueError, match="SMs"):
        split_layer(monkeypatch, "RNN_TANH", "persistent", slice_=16)
