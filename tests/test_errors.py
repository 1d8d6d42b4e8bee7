"""Bad input: fastrnn raises what torch.nn.RNN / GRU / LSTM raise (same type), and never crashes."""

import pytest
import torch

import fastrnn
from helpers import twins

F64 = torch.float64


def _call(module, make_args):
    try:
        module(*make_args())
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)
    return None


BAD_CALLS = {
    "1-D input": lambda: (torch.randn(4, dtype=F64),),
    "4-D input": lambda: (torch.randn(2, 3, 4, 5, dtype=F64),),
    "wrong input size": lambda: (torch.randn(5, 3, 7, dtype=F64),),
    "hx wrong batch": lambda: (torch.randn(5, 3, 4, dtype=F64), torch.randn(2, 2, 6, dtype=F64)),
    "hx wrong layers": lambda: (torch.randn(5, 3, 4, dtype=F64), torch.randn(1, 3, 6, dtype=F64)),
    "hx wrong hidden": lambda: (torch.randn(5, 3, 4, dtype=F64), torch.randn(2, 3, 5, dtype=F64)),
    "2-D hx for 3-D input": lambda: (torch.randn(5, 3, 4, dtype=F64), torch.randn(2, 6, dtype=F64)),
    "3-D hx for 2-D input": lambda: (torch.randn(5, 4, dtype=F64), torch.randn(2, 1, 6, dtype=F64)),
    "float32 input, float64 weights": lambda: (torch.randn(5, 3, 4),),
    "integer input": lambda: (torch.ones(5, 3, 4, dtype=torch.int64),),
    "hx of another dtype": lambda: (torch.randn(5, 3, 4, dtype=F64), torch.randn(2, 3, 6)),
    "not a tensor hx": lambda: (torch.randn(5, 3, 4, dtype=F64), "hx"),
    "non-contiguous input (valid)": lambda: (
        torch.randn(4, 3, 5, dtype=F64)
        .transpose(0, 2)
        .transpose(1, 2)[:, :, :4]
        .contiguous()
        .transpose(0, 1)
        .transpose(0, 1),
    ),
    "non-contiguous hx (valid)": lambda: (
        torch.randn(5, 3, 4, dtype=F64),
        torch.randn(6, 3, 2, dtype=F64).permute(2, 1, 0),
    ),
    "empty sequence": lambda: (torch.randn(0, 3, 4, dtype=F64),),
}


CLASSES = pytest.mark.parametrize("cls", [torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM], ids=["RNN", "GRU", "LSTM"])


def _as_lstm_call(make_args):
    """A BAD_CALLS case for an LSTM: a tensor hx becomes (hx, a copy) as the cell state, so both
    states are bad the same way."""

    def make():
        args = make_args()
        if len(args) == 2 and isinstance(args[1], torch.Tensor):
            return args[0], (args[1], args[1].clone())
        return args

    return make


_X, _C = lambda: torch.randn(5, 3, 4, dtype=F64), lambda: torch.randn(2, 3, 6, dtype=F64)  # noqa: E731
# Bad (h0, c0) pairs of an LSTM(4, 6, num_layers=2) (proj_size=3 for the last two).
LSTM_BAD_CALLS = {
    "c0 wrong hidden": lambda: (_X(), (_C(), torch.randn(2, 3, 5, dtype=F64))),
    "c0 wrong batch": lambda: (_X(), (_C(), torch.randn(2, 2, 6, dtype=F64))),
    "2-D c0 for 3-D input": lambda: (_X(), (_C(), torch.randn(2, 6, dtype=F64))),
    "a tensor for (h0, c0)": lambda: (_X(), _C()),
    "one state only": lambda: (_X(), (_C(),)),
    "proj: h0 of hidden size": lambda: (_X(), (_C(), _C())),
    "proj: c0 of proj size": lambda: (_X(), (torch.randn(2, 3, 3, dtype=F64), torch.randn(2, 3, 3, dtype=F64))),
}


@pytest.mark.parametrize("case", BAD_CALLS)
@CLASSES
def test_same_exception_type_as_torch(case, cls):
    ref, fast = twins(4, 6, num_layers=2, cls=cls)
    make_args = _as_lstm_call(BAD_CALLS[case]) if cls is torch.nn.LSTM else BAD_CALLS[case]
    expected = _call(ref, make_args)
    actual = _call(fast, make_args)
    assert actual is expected, f"{case}: torch raised {expected}, fastrnn raised {actual}"


@pytest.mark.parametrize("case", LSTM_BAD_CALLS)
def test_bad_lstm_states_raise_what_torch_raises(case):
    proj_size = 3 if case.startswith("proj") else 0
    ref, fast = twins(4, 6, num_layers=2, proj_size=proj_size, cls=torch.nn.LSTM)
    expected = _call(ref, LSTM_BAD_CALLS[case])
    actual = _call(fast, LSTM_BAD_CALLS[case])
    assert expected is not None and actual is expected, f"{case}: torch raised {expected}, fastrnn raised {actual}"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(nonlinearity="gelu"),
        dict(dropout=1.5),
        dict(dropout=-0.1),
        dict(proj_size=2),
        dict(proj_size=6),
        dict(proj_size=-1),
        dict(num_layers=0),
        dict(hidden_size=0),
        dict(num_layers=1.5),
    ],
)
@CLASSES
def test_constructor_errors_match_torch(kwargs, cls):
    args = dict(input_size=4, hidden_size=6) | kwargs
    errors = []
    for module_class in (cls, getattr(fastrnn, cls.__name__)):
        try:
            module_class(**args)
            errors.append(None)
        except Exception as error:  # noqa: BLE001
            errors.append(type(error))
    valid = cls is torch.nn.LSTM and kwargs == dict(proj_size=2)  # proj_size < hidden_size: LSTM's option
    assert errors[0] is errors[1] and (errors[0] is None) == valid


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        fastrnn.RNN(4, 6, backend="cudnn")


@CLASSES
def test_packed_hx_wrong_batch(cls):
    ref, fast = twins(4, 6, cls=cls)
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 4, dtype=F64), torch.randn(2, 4, dtype=F64)])
    hx = lambda: (packed, torch.randn(1, 3, 6, dtype=F64))  # noqa: E731
    hx = _as_lstm_call(hx) if cls is torch.nn.LSTM else hx
    assert _call(fast, hx) is _call(ref, hx) is RuntimeError


def test_functional_rejects_bad_lengths_and_shapes():
    x = torch.randn(5, 2, 3)
    w_ih, w_hh = torch.randn(1, 4, 3), torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="lengths"):
        fastrnn.functional.elman(x, None, w_ih, w_hh, lengths=torch.tensor([6, 1]))
    with pytest.raises(RuntimeError, match="w_ih"):
        fastrnn.functional.elman(x, None, torch.randn(1, 4, 2), w_hh)
    with pytest.raises(ValueError, match="nonlinearity"):
        fastrnn.functional.elman(x, None, w_ih, w_hh, nonlinearity="sigmoid")
    with pytest.raises(RuntimeError, match="must match"):
        fastrnn.functional.elman(x, None, w_ih.double(), w_hh)


def test_functional_gru_rejects_bad_shapes_and_lone_biases():
    x, w_ih, w_hh, b = torch.randn(5, 2, 3), torch.randn(1, 12, 3), torch.randn(1, 12, 4), torch.zeros(1, 12)
    with pytest.raises(RuntimeError, match="w_ih"):
        fastrnn.functional.gru(x, None, w_ih[:, :4], w_hh)
    with pytest.raises(RuntimeError, match="biases"):
        fastrnn.functional.gru(x, None, w_ih, w_hh, b[:, :4], b[:, :4])
    with pytest.raises(ValueError, match="both biases"):
        fastrnn.functional.gru(x, None, w_ih, w_hh, b)
    out, h_n = fastrnn.functional.gru(x, None, w_ih, w_hh, b, b, lengths=torch.tensor([5, 2]))
    assert out.shape == (5, 2, 4) and bool((out[2:, 1] == 0).all())


def test_functional_lstm_rejects_bad_shapes_and_lone_biases():
    x, w_ih, w_hh, b = torch.randn(5, 2, 3), torch.randn(1, 16, 3), torch.randn(1, 16, 4), torch.zeros(1, 16)
    with pytest.raises(RuntimeError, match="w_ih"):
        fastrnn.functional.lstm(x, None, w_ih[:, :4], w_hh)
    with pytest.raises(ValueError, match="both biases"):
        fastrnn.functional.lstm(x, None, w_ih, w_hh, b)
    with pytest.raises(RuntimeError, match="w_hr"):
        fastrnn.functional.lstm(x, None, w_ih, w_hh[..., :2], w_hr=torch.randn(1, 2, 5))
    with pytest.raises(RuntimeError, match="hidden size"):
        fastrnn.functional.lstm(x, (torch.zeros(1, 2, 4), torch.zeros(1, 2, 3)), w_ih, w_hh)
    out, (h_n, c_n) = fastrnn.functional.lstm(x, None, w_ih, w_hh[..., :2], b, b, torch.randn(1, 2, 4))
    assert out.shape == (5, 2, 2) and h_n.shape == (1, 2, 2) and c_n.shape == (1, 2, 4)


def test_lstm_states_of_another_dtype_give_torchs_results():
    """torch.nn.LSTM accepts a float32 c0 for a float64 module (and converts it): so does fastrnn, by
    running torch's call."""
    ref, fast = twins(4, 6, num_layers=2, cls=torch.nn.LSTM)
    x, hx = _X(), (_C(), torch.randn(2, 3, 6))
    expected, actual = ref(x, hx), fast(x, hx)
    assert torch.equal(actual[0], expected[0])
    assert all(torch.equal(a, b) for a, b in zip(actual[1], expected[1], strict=True))
