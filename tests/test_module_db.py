"""PyTorch's own module tests for nn.RNN, nn.GRU and nn.LSTM, run on fastrnn.RNN, fastrnn.GRU and
fastrnn.LSTM.

The samples are the ones PyTorch tests nn.RNN, nn.GRU and nn.LSTM with: the ``ModuleInfo`` entries
for ``torch.nn.RNN``, ``torch.nn.GRU`` and ``torch.nn.LSTM`` in
``torch.testing._internal.common_modules.module_db`` (their ``module_inputs_func`` and
``module_error_inputs_func``; LSTM's samples include ``proj_size=2`` and pass hx as
``(h0, c0)``). The checks are the ones PyTorch's ``test/test_modules.py`` applies to those entries
on CPU (forward against the sample's reference, the ``.float()``/``.double()`` methods, factory
kwargs, construction under ``torch.device("meta")``, ``to_empty``, ``to``, repr, pickling,
non-contiguous tensors, memory format, gradcheck and gradgradcheck with batched grads, train/eval,
error inputs), rewritten here, and most of them also compare the fastrnn module with a stock torch
module holding the same state_dict. Every test runs once per entry (its id starts with ``RNN``,
``GRU`` or ``LSTM``). Inputs and outputs are handled as trees (LSTM's hx and h_n are ``(h, c)`` tuples): gradients,
upstream gradients and non-contiguous copies go leaf by leaf, as test_modules.py does. module_db's
nn.LSTM entry skips nothing on CPU (its only skip is MPS; its decorators are RNN/GRU's CUDA
xfails), and neither does this file.

Every test runs the fastrnn module with ``backend="auto"`` (the fused kernels). To check the checks, run
them also on ``backend="torch"`` (PyTorch's own implementation behind the same class), where every
one must pass: ``FASTRNN_MODULE_DB_BACKENDS=auto,torch pytest tests/test_module_db.py``. A check
that fails on ``torch`` is a wrong check; one that fails on ``auto`` only is a fastrnn bug.

Needs ``expecttest`` (imported by torch.testing._internal.common_utils; in the dev extra): without
it this file fails to import, rather than skipping.
"""

import io
import itertools
import os
import re

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

import fastrnn
from helpers import assert_close, tolerance


def _global_state():
    """What importing PyTorch's test utilities could change for the rest of the suite."""
    return {
        "default dtype": torch.get_default_dtype(),
        "default device": str(torch.get_default_device()),
        "num threads": torch.get_num_threads(),
        "grad mode": torch.is_grad_enabled(),
        "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch.backends flags frozen": torch.backends.flags_frozen(),
        "ScriptFunction.__call__": torch._C.ScriptFunction.__call__,
        "ScriptMethod.__call__": torch._C.ScriptMethod.__call__,
        "swap params on conversion": torch.__future__.get_swap_module_params_on_conversion(),
        "overwrite params on conversion": torch.__future__.get_overwrite_module_params_on_conversion(),
        "cpu rng state": torch.get_rng_state(),
    }


def _import_common_modules():
    """Import common_modules and undo what common_utils does to global state on import.

    On import, common_utils (which common_modules pulls in) reads no argv (only its run_tests()
    parses sys.argv) and leaves the default dtype and thread count alone, but it
    - calls torch.backends.disable_global_flags(): any later plain assignment such as
      ``torch.backends.cudnn.enabled = False`` raises, only the ``flags()`` context managers work;
    - wraps torch._C.ScriptFunction/ScriptMethod.__call__ for its JIT profiling tests.
    Both are put back. (Importing it also imports torch._inductor, which sets
    TORCHINDUCTOR_CACHE_DIR to its default; that is what any torch.compile user gets too.)
    """
    before = _global_state()
    try:
        from torch.testing._internal import common_modules
    finally:
        if not before["torch.backends flags frozen"]:
            # The flag lives in the globals of torch/backends/__init__.py (torch.backends itself is
            # a module subclass that copied them).
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
        torch._C.ScriptFunction.__call__ = before["ScriptFunction.__call__"]
        torch._C.ScriptMethod.__call__ = before["ScriptMethod.__call__"]
    after = _global_state()
    changed = sorted(
        name
        for name in before
        if not (torch.equal(before[name], after[name]) if name == "cpu rng state" else before[name] == after[name])
    )
    return common_modules, changed


common_modules, _STATE_CHANGED_BY_IMPORT = _import_common_modules()
ModuleErrorEnum = common_modules.ModuleErrorEnum
# Each entry tested: its name -> (its ModuleInfo, the stock class, the fastrnn class).
ENTRIES = {
    cls.__name__: (next(info for info in common_modules.module_db if info.module_cls is cls), cls, fast_cls)
    for cls, fast_cls in ((torch.nn.RNN, fastrnn.RNN), (torch.nn.GRU, fastrnn.GRU), (torch.nn.LSTM, fastrnn.LSTM))
}

BACKENDS = tuple(os.environ.get("FASTRNN_MODULE_DB_BACKENDS", "auto").split(","))
assert BACKENDS and set(BACKENDS) <= {"auto", "numba", "triton", "torch"}, BACKENDS
DTYPES = (torch.float64, torch.float32)
DTYPE_IDS = ("float64", "float32")


def _info(entry):
    return ENTRIES[entry][0]


def _samples(entry, dtype=torch.float64, requires_grad=False, training=True, device="cpu", seed=0):
    """module_db's forward samples for the entry (``"RNN"``, ``"GRU"``, ``"LSTM"``), with inputs
    drawn from a fixed seed; the global RNG is left as it was."""
    info = _info(entry)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return list(
            info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=requires_grad, training=training)
        )


def _error_samples(entry, dtype):
    info = _info(entry)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return list(info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False, training=True))


def _sample_id(entry, sample):
    k = sample.constructor_input.kwargs
    return "-".join(
        [
            entry,
            *([k["nonlinearity"]] if "nonlinearity" in k else []),
            "bias" if k["bias"] else "nobias",
            "batch_first" if k["batch_first"] else "seq_first",
            "bidir" if k["bidirectional"] else "unidir",
            f"H{k['hidden_size']}",
            *([f"P{k['proj_size']}"] if k.get("proj_size") else []),
            "hx" if len(sample.forward_input.args) > 1 else "nohx",
        ]
    )


def _error_id(entry, index, error_input):
    words = re.sub(r"[^A-Za-z_]+", " ", error_input.error_regex).split()[:4]
    ctor = error_input.module_error_input.constructor_input
    args = ",".join(map(repr, ctor.args)) + "".join(
        f",{k}={v!r}" for k, v in ctor.kwargs.items() if k not in ("device", "dtype")
    )
    return f"{entry}-{index}-{error_input.error_type.__name__}-{'_'.join(words)}-({args})"


# (entry, index) of every sample, and its id.
_SAMPLES = [(entry, i) for entry in ENTRIES for i in range(len(_samples(entry)))]
_SAMPLE_IDS = [_sample_id(entry, _samples(entry)[i]) for entry, i in _SAMPLES]
assert len(set(_SAMPLE_IDS)) == len(_SAMPLE_IDS) > 0, _SAMPLE_IDS
assert all(any(i.startswith(f"{entry}-") for i in _SAMPLE_IDS) for entry in ENTRIES), _SAMPLE_IDS
_ERRORS = [(entry, i) for entry in ENTRIES for i in range(len(_error_samples(entry, torch.float32)))]
_ERROR_IDS = [_error_id(entry, i, _error_samples(entry, torch.float32)[i]) for entry, i in _ERRORS]
assert all(any(i.startswith(f"{entry}-") for i in _ERROR_IDS) for entry in ENTRIES), _ERROR_IDS

each_sample = pytest.mark.parametrize("entry,index", _SAMPLES, ids=_SAMPLE_IDS)
each_entry = pytest.mark.parametrize("entry", list(ENTRIES))
each_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=[False, True], ids=["assign", "swap"])
def swap(request):
    """torch.__future__.set_swap_module_params_on_conversion, put back afterwards."""
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(old)


# --- helpers -----------------------------------------------------------------------------------


def _ctor(sample):
    return sample.constructor_input.args, dict(sample.constructor_input.kwargs)


def _fast(entry, sample, backend, **extra):
    args, kwargs = _ctor(sample)
    return ENTRIES[entry][2](*args, backend=backend, **kwargs, **extra)


def _stock(entry, sample, **extra):
    args, kwargs = _ctor(sample)
    return ENTRIES[entry][1](*args, **kwargs, **extra)


def _pair(entry, sample, backend, dtype, training=True):
    """A stock torch module and its fastrnn twin from the sample's constructor input, same
    parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        stock = _stock(entry, sample).to(dtype).train(training)
    fast = _fast(entry, sample, backend).to(dtype).train(training)
    _copy_parameters(stock, fast)
    return stock, fast


def _copy_parameters(source, target):
    # Not load_state_dict: with swap_module_params_on_conversion on, it swaps tensors, which the
    # parameters of nn.RNN, nn.GRU and nn.LSTM refuse (RNNBase keeps weakrefs to them);
    # .to()/to_empty() are exempt.
    with torch.no_grad():
        for (name, p), (other, q) in zip(source.named_parameters(), target.named_parameters()):
            assert name == other
            q.copy_(p)


def _seq_len(sample):
    return sample.forward_input.args[0].shape[0]  # unbatched samples: (seq_len, input_size)


def _output_names(outputs):
    """(output, h_n), or an LSTM's (output, (h_n, c_n)): the names of its leaves."""
    return ("output", "h_n", "c_n") if isinstance(outputs[1], (tuple, list)) else ("output", "h_n")


def _assert_outputs(actual, expected, tol, what):
    assert isinstance(actual, tuple) and len(actual) == len(expected) == 2, f"{what}: {type(actual)}"
    assert type(actual[1]) is type(expected[1]), f"{what} h_n: {type(actual[1])} != {type(expected[1])}"
    names = _output_names(expected)
    assert len(tree_leaves(actual)) == len(tree_leaves(expected)) == len(names), f"{what}: {actual!r}"
    for name, a, e in zip(names, tree_leaves(actual), tree_leaves(expected)):
        assert a.dtype == e.dtype, f"{what} {name}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, tol, f"{what} {name}")


def _grad_outputs(outputs, seed=1):
    """An upstream gradient for every leaf of the outputs (a flat tuple)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in tree_leaves(outputs))


def _forward_backward(module, args, grad_outputs):
    """Outputs, and the gradients of every differentiable input leaf and every parameter."""
    outputs = module(*args)
    leaves = [a for a in tree_leaves(args) if a.requires_grad] + list(module.parameters())
    grads = torch.autograd.grad(tree_leaves(outputs), leaves, grad_outputs)
    return tree_map(torch.Tensor.detach, outputs), grads


def _grad_names(module, args):
    return [f"grad input leaf {i}" for i, a in enumerate(tree_leaves(args)) if a.requires_grad] + [
        f"grad {name}" for name, _ in module.named_parameters()
    ]


def _non_contiguous(t):
    """The same values at stride 2 in the last dimension (every other element of a wider buffer)."""
    wide = t.detach().new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    out = wide[..., ::2]
    out.copy_(t.detach())
    assert not out.is_contiguous()
    return out.detach().requires_grad_(t.requires_grad)


def _metadata(t):
    return {
        "type": type(t),
        "shape": tuple(t.shape),
        "stride": t.stride(),
        "dtype": t.dtype,
        "layout": t.layout,
        "requires_grad": t.requires_grad,
        "is_leaf": t.is_leaf,
        "storage_offset": t.storage_offset(),
    }


def _assert_same_metadata(module, like, device):
    params = dict(module.named_parameters())
    expected = dict(like.named_parameters())
    assert list(params) == list(expected)
    for name, p in params.items():
        assert p.device == torch.device(device), f"{name} on {p.device}, expected {device}"
        assert _metadata(p) == _metadata(expected[name]), name
    assert list(module.named_buffers()) == [] and list(like.named_buffers()) == []


# --- importing PyTorch's test utilities -------------------------------------------------------


def test_importing_module_db_leaves_global_state_alone():
    assert _STATE_CHANGED_BY_IMPORT == []
    assert torch.get_default_dtype() == torch.float32
    assert not torch.backends.flags_frozen()


@each_entry
def test_module_info_is_as_expected(entry):
    """The flags that choose which checks below apply (as test_modules.py reads them)."""
    info = _info(entry)
    assert info.train_and_eval_differ  # -> checks run in train and eval mode (gradchecks: see there)
    assert info.supports_gradgrad  # -> gradgradcheck applies
    assert not info.is_lazy  # -> to_empty / to apply
    assert info.module_error_inputs_func is not None  # -> error inputs apply
    assert set(info.dtypes) == set(DTYPES)


# --- forward ----------------------------------------------------------------------------------


@each_sample
@each_dtype
def test_forward(entry, index, dtype, backend):
    sample = _samples(entry, dtype)[index]  # (module_db's RNN/GRU samples do not depend on the mode)
    args = sample.forward_input.args
    stock, fast = _pair(entry, sample, backend, dtype)
    tol = tolerance(dtype, _seq_len(sample))
    for mode in ("train", "eval"):
        stock.train(mode == "train")
        fast.train(mode == "train")
        outputs = fast(*args)
        _assert_outputs(outputs, stock(*args), tol, f"{mode}: vs stock nn.{entry}")
        # The sample's reference: the same module run on the input as a batch of one.
        # (ModuleInput wraps reference_fn so that it passes the parameters itself.)
        reference = sample.reference_fn(fast, *args, **sample.forward_input.kwargs)
        _assert_outputs(outputs, tuple(reference), tol, f"{mode}: vs batch-of-one reference")
    # .float() / .double() convert every parameter, and the module still runs.
    (fast.double() if dtype == torch.float64 else fast.float())(*args)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in fast.parameters())


# --- construction: factory kwargs, meta device, to_empty, to, repr ----------------------------


@each_sample
@each_dtype
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_factory_kwargs(entry, index, dtype, device, backend):
    sample = _samples(entry)[index]
    fast = _fast(entry, sample, backend, device=device, dtype=dtype)
    assert type(fast) is ENTRIES[entry][2] and len(list(fast.parameters())) > 0
    _assert_same_metadata(fast, _stock(entry, sample, device=device, dtype=dtype), device)


@each_sample
def test_device_ctx_init(entry, index, backend):
    """Built under ``with torch.device("meta")``: meta parameters with the metadata of a CPU
    build; and a forward on meta tensors gives the shapes and dtypes the stock module gives."""
    sample = _samples(entry)[index]
    with torch.device("meta"):
        meta_sample = _samples(entry, torch.float32, device=None)[index]  # a float32 module, as built
        fast = _fast(entry, meta_sample, backend)
        stock = _stock(entry, meta_sample)
    assert all(p.is_meta for p in fast.parameters())
    _assert_same_metadata(fast, _fast(entry, sample, backend), "meta")
    args = meta_sample.forward_input.args
    assert all(a.is_meta for a in tree_leaves(args))
    outputs, ref_outputs = fast(*args), stock(*args)
    assert type(outputs[1]) is type(ref_outputs[1])
    names = _output_names(ref_outputs)
    assert len(tree_leaves(outputs)) == len(tree_leaves(ref_outputs)) == len(names)
    for name, a, e in zip(names, tree_leaves(outputs), tree_leaves(ref_outputs)):
        assert a.is_meta, name
        assert (a.shape, a.dtype) == (e.shape, e.dtype), name


@each_sample
def test_to_empty(entry, index, swap, backend):
    dtype = torch.float32  # test_modules.py runs this one at float32 only
    with torch.device("meta"):
        sample = _samples(entry, dtype, device=None)[index]
        fast = _fast(entry, sample, backend)
    ids = [id(p) for p in fast.parameters()]
    cdatas = [p._cdata for p in fast.parameters()]
    fast.to_empty(device="cpu")
    params = list(fast.parameters())
    assert all(isinstance(p, torch.nn.Parameter) and p.device.type == "cpu" and p.dtype == dtype for p in params)
    assert all(a != b for a, b in zip(cdatas, (p._cdata for p in params)))  # new storage either way
    if swap:  # the Parameter objects are kept, their contents swapped
        assert [id(p) for p in params] == ids
    else:  # new Parameter objects
        assert all(a != b for a, b in zip(ids, (id(p) for p in params)))
    # Beyond test_modules.py: the materialized module computes what the stock one does once loaded.
    cpu_sample = _samples(entry, dtype)[index]
    stock, _ = _pair(entry, cpu_sample, backend, dtype)
    _copy_parameters(stock, fast)
    args = cpu_sample.forward_input.args
    _assert_outputs(fast(*args), stock(*args), tolerance(dtype, _seq_len(cpu_sample)), "after to_empty")


@each_sample
@pytest.mark.parametrize("set_grad", [False, True], ids=["no_grad", "with_grad"])
def test_to(entry, index, swap, set_grad, backend):
    dtype = torch.float32  # test_modules.py runs this one at float32 only
    info = _info(entry)
    sample = _samples(entry, dtype)[index]
    args = sample.forward_input.args
    fast = _fast(entry, sample, backend)
    # Put the parameters on the device/dtype without Module.to (which is what is tested).
    for name, p in list(fast.named_parameters()):
        new = torch.nn.Parameter(p.detach().clone().to("cpu", dtype))
        setattr(fast, name, new)
        if set_grad:
            new.grad = torch.randn_like(new)
    if swap and not set_grad:  # .to works after a forward and backward
        out = fast(*args)
        out[0].sum().backward()
        fast.to(dtype=torch.half)
        fast.to(dtype=torch.float32)

    previous = ("cpu", dtype)
    for device_, dtype_ in itertools.product(["cpu"], info.dtypes):
        grads_unchanged = (device_, dtype_) == previous
        previous = (device_, dtype_)
        params = list(fast.parameters())
        ids, cdatas = [id(p) for p in params], [p._cdata for p in params]
        if set_grad:
            grad_ids, grad_cdatas = [id(p.grad) for p in params], [p.grad._cdata for p in params]

        fast.to(device=device_, dtype=dtype_)

        params = list(fast.parameters())
        assert all(isinstance(p, torch.nn.Parameter) and p.device.type == device_ and p.dtype == dtype_ for p in params)
        assert [id(p) for p in params] == ids
        if set_grad:
            assert all(p.grad.device.type == device_ and p.grad.dtype == dtype_ for p in params)
        if swap:
            assert all(a != b for a, b in zip(cdatas, (p._cdata for p in params)))
            if set_grad:
                new = [p.grad._cdata for p in params]
                assert all((a == b) if grads_unchanged else (a != b) for a, b in zip(grad_cdatas, new))
        else:
            assert [p._cdata for p in params] == cdatas
            if set_grad:
                assert [p.grad._cdata for p in params] == grad_cdatas
                assert [id(p.grad) for p in params] == grad_ids

    # Beyond test_modules.py: after the conversions the module computes what the stock one does.
    final_dtype = info.dtypes[-1]
    converted = _samples(entry, final_dtype)[index]
    stock = _stock(entry, converted).to(final_dtype)
    _copy_parameters(fast, stock)
    _assert_outputs(
        fast(*converted.forward_input.args),
        stock(*converted.forward_input.args),
        tolerance(final_dtype, _seq_len(converted)),
        f"after .to({final_dtype})",
    )


@each_sample
def test_repr(entry, index, backend):
    sample = _samples(entry)[index]
    fast = _fast(entry, sample, backend).to(torch.float64)
    assert isinstance(repr(fast), str) and isinstance(str(fast), str)
    assert repr(fast) == repr(_stock(entry, sample)), "the same repr as the stock module"


# --- pickling ---------------------------------------------------------------------------------


@each_sample
@each_dtype
def test_pickle(entry, index, dtype, backend):
    sample = _samples(entry, dtype)[index]
    args = sample.forward_input.args
    stock, fast = _pair(entry, sample, backend, dtype)
    for mode in ("train", "eval"):
        stock.train(mode == "train")
        fast.train(mode == "train")
        outputs = fast(*args)
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        copy = torch.load(buffer, weights_only=False)
        assert type(copy) is ENTRIES[entry][2] and copy.backend == backend and copy.training == (mode == "train")
        copy_outputs = copy(*args)
        for a, e in zip(copy_outputs, outputs):
            where = f"{mode}: unpickled vs original"
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m, where=where: f"{where}: {m}")
        _assert_outputs(
            copy_outputs, stock(*args), tolerance(dtype, _seq_len(sample)), f"{mode}: unpickled vs stock nn.{entry}"
        )


# --- non-contiguous tensors and memory format -------------------------------------------------


@each_sample
@each_dtype
def test_non_contiguous_tensors(entry, index, dtype, backend):
    """Inputs and upstream gradients at stride 2 (each combination with contiguous ones, as
    test_modules.py does), then (beyond it) parameters at stride 2 too: the outputs and gradients
    of contiguous tensors, and the stock module's; in training and eval mode (which gradients only
    this test compares in)."""
    sample = _samples(entry, dtype, requires_grad=True)[index]
    args = sample.forward_input.args
    stock, fast = _pair(entry, sample, backend, dtype)
    names = _grad_names(fast, args)
    tol = tolerance(dtype, _seq_len(sample))
    nc_args = tree_map(_non_contiguous, args)

    def check(what, got, want):
        (out, grads), (want_out, want_grads) = got, want
        _assert_outputs(out, want_out, tol, what)
        for name, g, w in zip(names, grads, want_grads):
            assert_close(g, w, 4 * tol, f"{what}: {name}")

    for mode in ("train", "eval"):
        stock.train(mode == "train")
        fast.train(mode == "train")
        grad_out = _grad_outputs(stock(*args))
        nc_grad_out = tuple(_non_contiguous(g) for g in grad_out)
        default = _forward_backward(fast, args, grad_out)
        check(f"{mode}, contiguous: vs stock nn.{entry}", default, _forward_backward(stock, args, grad_out))
        for (in_what, in_args), (g_what, g_out) in [
            (("non-contiguous input", nc_args), ("contiguous grad_output", grad_out)),
            (("contiguous input", args), ("non-contiguous grad_output", nc_grad_out)),
            (("non-contiguous input", nc_args), ("non-contiguous grad_output", nc_grad_out)),
        ]:
            check(f"{mode}, {in_what}, {g_what}: vs contiguous", _forward_backward(fast, in_args, g_out), default)

    for module in (fast, stock):
        for name in module._flat_weights_names:
            setattr(module, name, torch.nn.Parameter(_non_contiguous(getattr(module, name))))
    assert not any(p.is_contiguous() for p in fast.parameters())
    for mode in ("train", "eval"):
        stock.train(mode == "train")
        fast.train(mode == "train")
        grad_out = tuple(_non_contiguous(g) for g in _grad_outputs(stock(*args)))
        got = _forward_backward(fast, nc_args, grad_out)
        what = f"{mode}, non-contiguous parameters, input and grad_output"
        check(f"{what}: vs stock nn.{entry}", got, _forward_backward(stock, nc_args, grad_out))


@each_sample
@each_dtype
def test_memory_format(entry, index, dtype, backend):
    """As test_modules.py runs it for 2-D inputs (contiguous format only; the backward part in
    training mode): same outputs and gradients under module.to(memory_format=...), all of them
    contiguous."""
    sample = _samples(entry, dtype, requires_grad=True)[index]
    args = sample.forward_input.args
    _, fast = _pair(entry, sample, backend, dtype, training=True)
    leaves = tree_leaves(args) + list(fast.parameters())
    desired = tree_leaves(fast(*args))
    grad_out = _grad_outputs(desired)
    desired_grads = torch.autograd.grad(desired, leaves, grad_out)
    for memory_format in (torch.preserve_format, torch.contiguous_format):
        fast.to(memory_format=memory_format)
        leaves = tree_leaves(args) + list(fast.parameters())
        outputs = tree_leaves(fast(*args))
        grads = torch.autograd.grad(outputs, leaves, grad_out)
        for what, got, want in (("output", outputs, desired), ("grad", grads, desired_grads)):
            for i, (a, e) in enumerate(zip(got, want)):
                where = f"{memory_format} {what} {i}"
                torch.testing.assert_close(a, e, msg=lambda m, where=where: f"{where}: {m}")
                assert a.is_contiguous(), f"{memory_format}: {what} {i} has strides {a.stride()}"


# --- gradients --------------------------------------------------------------------------------


def _check_gradients(check, module, args, partials=True):
    """check (gradcheck or gradgradcheck; batched grads on, fast mode, as test_modules.py runs
    them) of the module's outputs with respect to the inputs and all parameters together; then,
    with partials, to the inputs alone and to the parameters alone.

    test_modules.py checks the partials one parameter at a time (with the inputs): up to 17
    checks a sample (21 for LSTM with proj_size). Here the parameters go as one group, which keeps
    what a fused backward must get right when only some of its inputs need gradients (the input
    half or the weight half of its work) in 3 checks a sample. The inputs are a tree (LSTM's hx is
    (h0, c0)): gradcheck gets its leaves, and the outputs' leaves, as test_modules.py does."""
    params = dict(module.named_parameters())
    flat_args, spec = tree_flatten(tuple(args))
    n_args = len(flat_args)

    def fn(*inputs):
        return tuple(tree_leaves(module(*tree_unflatten(list(inputs[:n_args]), spec))))

    def run(what, inputs_grad, params_grad):
        for a in flat_args:
            a.requires_grad_(inputs_grad)
        for p in params.values():
            p.requires_grad_(params_grad)
        try:
            check(fn, tuple(flat_args) + tuple(params.values()), check_batched_grad=True, fast_mode=True)
        except Exception as error:
            raise AssertionError(f"{check.__name__} w.r.t. {what}: {type(error).__name__}: {error}") from error
        finally:
            for t in (*flat_args, *params.values()):
                t.requires_grad_(True)

    run("inputs and all parameters", True, True)
    if partials:
        run("inputs alone", True, False)
        run("parameters alone", False, True)


# In training mode only, where test_modules.py runs both: every sample has dropout=0, and the
# training flag gates nothing else; gradients in eval mode are compared with the stock module's by
# test_non_contiguous_tensors.


@each_sample
def test_gradcheck(entry, index, backend):
    sample = _samples(entry, torch.float64, requires_grad=True)[index]
    _, fast = _pair(entry, sample, backend, torch.float64)
    _check_gradients(torch.autograd.gradcheck, fast, sample.forward_input.args)


_WITH_HX = [i for i, name in enumerate(_SAMPLE_IDS) if name.endswith("-hx")]


@pytest.mark.parametrize("entry,index", [_SAMPLES[i] for i in _WITH_HX], ids=[_SAMPLE_IDS[i] for i in _WITH_HX])
def test_gradgradcheck(entry, index, backend):
    # The samples that pass hx (so input, hx and every parameter are differentiated; the others
    # differ only in hx=None and hidden_size 2 (LSTM: seq_len 2): 16 of 32 for RNN, 8 of 16 for
    # GRU, 16 of 32 for LSTM, half of them with proj_size), with respect
    # to all of them together only: at 0.5 s a check (2 cores), the partials or the other samples
    # would double the file's runtime.
    sample = _samples(entry, torch.float64, requires_grad=True)[index]
    _, fast = _pair(entry, sample, backend, torch.float64)
    _check_gradients(torch.autograd.gradgradcheck, fast, sample.forward_input.args, partials=False)


# --- train/eval and errors --------------------------------------------------------------------


@each_sample
def test_if_train_and_eval_modes_differ(entry, index, backend):
    """Without its ``training`` attribute the module may fail only by reading it, which the
    ModuleInfo entry must then declare (it does: train_and_eval_differ=True)."""
    sample = _samples(entry)[index]
    fast = _fast(entry, sample, backend).to(torch.float64)
    del fast.training
    try:
        fast(*sample.forward_input.args)
    except AttributeError as error:
        assert "'training'" in str(error), error
        assert _info(entry).train_and_eval_differ


def _raised(make, call=None):
    try:
        module = make()
        if call is not None:
            call(module)
    except Exception as error:  # noqa: BLE001 - the exception is what is compared
        return error
    return None


@pytest.mark.parametrize("entry,index", _ERRORS, ids=_ERROR_IDS)
@each_dtype
def test_errors(entry, index, dtype, backend):
    """module_error_inputs_func: the type and message regex PyTorch expects, and the same type and
    message as the stock module."""
    error_input = _error_samples(entry, dtype)[index]
    sample = error_input.module_error_input
    if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        call = None
    elif error_input.error_on == ModuleErrorEnum.FORWARD_ERROR:

        def call(module):
            module(*sample.forward_input.args, **sample.forward_input.kwargs)
    else:
        raise NotImplementedError(error_input.error_on)
    expected = _raised(lambda: _stock(entry, sample), call)
    got = _raised(lambda: _fast(entry, sample, backend), call)
    assert isinstance(expected, error_input.error_type), f"stock nn.{entry} raised {expected!r}"
    assert got is not None, f"fastrnn.{entry} raised nothing; expected {error_input.error_type.__name__}"
    assert isinstance(got, error_input.error_type), f"fastrnn.{entry} raised {got!r}"
    assert re.search(error_input.error_regex, str(got)), f"{str(got)!r} !~ {error_input.error_regex!r}"
    assert type(got) is type(expected) and str(got) == str(expected), f"{got!r} != stock {expected!r}"
