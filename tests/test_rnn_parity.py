"""fastrnn.RNN, GRU and LSTM against torch.nn.RNN, GRU and LSTM: outputs, h_n (and c_n) and every
gradient, over every option (LSTM's proj_size included)."""

import collections
import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence, pad_packed_sequence

import fastrnn
from fastrnn import backends
from helpers import assert_close, compare, initial_states, state_sum, states, tolerance, twins

pytestmark = pytest.mark.usefixtures("layer_kernels")

RNN, GRU, LSTM = (torch.nn.RNN, fastrnn.RNN), (torch.nn.GRU, fastrnn.GRU), (torch.nn.LSTM, fastrnn.LSTM)
# Each test that is about the module runs on every (torch class, fastrnn class) pair.
CLASSES = [pytest.param(RNN, id="RNN"), pytest.param(GRU, id="GRU"), pytest.param(LSTM, id="LSTM")]
# Tests about the cell's arithmetic run the RNN's nonlinearities and LSTM's projection too:
# (classes, extra kwargs).
CELLS = [
    pytest.param(RNN, {"nonlinearity": "tanh"}, id="RNN-tanh"),
    pytest.param(RNN, {"nonlinearity": "relu"}, id="RNN-relu"),
    pytest.param(GRU, {}, id="GRU"),
    pytest.param(LSTM, {}, id="LSTM"),
    pytest.param(LSTM, {"proj_size": 2}, id="LSTM-proj"),
]


def pair(classes, *args, **kwargs):
    """twins() of the torch class, checked to be the fastrnn class named with it."""
    ref_cls, fast_cls = classes
    ref, fast = twins(*args, cls=ref_cls, **kwargs)
    assert type(ref) is ref_cls and type(fast) is fast_cls
    return ref, fast


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("packed", [False, True])
def test_the_fused_kernels_run(classes, packed, layer_kernels, monkeypatch):
    """What this file compares is the kernels' work, not a silent fallback to torch: each layer
    runs through the launchers of the path under test, forward and backward."""
    ref, fast = pair(classes, 4, 5, num_layers=2, bidirectional=True)
    kernels = backends.kernels("numba", fast.mode)
    calls = collections.Counter()
    for name in ("forward", "backward", "layer_forward", "layer_backward"):
        launcher = getattr(kernels, name)

        def counted(*args, _name=name, _launcher=launcher):
            calls[_name] += 1
            return _launcher(*args)

        monkeypatch.setattr(kernels, name, counted)
    if packed:
        x = pack_sequence(_packed_case(False), enforce_sorted=False)
        out, h_n = fast(x)
        (out.data.sum() + state_sum(h_n)).backward()
    else:
        compare(ref, fast, torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True))
    names = ("forward", "backward") if layer_kernels == "split" else ("layer_forward", "layer_backward")
    assert calls == dict.fromkeys(names, 2), calls


OPTIONS = list(itertools.product([True, False], [False, True], [1, 3], [False, True], [False, True]))


@pytest.mark.parametrize("classes,cell_kwargs", CELLS)
@pytest.mark.parametrize("bias,batch_first,num_layers,bidirectional,with_hx", OPTIONS)
def test_every_option_float64(classes, cell_kwargs, bias, batch_first, num_layers, bidirectional, with_hx):
    ref, fast = pair(
        classes,
        4,
        6,
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        **cell_kwargs,
    )
    T, B = 5, 3
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), dtype=torch.float64, requires_grad=True)
    compare(ref, fast, x, initial_states(ref, B) if with_hx else None)


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("T", [1, 15, 63, 300])
@pytest.mark.parametrize("B,H", [(1, 1), (4, 17), (3, 130)])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_and_sizes_float32(classes, T, B, H, bidirectional):
    ref, fast = pair(classes, 7, H, bidirectional=bidirectional, dtype=torch.float32)
    x = torch.randn(T, B, 7, requires_grad=True)
    compare(ref, fast, x, initial_states(ref, B, torch.float32))


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("I,H,num_layers", [(1, 2, 2), (5, 3, 2), (9, 65, 1), (3, 129, 1)])
def test_odd_sizes_float64(classes, I, H, num_layers):
    ref, fast = pair(classes, I, H, num_layers=num_layers, bidirectional=True)
    x = torch.randn(11, 5, I, dtype=torch.float64, requires_grad=True)
    compare(ref, fast, x, initial_states(ref, 5))


@pytest.mark.parametrize("classes,cell_kwargs", CELLS)
def test_large_hidden_uses_blas_path(classes, cell_kwargs):
    ref, fast = pair(classes, 33, 512, bidirectional=True, dtype=torch.float32, **cell_kwargs)
    compare(ref, fast, torch.randn(6, 130, 33, requires_grad=True))


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_accumulate_and_scale_in_place_like_torch(classes, bidirectional):
    """Every .grad is its own tensor: accumulating a second backward or scaling in place (as
    gradient clipping does) must touch each parameter once."""
    ref, fast = pair(classes, 4, 5, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    for module in (ref, fast):
        for _ in range(2):
            out, h_n = module(x)
            (out.pow(2).sum() + state_sum(h_n)).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm=1.0)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, 1e-10, name)


@pytest.mark.parametrize("classes", CLASSES)
def test_unbatched_input(classes):
    ref, fast = pair(classes, 4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    compare(ref, fast, x, seq_len=6)
    compare(ref, fast, x, initial_states(ref, None, batched=False), seq_len=6)


@pytest.mark.parametrize("classes", CLASSES)
def test_unbatched_batch_first_is_ignored(classes):
    ref, fast = pair(classes, 4, 5, batch_first=True)
    compare(ref, fast, torch.randn(6, 4, dtype=torch.float64, requires_grad=True), seq_len=6)


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_batch_size_zero(classes, batch_first, with_hx):
    ref, fast = pair(classes, 4, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn((0, 3, 4) if batch_first else (3, 0, 4), dtype=torch.float64, requires_grad=True)
    hx = initial_states(ref, 0) if with_hx else None
    o1, h1 = ref(x)
    o2, h2 = fast(x)
    assert o1.shape == o2.shape and [s.shape for s in states(h1)] == [s.shape for s in states(h2)]
    compare(ref, fast, x, hx, seq_len=3)


def _packed_case(enforce_sorted, lengths=(6, 4, 4, 1, 3)):
    if enforce_sorted:
        lengths = sorted(lengths, reverse=True)
    return [torch.randn(n, 4, dtype=torch.float64) for n in lengths]


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_sequence(classes, enforce_sorted, num_layers, bidirectional, with_hx):
    ref, fast = pair(classes, 4, 5, num_layers=num_layers, bidirectional=bidirectional)
    seqs = _packed_case(enforce_sorted)
    hx = states(initial_states(ref, len(seqs), requires_grad=False)) if with_hx else ()
    results = []
    for module in (ref, fast):
        leaves = [s.clone().requires_grad_() for s in seqs]
        h = [s.clone().requires_grad_() for s in hx]
        packed = pack_sequence(leaves, enforce_sorted=enforce_sorted)
        out, h_n = module(packed, (tuple(h) if len(h) > 1 else h[0]) if h else None)
        padded, lengths = pad_packed_sequence(out)
        g = torch.Generator().manual_seed(3)
        loss = (padded * torch.randn(padded.shape, generator=g, dtype=torch.float64)).sum() + state_sum(
            h_n, torch.square
        )
        params = list(module.parameters())
        grads = torch.autograd.grad(loss, leaves + params + h)
        results.append((out, padded, lengths, h_n, grads))
    (o1, p1, l1, h1, g1), (o2, p2, l2, h2, g2) = results
    assert torch.equal(o1.batch_sizes, o2.batch_sizes)
    assert torch.equal(l1, l2)
    for a, b in ((o1.sorted_indices, o2.sorted_indices), (o1.unsorted_indices, o2.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert_close(p2, p1, 1e-10, "output")
    for a, b in zip(states(h2), states(h1), strict=True):
        assert_close(a, b, 1e-10, "h_n")
    for i, (a, b) in enumerate(zip(g2, g1)):
        assert_close(a, b, 1e-9, f"grad {i}")


@pytest.mark.parametrize("classes", CLASSES)
def test_packed_from_padded_batch_first(classes):
    ref, fast = pair(classes, 4, 5, batch_first=True, bidirectional=True)
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([2, 7, 5]), batch_first=True, enforce_sorted=False)
    o1, h1 = ref(packed)
    o2, h2 = fast(packed)
    assert_close(o2.data, o1.data, 1e-12, "output")
    for a, b in zip(states(h2), states(h1), strict=True):
        assert_close(a, b, 1e-12, "h_n")


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_reproduces_torch_masks(classes, packed):
    ref, fast = pair(classes, 4, 6, num_layers=3, dropout=0.4, bidirectional=True)
    ref.train(), fast.train()
    if packed:
        seqs = _packed_case(False)
        x = pack_sequence(seqs, enforce_sorted=False)
        outs = []
        for module in (ref, fast):
            torch.manual_seed(7)
            out, h_n = module(x)
            outs.append((out.data, h_n))
        assert_close(outs[1][0], outs[0][0], 1e-12, "output")
        for a, b in zip(states(outs[1][1]), states(outs[0][1]), strict=True):
            assert_close(a, b, 1e-12, "h_n")
        return
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    # Same RNG state before each call: identical masks, so everything matches.
    results = []
    for module in (ref, fast):
        torch.set_rng_state(state)
        out, h_n = module(x)
        grads = torch.autograd.grad(out.sum() + state_sum(h_n), [x, *module.parameters()])
        results.append((out, h_n, grads))
    assert_close(results[1][0], results[0][0], 1e-12, "output")
    for a, b in zip(states(results[1][1]), states(results[0][1]), strict=True):
        assert_close(a, b, 1e-12, "h_n")
    for a, b in zip(results[1][2], results[0][2]):
        assert_close(a, b, 1e-10, "grad")
    # And the masks are drawn, not fixed: another seed gives another output.
    torch.manual_seed(8)
    assert not torch.equal(fast(x)[0], results[1][0])


@pytest.mark.parametrize("classes", CLASSES)
def test_eval_mode_disables_dropout_and_backward_works(classes):
    ref, fast = pair(classes, 4, 6, num_layers=2, dropout=0.5)
    ref.eval(), fast.eval()
    compare(ref, fast, torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize(
    "num_layers,bidirectional,bias,packed", [(1, False, True, False), (2, True, False, False), (2, True, True, True)]
)
def test_gradcheck_and_gradgradcheck(classes, num_layers, bidirectional, bias, packed):
    """Numerical against analytical gradients of the outputs with respect to the input, h0 and
    every parameter at once (tiny float64 shapes); second derivatives (which run torch's twin)
    too."""
    _, fast = pair(classes, 2, 3, num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    hx = states(initial_states(fast, 3))
    n_states = len(hx)

    def run_on(data, h):
        out, h_n = fast(data, h[0] if n_states == 1 else tuple(h))
        return (out.data if packed else out), *states(h_n)

    if packed:
        sequences = pack_sequence([torch.randn(n, 2, dtype=torch.float64) for n in (2, 4, 1)], enforce_sorted=False)
        x = sequences.data.clone().requires_grad_()

        def run(data, *rest):
            return run_on(PackedSequence(data, *sequences[1:]), rest[:n_states])
    else:
        x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)

        def run(data, *rest):
            return run_on(data, rest[:n_states])

    inputs = (x, *hx, *fast.parameters())
    # The whole Jacobian for one layer; a random projection of it for the stacks (7 s a check).
    assert torch.autograd.gradcheck(run, inputs, fast_mode=num_layers > 1)
    assert torch.autograd.gradgradcheck(run, inputs, fast_mode=True)


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_matches_torch_exactly(classes, dtype):
    ref, fast = pair(classes, 4, 6, dtype=dtype)
    x = torch.randn(5, 3, 4, dtype=dtype)
    try:
        expected = ref(x)
    except RuntimeError as error:  # this torch build has no such CPU kernel: neither may fastrnn
        with pytest.raises(type(error)):
            fast(x)
        return
    actual = fast(x)
    assert torch.equal(actual[0], expected[0])
    assert all(torch.equal(a, b) for a, b in zip(states(actual[1]), states(expected[1]), strict=True))


@pytest.mark.parametrize("classes,cell_kwargs", CELLS)
def test_nan_propagates_like_torch(classes, cell_kwargs):
    ref, fast = pair(classes, 3, 4, **cell_kwargs)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    x[-1, 0, 0] = float("nan")
    results = []
    for module in (ref, fast):
        leaf = x.clone().requires_grad_()
        out, _ = module(leaf)
        out.sum().backward()
        results.append((out, leaf.grad))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1.isnan(), o2.isnan())
    assert torch.equal(g1.isnan(), g2.isnan())
    finite = ~g1.isnan()
    assert_close(g2[finite], g1[finite], 1e-10, "grad x")


@pytest.mark.parametrize("classes", CLASSES)
def test_inference_under_no_grad_and_tolerance_helper_is_strict(classes):
    ref, fast = pair(classes, 3, 4, dtype=torch.float32)
    x = torch.randn(10, 2, 3)
    with torch.no_grad():
        o1, h1 = ref(x)
        o2, h2 = fast(x)
    assert not o2.requires_grad
    assert_close(o2, o1, tolerance(torch.float32, 10))
    for a, b in zip(states(h2), states(h1), strict=True):
        assert_close(a, b, tolerance(torch.float32, 10))
    with pytest.raises(AssertionError):
        assert_close(o2 + 1e-3, o1, tolerance(torch.float32, 10))


@pytest.mark.parametrize("classes", CLASSES)
def test_inference_mode_and_functional_call(classes):
    ref, fast = pair(classes, 4, 6, num_layers=2, batch_first=True)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with torch.inference_mode():
        assert_close(fast(x)[0], ref(x)[0], 1e-12, "inference_mode output")
    params = {name: p.detach() * 1.1 for name, p in ref.named_parameters()}
    expected = torch.func.functional_call(ref, params, (x,))
    actual = torch.func.functional_call(fast, params, (x,))
    assert_close(actual[0], expected[0], 1e-12, "functional_call output")
    for a, b in zip(states(actual[1]), states(expected[1]), strict=True):
        assert_close(a, b, 1e-12, "functional_call h_n")


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_like_torch(classes, dtype):
    ref, fast = pair(classes, 3, 4, num_layers=2, dtype=torch.float32)
    x = torch.randn(5, 2, 3)
    results = []
    for module in (ref, fast):
        try:
            with torch.autocast("cpu", dtype=dtype):
                out, h_n = module(x)
        except RuntimeError as error:  # no such CPU autocast kernel in this torch: neither may fastrnn
            results.append(type(error))
            continue
        results.append((out, h_n))
    if not isinstance(results[0], tuple):
        assert results[1] is results[0]
        return
    (o1, h1), (o2, h2) = results
    assert o1.dtype == o2.dtype and torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(states(h1), states(h2), strict=True))


@pytest.mark.parametrize("classes", CLASSES)
def test_torch_func_grad_runs_like_torch(classes):
    ref, fast = pair(classes, 3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = [torch.func.grad(lambda inp, m=m: m(inp)[0].square().sum())(x) for m in (ref, fast)]
    assert_close(grads[1], grads[0], 1e-12, "torch.func.grad")


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("proj_size", [1, 3])
def test_lstm_projection_with_states_and_packing(num_layers, bidirectional, packed, proj_size):
    """proj_size: h_t = W_hr (o_t * tanh(c_t)) is proj_size wide, c_t hidden_size wide; given
    (h0, c0) and packed input, every gradient (weight_hr's included) matches torch's."""
    ref, fast = pair(LSTM, 4, 5, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj_size)
    assert any(name.startswith("weight_hr") for name, _ in fast.named_parameters())
    hx = initial_states(ref, 5)
    if packed:
        seqs = _packed_case(False)
        x = pack_sequence(seqs, enforce_sorted=False)
        results = []
        for module in (ref, fast):
            h = tuple(s.detach().clone().requires_grad_() for s in hx)
            out, h_n = module(x, h)
            loss = out.data.square().sum() + state_sum(h_n, torch.sin)
            results.append((out.data, h_n, torch.autograd.grad(loss, [*h, *module.parameters()])))
        (o1, h1, g1), (o2, h2, g2) = results
        assert_close(o2, o1, 1e-10, "output")
        for a, b in zip((*h2, *g2), (*h1, *g1), strict=True):
            assert_close(a, b, 1e-9)
    else:
        compare(ref, fast, torch.randn(6, 5, 4, dtype=torch.float64, requires_grad=True), hx)
