"""convert(), state_dict both ways, pickling, deepcopy, and the seed model training like torch."""

import copy
import io
import pickle

import torch
from torch import nn

import fastrnn
from helpers import assert_close, compare, example, twins

Seed = example("seed_pytorch").Seed


def test_convert_swaps_rnns_in_place_and_keeps_everything():
    model = nn.Sequential(nn.RNN(3, 4, num_layers=2), nn.LSTM(4, 4), nn.ModuleList([nn.RNN(4, 2, bias=False)]))
    model[0].weight_hh_l1.requires_grad_(False)
    model.eval()
    params = {name: p for name, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    assert fastrnn.convert(model) is model
    assert type(model[0]) is fastrnn.RNN and type(model[2][0]) is fastrnn.RNN
    assert type(model[1]) is nn.LSTM
    assert all(p is params[name] for name, p in model.named_parameters())
    assert not model[0].weight_hh_l1.requires_grad and not model[0].training
    assert isinstance(model[0], nn.RNN)
    assert repr(model[0]) == "RNN(3, 4, num_layers=2)"
    fastrnn.convert(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_convert_a_bare_rnn_matches_torch():
    torch.manual_seed(0)
    ref = nn.RNN(3, 5, bidirectional=True).double()
    fast = fastrnn.convert(copy.deepcopy(ref))
    assert type(fast) is fastrnn.RNN
    compare(ref, fast, torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True))


def test_state_dict_round_trips_both_ways():
    ref, fast = twins(3, 5, num_layers=2, bidirectional=True)
    buffer = io.BytesIO()
    torch.save(fast.state_dict(), buffer)
    buffer.seek(0)
    fresh_torch = nn.RNN(3, 5, num_layers=2, bidirectional=True).double()
    fresh_torch.load_state_dict(torch.load(buffer))
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    fresh_fast = fastrnn.RNN(3, 5, num_layers=2, bidirectional=True).double()
    fresh_fast.load_state_dict(torch.load(buffer))
    assert list(fresh_fast.state_dict()) == list(ref.state_dict())
    compare(fresh_torch, fresh_fast, torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True))


def test_pickle_and_deepcopy_keep_the_module_working():
    ref, fast = twins(3, 5, nonlinearity="relu")
    fast.backend = "numba"
    for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast), torch.load(_saved(fast), weights_only=False)):
        assert type(clone) is fastrnn.RNN and clone.backend == "numba"
        compare(ref, clone, torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True))


def _saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_flatten_parameters_and_all_weights_are_torchs():
    ref, fast = twins(3, 5, num_layers=2)
    fast.flatten_parameters()
    assert [[w.shape for w in layer] for layer in fast.all_weights] == [
        [w.shape for w in layer] for layer in ref.all_weights
    ]


def test_seed_model_trains_exactly_like_torch():
    torch.manual_seed(0)
    reference = Seed().double()
    converted = fastrnn.convert(copy.deepcopy(reference))
    data = torch.randn(64, 10, 20, dtype=torch.float64)
    labels = torch.randint(0, 5, (64,))
    losses = []
    for model in (reference, converted):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        history = []
        for step in range(5):
            batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
            loss = nn.functional.nll_loss(torch.log(model(data[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        losses.append(history)
    assert max(abs(a - b) for a, b in zip(*losses)) < 1e-10
    for (name, p), q in zip(converted.named_parameters(), reference.parameters()):
        assert_close(p, q, 1e-10, name)


def test_distributed_data_parallel(tmp_path):
    """A converted model inside DistributedDataParallel (one gloo rank, in this process) trains like
    the plain model. Two spawned ranks also passed, but once in ~8 runs rank 0 did not exit after
    writing its results (seen in a fresh clone); kept out of CI until that is understood."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = Seed().double()
    data = torch.randn(8, 10, 20, dtype=torch.float64)
    expected = copy.deepcopy(model)
    expected(data).sum().backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(fastrnn.convert(model))
        assert type(ddp.module.rnn1) is fastrnn.RNN
        ddp(data).sum().backward()
    finally:
        dist.destroy_process_group()
    for (name, p), q in zip(ddp.module.named_parameters(), expected.parameters()):
        assert_close(p.grad, q.grad, 1e-10, name)
