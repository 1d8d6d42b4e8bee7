"""The custom ops: opcheck, gradcheck, torch.compile, saved-for-backward bytes, double backward."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import backends, functional, ops
from fastrnn.cells import CELLS
from helpers import assert_close, example, state_sum, states, twins

pytestmark = pytest.mark.usefixtures("layer_kernels")

F64 = torch.float64


def _layer_inputs(T=4, B=3, I=2, H=3, D=2, dtype=F64, bias=True, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: (torch.randn(*shape, generator=g, dtype=dtype) * 0.5).requires_grad_(requires_grad)  # noqa: E731
    return make(T, B, I), make(D, B, H), make(D, H, I), make(D, H, H), make(D, H) if bias else None


def _stack_inputs(L=2, D=2, T=4, B=3, I=2, H=3, biases=2, dropout=True, skip_padding=True, mode="RNN_TANH"):
    """Arguments of ops.rnn (less mode and backend) for an L-layer stack of cell ``mode`` with fixed
    dropout masks; hx is a tensor, or LSTM's (h0, c0)."""
    G = CELLS[mode].gates
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: (torch.randn(*shape, generator=g, dtype=F64) * 0.5).requires_grad_()  # noqa: E731
    weights = []
    for layer in range(L):
        for _ in range(D):
            weights += [make(G * H, I if layer == 0 else D * H), make(G * H, H)] + [make(G * H) for _ in range(biases)]
    masks = [(torch.rand(T, B, D * H, generator=g) > 0.3).to(F64) / 0.7 for _ in range(L - 1)] if dropout else []
    lengths = torch.tensor([4, 1, 3])
    # Skipping padding, the op takes and returns the valid rows alone.
    valid_rows = functional.valid_rows_of(lengths, T) if skip_padding else None
    x = make(T, B, I) if valid_rows is None else make(len(valid_rows), I)
    hx = tuple(make(L * D, B, H) for _ in range(CELLS[mode].states))
    return x, (hx if len(hx) > 1 else hx[0]), weights, masks, lengths, valid_rows, T, L


def _fwd_op(x, hx, *rest):
    """fastrnn::rnn_fwd called as ops.rnn is: hx a tensor or LSTM's (h0, c0), h_n in its form."""
    out, finals, inner = torch.ops.fastrnn.rnn_fwd(x, list(states(hx)), *rest)
    return out, (tuple(finals) if isinstance(hx, tuple) else finals[0]), inner


_OPCHECK_STACKS = [(1, 1, 2, False, False), (1, 2, 0, False, True), (2, 2, 2, True, True), (3, 1, 1, True, False)]


# One summed bias (biases=1) is Elman's alone.
@pytest.mark.parametrize(
    "mode,L,D,biases,dropout,skip_padding",
    [(m, *stack) for m in CELLS for stack in _OPCHECK_STACKS if stack[2] != 1 or CELLS[m].folds_recurrent_bias],
)
def test_opcheck(mode, L, D, biases, dropout, skip_padding):
    args = _stack_inputs(L=L, D=D, biases=biases, dropout=dropout, skip_padding=skip_padding, mode=mode)
    x, hx, *rest = args
    torch.library.opcheck(torch.ops.fastrnn.rnn_fwd, (x, list(states(hx)), *rest, mode, "numba"))


def _flat_op(x, hx, weights, masks, lengths, valid_rows, T, L, mode):
    """ops.rnn as a function of flat tensors (x, *states, *weights) with flat results, for gradcheck."""
    n_states = len(states(hx))

    def run(x, *tensors):
        hx = tensors[:n_states] if n_states > 1 else tensors[0]
        out, h_n = ops.rnn(x, hx, list(tensors[n_states:]), masks, lengths, valid_rows, T, L, mode, "numba")
        return out, *states(h_n)

    return run, (x, *states(hx), *weights)


@pytest.mark.parametrize("mode", ["RNN_TANH", "GRU", "LSTM"])
@pytest.mark.parametrize("L,D", [(2, 2), (3, 1)])
@pytest.mark.parametrize("skip_padding", [False, True])
def test_gradcheck_stack_with_dropout_masks(L, D, skip_padding, mode):
    args = _stack_inputs(L=L, D=D, skip_padding=skip_padding, mode=mode)
    assert torch.autograd.gradcheck(*_flat_op(*args, mode))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("lengths", [None, [4, 2, 1]])
@pytest.mark.parametrize("D", [1, 2])
def test_gradcheck(nonlinearity, lengths, D):
    x, h0, w_ih, w_hh, b = _layer_inputs(D=D)
    if nonlinearity == "relu":  # keep pre-activations away from the kink at 0
        x = (x.detach() + 2.0).requires_grad_()
    lengths = None if lengths is None else torch.tensor(lengths)
    fn = lambda *args: functional.elman(*args, lengths=lengths, nonlinearity=nonlinearity, backend="numba")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, h0, w_ih, w_hh, b))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("D", [1, 2])
def test_functional_matches_reference_loop(nonlinearity, D):
    x, h0, w_ih, w_hh, b = _layer_inputs(T=9, B=4, D=D)
    lengths = torch.tensor([9, 0, 4, 1])
    results = []
    for backend in ("numba", "torch"):
        out, h_n = functional.elman(x, h0, w_ih, w_hh, b, lengths=lengths, nonlinearity=nonlinearity, backend=backend)
        grads = torch.autograd.grad((out**2).sum() + (h_n * 3).sum(), (x, h0, w_ih, w_hh, b))
        results.append((out, h_n, grads))
    (o1, h1, g1), (o2, h2, g2) = results
    assert_close(o1, o2, 1e-12, "output")
    assert bool((o1[4:, 2] == 0).all()) and bool((o1[:, 1] == 0).all()), "padded steps must be zero"
    assert_close(h1, h2, 1e-12, "h_n")
    assert_close(h1[:, 1], h0[:, 1].detach(), 0, "zero-length sequence keeps h0")
    for name, a, e in zip(("x", "h0", "w_ih", "w_hh", "bias"), g1, g2):
        assert_close(a, e, 1e-11, name)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = example("seed_pytorch").Seed()
    model = fastrnn.convert(example("seed_pytorch").Seed())
    model.load_state_dict(ref.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    x = torch.randn(4, 10, 20)
    expected = ref(x)
    actual = compiled(x)
    assert_close(actual, expected, 1e-5, "compiled output")
    actual.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, 1e-4, name)


def test_torch_compile_traces_the_fused_op_not_torchs_rnn():
    torch._dynamo.reset()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = fastrnn.RNN(5, 6, num_layers=2, bidirectional=True)
    compiled = torch.compile(model, fullgraph=True, backend=record)
    out, h_n = compiled(torch.randn(7, 3, 5))
    (out.sum() + h_n.sum()).backward()
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]
    assert any("fastrnn.rnn_fwd" in t for t in targets), targets
    assert not any("rnn_tanh" in t for t in targets), targets


def test_empty_sequence_gradients():
    x, h0, w_ih, w_hh, b = _layer_inputs(T=0)
    out, h_n = functional.elman(x, h0, w_ih, w_hh, b, backend="numba")
    grads = torch.autograd.grad(out.sum() + (h_n * 2).sum(), (x, h0, w_ih, w_hh, b))
    assert out.shape == (0, 3, 6) and torch.equal(h_n, h0)
    assert torch.equal(grads[1], torch.full_like(h0, 2.0))
    assert all(bool((g == 0).all()) for g in grads[2:])


def _saved_bytes(module, x, beyond_outputs=False):
    """Bytes of the distinct storages autograd keeps for backward (views of one storage count once);
    with ``beyond_outputs``, only those that are not the input's, a parameter's or a returned one's."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output, h_n = module(x)
    held = (getattr(x, "data", x), *module.parameters(), getattr(output, "data", output), *states(h_n))
    exclude = {t.untyped_storage().data_ptr() for t in held} if beyond_outputs else ()
    return sum(n for ptr, n in seen.items() if ptr not in exclude)


# torch's CPU path already keeps just x and the hidden states for one layer; from two layers on it
# also keeps each layer's stacked output, which fastrnn shares with the next layer's input. Packed,
# fastrnn keeps the output's valid rows (as torch does) plus their int64 row index.
@pytest.mark.parametrize(
    "num_layers,bidirectional,packed,bound",
    [
        (1, False, False, 1.01),
        (2, True, False, 0.8),
        (4, False, False, 0.7),
        (1, False, True, 1.05),
        (2, True, True, 1.0),
    ],
)
def test_saves_less_than_torch_for_backward(num_layers, bidirectional, packed, bound):
    ref, fast = twins(32, 32, num_layers=num_layers, bidirectional=bidirectional, dtype=torch.float32)
    x = torch.randn(50, 8, 32, requires_grad=True)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([50, 45, 40, 30, 20, 10, 8, 5]), enforce_sorted=False)
    ours, theirs = _saved_bytes(fast, x), _saved_bytes(ref, x)
    assert 0 < ours <= theirs * bound, f"fastrnn saves {ours} B, torch {theirs} B"


# fastrnn saves the output it returns, torch its own per-step states: beyond what the call returns,
# one layer keeps only h0 and lengths (packed: also the int64 row index), a stack also its inner
# layers' outputs.
@pytest.mark.parametrize(
    "num_layers,bidirectional,packed,bound",
    [
        (1, False, False, 0.05),
        (1, True, False, 0.05),
        (2, False, False, 0.5),
        (1, False, True, 0.15),
    ],
)
def test_keeps_little_beyond_its_outputs_for_backward(num_layers, bidirectional, packed, bound):
    ref, fast = twins(32, 32, num_layers=num_layers, bidirectional=bidirectional, dtype=torch.float32)
    x = torch.randn(50, 8, 32, requires_grad=True)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([50, 45, 40, 30, 20, 10, 8, 5]), enforce_sorted=False)
    ours, theirs = _saved_bytes(fast, x, beyond_outputs=True), _saved_bytes(ref, x, beyond_outputs=True)
    assert 0 < ours <= theirs * bound, f"fastrnn keeps {ours} B beyond its outputs, torch {theirs} B"


def test_double_backward_of_unsorted_lengths_is_torchs():
    inputs, lengths = _layer_inputs(T=5), torch.tensor([2, 5, 3])
    assert torch.autograd.gradgradcheck(lambda *a: functional.elman(*a, lengths=lengths, backend="numba"), inputs)


def test_custom_op_backward_has_no_double_backward():
    """Like torch.compile itself (AOTAutograd has no double backward): it fails loudly."""
    x, hx, weights, masks, lengths, valid_rows, T, L = _stack_inputs()
    out, _, _ = _fwd_op(x, hx, weights, masks, lengths, valid_rows, T, L, "RNN_TANH", "numba")
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="rnn_bwd"):
        grad_x.sum().backward()


@pytest.mark.parametrize("mode", ["RNN_TANH", "GRU", "LSTM"])
def test_eager_function_and_custom_op_agree_exactly(mode):
    x, hx, weights, masks, lengths, valid_rows, T, L = _stack_inputs(mode=mode)
    results = []
    for fn in (ops.rnn, _fwd_op):
        out, h_n, *_ = fn(x, hx, weights, masks, lengths, valid_rows, T, L, mode, "numba")
        grads = torch.autograd.grad((out**2).sum() + state_sum(h_n), (x, *states(hx), *weights))
        results.append([out, *states(h_n), *grads])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("mode", ["RNN_TANH", "GRU", "LSTM"])
def test_gradients_skip_an_input_that_needs_none(mode):
    x, hx, weights, masks, lengths, valid_rows, T, L = _stack_inputs(mode=mode)
    x.requires_grad_(False)
    out, h_n = ops.rnn(x, hx, weights, masks, lengths, valid_rows, T, L, mode, "numba")
    grads = torch.autograd.grad(out.sum() + state_sum(h_n), (*states(hx), *weights))
    out, h_n, _ = _fwd_op(x, hx, weights, masks, lengths, valid_rows, T, L, mode, "numba")
    expected = torch.autograd.grad(out.sum() + state_sum(h_n), (*states(hx), *weights))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected, strict=True))


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_respect_torch_thread_count(threads, monkeypatch):
    """One torch thread: no parallel region at all (the serial kernels); more: that many Numba
    threads. Either way torch's own setting stays as the user left it."""
    import numba

    kernels = backends.kernels("numba", "RNN_TANH")
    parallel_calls = []
    original = kernels._elman_fwd_kernel
    monkeypatch.setattr(kernels, "_elman_fwd_kernel", lambda *a: parallel_calls.append(1) or original(*a))
    ref, fast = twins(4, 8, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        fast(torch.randn(800, 256, 4))  # 19.7M multiply-adds: well inside the split path
        assert torch.get_num_threads() == threads
        assert bool(parallel_calls) == (threads > 1)
        if threads > 1:
            assert numba.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_valid_rows_need_x_as_rows():
    x, hx, weights, masks, lengths, valid_rows, T, L = _stack_inputs()
    padded = x.new_zeros(T, 3, x.shape[1])
    with pytest.raises(ValueError, match="valid_rows"):
        ops.rnn(padded, hx, weights, masks, lengths, valid_rows, T, L, "RNN_TANH", "numba")


@pytest.mark.parametrize("mode", ["RNN_TANH", "GRU", "LSTM"])
@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("biases", [0, 2])
def test_single_fused_layer_node_matches_the_stack_op_exactly(D, biases, layer_kernels, mode):
    x, hx, weights, masks, lengths, valid_rows, T, L = _stack_inputs(
        L=1, D=D, biases=biases, dropout=False, skip_padding=False, mode=mode
    )
    results = []
    for fn in (ops.rnn, _fwd_op):
        out, h_n, *_ = fn(x, hx, weights, masks, lengths, valid_rows, T, L, mode, "numba")
        if fn is ops.rnn:  # a layer small enough to run whole takes the lean node
            node = "_EagerFusedLayerBackward" if layer_kernels == "whole-layer" else "_EagerRNNBackward"
            assert type(out.grad_fn).__name__ == node
        grads = torch.autograd.grad((out**2).sum() + state_sum(h_n), (x, *states(hx), *weights))
        results.append([out, *states(h_n), *grads])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize(
    "cls,kwargs", [(torch.nn.GRU, {}), (torch.nn.LSTM, {"proj_size": 2})], ids=["GRU", "LSTM-proj"]
)
def test_gated_cells_save_nothing_for_inference_and_compute_the_same(monkeypatch, cls, kwargs):
    """Under no_grad the gated cells' kernels store no gates (GRU's 4, LSTM's 5 values per output
    value) and give the very same numbers as a forward that keeps them for backward."""
    kernels = backends.kernels("numba", cls.__name__)  # the mode of nn.GRU and nn.LSTM
    kept = []
    for name in ("forward", "layer_forward"):
        original = getattr(kernels, name)

        def recording(*args, original=original, **kw):
            result = original(*args, **kw)
            kept.append(len(result[2]))
            return result

        monkeypatch.setattr(kernels, name, recording)
    _, fast = twins(3, 5, num_layers=2, bidirectional=True, cls=cls, **kwargs)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        inference = fast(x)
    assert kept == [0, 0]
    training = fast(x.requires_grad_())
    assert kept[2:] == [1, 1]
    assert torch.equal(inference[0], training[0])
    assert all(torch.equal(a, b) for a, b in zip(states(inference[1]), states(training[1]), strict=True))


@pytest.mark.parametrize("cls", [torch.nn.GRU, torch.nn.LSTM], ids=["GRU", "LSTM"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("proj_size", [0, 8])
def test_gated_cells_save_no_more_than_torch_for_backward(cls, packed, proj_size):
    """GRU keeps [r, z, n, W_hn h + b_hn] per step, LSTM [i, f, g, o, c_t]: together with x and
    the output, no more bytes than torch's own CPU cells keep."""
    if proj_size and cls is not torch.nn.LSTM:
        pytest.skip("proj_size is LSTM's")
    kwargs = {"proj_size": proj_size} if proj_size else {}
    ref, fast = twins(32, 32, num_layers=2, bidirectional=True, dtype=torch.float32, cls=cls, **kwargs)
    x = torch.randn(50, 8, 32, requires_grad=True)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([50, 45, 40, 30, 20, 10, 8, 5]), enforce_sorted=False)
    ours, theirs = _saved_bytes(fast, x), _saved_bytes(ref, x)
    assert 0 < ours <= theirs, f"fastrnn saves {ours} B, torch {theirs} B"
