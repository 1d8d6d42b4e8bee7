"""Bad input: fastrnn raises what torch.nn.RNN / nn.GRU raise (same type), and never crashes."""

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


CLASSES = pytest.mark.parametrize("cls", [torch.nn.RNN, torch.nn.GRU], ids=["RNN", "GRU"])


@pytest.mark.parametrize("case", BAD_CALLS)
@CLASSES
def test_same_exception_type_as_torch(case, cls):
    ref, fast = twins(4, 6, num_layers=2, cls=cls)
    expected = _call(ref, BAD_CALLS[case])
    actual = _call(fast, BAD_CALLS[case])
    assert actual is expected, f"{case}: torch raised {expected}, fastrnn raised {actual}"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(nonlinearity="gelu"),
        dict(dropout=1.5),
        dict(dropout=-0.1),
        dict(proj_size=2),
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
    assert errors[0] is errors[1] and errors[0] is not None


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        fastrnn.RNN(4, 6, backend="cudnn")


@CLASSES
def test_packed_hx_wrong_batch(cls):
    ref, fast = twins(4, 6, cls=cls)
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 4, dtype=F64), torch.randn(2, 4, dtype=F64)])
    hx = lambda: (packed, torch.randn(1, 3, 6, dtype=F64))  # noqa: E731
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
