"""What every Numba cell shares: compiler flags, the task split, the threading and BLAS plan, the
launch, the checks, and the NumPy views of torch tensors.

Each kernel runs the whole time loop in one call. Work is split into tasks of one direction and
a block of batch rows; a task runs every step for its rows, so threads never synchronise inside
the loop. Layouts follow CONTRACTS.md.

Numba's disk cache checks only the file of the kernel it caches: after editing this module,
``_linalg.py`` or ``fast_tanh.py`` (which the cell kernels inline), delete
kernels/numba/__pycache__, or the cells keep running the old code.
"""

import contextlib
import ctypes
import glob
import os
import threading

import numba
import numpy as np
import torch
from numba import njit

# Keeps NaN/inf semantics (no "nnan"/"ninf") while letting LLVM vectorise and contract.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
JIT = dict(fastmath=FASTMATH, nogil=True, cache=True)
# A task multiplies with BLAS only when its row block is tall enough to amortise BLAS's packing
# of W_hh, which it redoes on every call; below that the hand loop wins (measured on Zen 4). The
# float64 hand loop falls behind much sooner (2x slower than BLAS at 32 rows, H = 512).
_BLAS_MIN_ROWS = {torch.float32: 64, torch.float64: 8}
_BLAS_MIN_HIDDEN = 512
# Whole-layer kernels run on one thread; up to this many multiply-adds per layer (T·B·D·G·H·(I+H))
# the torch ops they replace cost more than a second thread saves (paired runs on 2-thread Zen 4:
# 20-30% faster at 3.3M, e.g. T=100 with B=1, H=128 or B=4, H=64; even at 4.1M; mixed from 6.5M).
# A setting (README, "Settings"): FASTRNN_WHOLE_LAYER_MACS at import, or assign it; -1 sends
# every layer to the split path, a huge value every layer to the whole-layer kernels.
WHOLE_LAYER_MACS = int(os.environ.get("FASTRNN_WHOLE_LAYER_MACS", 1 << 22))


@njit(**JIT)
def time_index(step, length, direction):
    return step if direction == 0 else length - 1 - step


@njit(inline="always", **JIT)
def is_descending(lengths, b0, stride, rows):
    for i in range(1, rows):
        if lengths[b0 + i * stride] > lengths[b0 + (i - 1) * stride]:
            return False
    return True


@njit(inline="always", **JIT)
def live_rows(lengths, b0, stride, rows, step, descending):
    """How many leading rows to multiply at ``step``. With lengths sorted, as a PackedSequence's
    are, finished rows form a tail that is skipped, so the work follows the valid tokens."""
    live = rows
    if descending:
        while live > 0 and lengths[b0 + (live - 1) * stride] <= step:
            live -= 1
    return live


@njit(inline="always", **JIT)
def start_rows(state_in, lengths, d, b0, stride, rows, state):
    """Load each row's starting state; return the longest length among the rows."""
    longest = 0
    for i in range(rows):
        longest = max(longest, lengths[b0 + i * stride])
        state[i, :] = state_in[d, b0 + i * stride, :]
    return longest


@njit(inline="always", **JIT)
def zero_tails(padded, lengths, d, b0, stride, rows):
    """Zero each row's steps past its length in a (T, B, D, W) output."""
    for i in range(rows):
        for t in range(lengths[b0 + i * stride], padded.shape[0]):
            padded[t, b0 + i * stride, d, :] = 0.0


@njit(inline="always", **JIT)
def task_rows(task, batch, rows_per_task):
    """Task -> (direction, first row, stride, rows); tasks run direction-major. A task takes every
    ``blocks``-th row rather than a contiguous block: with lengths sorted (packed input) each task
    then gets long and short sequences alike, and the tasks finish together."""
    blocks = (batch + rows_per_task - 1) // rows_per_task
    d = task // blocks
    b0 = task - d * blocks
    return d, b0, blocks, (batch - b0 + blocks - 1) // blocks


@njit(**JIT)
def previous_states(out, h0, lengths, d):
    """(T*B, H): the state each step of direction d started from (h0 at a sequence's first step)."""
    seq_len, batch, _, hidden = out.shape
    prev = np.zeros((seq_len, batch, hidden), out.dtype)
    for b in range(batch):
        for step in range(lengths[b]):
            t = time_index(step, lengths[b], d)
            if step == 0:
                prev[t, b] = h0[d, b]
            else:
                prev[t, b] = out[t - 1 if d == 0 else t + 1, b, d]
    return prev.reshape(seq_len * batch, hidden)


def _scipy_openblas():
    """The OpenBLAS that Numba's np.dot calls (SciPy's), as a ctypes library, or None."""
    try:
        import scipy
    except ImportError:
        return None
    pattern = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs", "libscipy_openblas*.so*")
    for path in glob.glob(pattern):
        lib = ctypes.CDLL(path)
        if hasattr(lib, "scipy_openblas_set_num_threads") and hasattr(lib, "scipy_openblas_get_num_threads"):
            return lib
    return None


OPENBLAS = _scipy_openblas()


_BLAS_LOCK = threading.Lock()
_blas_pins = {"count": 0, "threads_before": 1}


@contextlib.contextmanager
def single_threaded_blas():
    """Inside an OpenMP region OpenBLAS must not start its own threads (it can deadlock there, and
    would oversubscribe the cores anyway), so pin it to one thread for the call. Counted, so that
    calls from several Python threads restore the user's setting only when the last one ends."""
    with _BLAS_LOCK:
        if _blas_pins["count"] == 0:
            _blas_pins["threads_before"] = OPENBLAS.scipy_openblas_get_num_threads()
            OPENBLAS.scipy_openblas_set_num_threads(1)
        _blas_pins["count"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_pins["count"] -= 1
            if _blas_pins["count"] == 0:
                OPENBLAS.scipy_openblas_set_num_threads(_blas_pins["threads_before"])


def _plan(batch, n_dir, hidden, dtype):
    """(use_blas, rows_per_task); rows_per_task is None where the tasks run serially: one task, or
    one thread (then no parallel region starts, which keeps forked children safe, as in torch)."""
    threads = _threads()
    rows = _rows_per_task(batch, n_dir, threads)
    use_blas = OPENBLAS is not None and rows >= _BLAS_MIN_ROWS[dtype] and hidden >= _BLAS_MIN_HIDDEN
    return use_blas, (rows if threads > 1 and n_dir * -(-batch // rows) > 1 else None)


_PARALLEL_LOCK = threading.Lock()


def _parallel_region_guard():
    """Numba's ``workqueue`` threading layer (used where neither OpenMP nor TBB is installed) aborts
    the process when two Python threads enter parallel kernels at once; serialise them there."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet, so the layer is not chosen yet
        return _PARALLEL_LOCK
    return contextlib.nullcontext() if layer in ("omp", "tbb") else _PARALLEL_LOCK


# Set only by warm_up(), which compiles the parallel and the serial kernels alike.
_forced_rows_per_task = []


@contextlib.contextmanager
def forced_plan(rows_per_task):
    """Make every launch inside run the serial kernels (None) or the parallel ones (an int)."""
    _forced_rows_per_task.append(rows_per_task)
    try:
        yield
    finally:
        _forced_rows_per_task.pop()


def launch(parallel_kernel, serial_kernel, args, outputs, batch, n_dir, hidden, dtype):
    """Run ``serial_kernel(*args, use_blas, *outputs)`` or ``parallel_kernel(*args, rows_per_task,
    use_blas, *outputs)``, as the thread count and sizes decide."""
    use_blas, rows = _plan(batch, n_dir, hidden, dtype)
    if _forced_rows_per_task:
        rows = _forced_rows_per_task[-1]
    with single_threaded_blas() if use_blas else contextlib.nullcontext():
        if rows is None:
            serial_kernel(*args, use_blas, *outputs)
        else:
            _set_numba_threads(_threads())
            with _parallel_region_guard():
                parallel_kernel(*args, rows, use_blas, *outputs)


def _rows_per_task(batch, n_dir, threads):
    """Enough tasks to occupy every thread, no more: each extra block re-reads W_hh per step."""
    blocks = max(1, -(-threads // n_dir))
    return max(1, -(-batch // blocks))


def _threads():
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _set_numba_threads(threads):
    """Numba's thread count for the next parallel kernel. Starting Numba's OpenMP pool sets the
    OpenMP thread count, which torch shares and reads as its own: put the user's setting back."""
    before = torch.get_num_threads()
    numba.set_num_threads(threads)
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


def arrays(*tensors):
    # force=True detaches in C++ (cheaper than .detach().numpy()). It copies only a tensor off the
    # CPU (ruled out by the checks) or with a conj/neg view bit (never set on the real float
    # tensors the launchers allocate, so the outputs the kernels write are never copies).
    return [t.numpy(force=True) for t in tensors]


def check(lengths, batch, **named):
    """Device, dtype, contiguity of every tensor (named as the caller knows them) and lengths."""
    dtype = next(iter(named.values())).dtype
    for name, t in named.items():
        if not (t.is_cpu and t.dtype == dtype and t.is_contiguous()):
            if not t.is_cpu:
                raise RuntimeError(f"numba kernels run on CPU tensors, got {name} on {t.device}")
            if t.dtype != dtype:
                raise TypeError(f"numba kernels need tensors of one dtype, got {name} {t.dtype}, not {dtype}")
            raise ValueError(f"{name} must be contiguous")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"numba kernels support float32 and float64, got {dtype}")
    if lengths.dtype != torch.int64 or lengths.shape != (batch,):
        raise ValueError(f"lengths must be int64 of shape ({batch},), got {lengths.dtype} {tuple(lengths.shape)}")


def check_lengths(lengths, seq_len):
    """Every length in [0, T]: the kernels index by them (in NumPy: a torch reduction costs more)."""
    values = lengths.numpy(force=True)
    if values.size and (values.min() < 0 or values.max() > seq_len):
        raise ValueError(f"lengths must lie in [0, {seq_len}], got {values.min()} to {values.max()}")


def check_shapes(lengths, seq_len, batch, expected, **named):
    """``named``: name -> (tensor, the shape it must have). Unless every tensor has its shape, one
    ValueError naming them all, with ``expected`` (the layouts in letters); then check() and
    check_lengths()."""
    if not all(t.shape == shape for t, shape in named.values()):
        got = {name: tuple(t.shape) for name, (t, _) in named.items()}
        raise ValueError(f"expected {expected}; got {got}")
    check(lengths, batch, **{name: t for name, (t, _) in named.items()})
    check_lengths(lengths, seq_len)


def check_recurrence(gates, shape, w_hh, b_hh, lengths, states, **like_out):
    """For (T, B, D, H) = ``shape``: w_hh (D, G*H, H), b_hh (D, G*H) or None, ``states`` (name ->
    tensor) each (D, B, H), and ``like_out`` (name -> (tensor, W)) each (T, B, D, W)."""
    seq_len, batch, n_dir, hidden = shape
    fits = w_hh.shape == (n_dir, gates * hidden, hidden) and (b_hh is None or b_hh.shape == (n_dir, gates * hidden))
    fits = fits and all(t.shape == (n_dir, batch, hidden) for t in states.values())
    fits = fits and all(t.shape == (seq_len, batch, n_dir, width) for t, width in like_out.values())
    named = {name: t for name, (t, _) in like_out.items()}
    if not fits:
        raise ValueError(
            f"expected (T, B, D, H) = {tuple(shape)} with w_hh (D, {gates}H, H), b_hh (D, {gates}H), (D, B, H) "
            f"states and (T, B, D, ...) tensors; got w_hh {tuple(w_hh.shape)}"
            f"{'' if b_hh is None else f', b_hh {tuple(b_hh.shape)}'}, "
            f"{ {name: tuple(t.shape) for name, t in {**states, **named}.items()} }"
        )
    extra = {} if b_hh is None else {"b_hh": b_hh}
    check(lengths, batch, w_hh=w_hh, **extra, **states, **named)
    check_lengths(lengths, seq_len)


def fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, gates):
    """Whether the whole-layer kernels are the faster way to run this layer; above this size the
    caller's multi-threaded GEMMs around the recurrence kernels win."""
    macs = seq_len * batch * n_dir * gates * hidden * (n_in + hidden)
    # Tuned with 2 threads. With more, those GEMMs get faster while the torch-op overhead the
    # whole-layer call saves does not, so the crossover moves down (about 2x in a fixed-overhead
    # cost model; not measured here).
    return macs <= (WHOLE_LAYER_MACS if torch.get_num_threads() <= 2 else WHOLE_LAYER_MACS // 2)


def check_layer(gates, lengths, x, params, h0, grad_hn=None, **like_out):
    """x (T, B, I); params: per direction (w_ih (G*H, I), w_hh (G*H, H)[, b_ih (G*H,)[, b_hh]]);
    h0 and grad_hn (if given) (D, B, H); like_out: name -> (tensor, W) for (T, B, D, W) tensors.
    Then dtypes, devices, contiguity."""
    n_dir, hidden = len(params), h0.shape[-1]
    n_in = params[0][0].shape[-1]
    shapes = ((gates * hidden, n_in), (gates * hidden, hidden), (gates * hidden,), (gates * hidden,))
    fits = 2 <= len(params[0]) <= 4 and x.dim() == 3 and x.shape[2] == n_in and h0.shape == (n_dir, x.shape[1], hidden)
    for t, width in like_out.values():
        fits = fits and t.shape == (x.shape[0], x.shape[1], n_dir, width)
    named = {name: t for name, (t, _) in like_out.items()}
    if grad_hn is not None:
        fits = fits and grad_hn.shape == h0.shape
        named["grad_hn"] = grad_hn  # for the dtype, device and contiguity checks below
    for p in params:
        fits = fits and len(p) == len(params[0])
        for t, shape in zip(p, shapes):
            fits = fits and t.shape == shape
    if not fits:
        raise ValueError(
            f"expected x (T, B, I), per direction w_ih ({gates}H, I), w_hh ({gates}H, H) and biases ({gates}H,), "
            f"h0 and grad_hn (D, B, H), (T, B, D, ...) outputs; got x {tuple(x.shape)}, h0 {tuple(h0.shape)}, "
            f"{'' if grad_hn is None else f'grad_hn {tuple(grad_hn.shape)}, '}parameters "
            f"{[[tuple(t.shape) for t in p] for p in params]}, { ({n: tuple(t.shape) for n, t in named.items()}) }"
        )
    check(lengths, x.shape[1], x=x, h0=h0, **named)
    check_lengths(lengths, x.shape[0])
    for d, p in enumerate(params):
        for i, t in enumerate(p):
            if not (t.is_cpu and t.dtype == x.dtype and t.is_contiguous()):  # named only on error
                check(lengths, x.shape[1], x=x, **{f"direction {d} parameter {i}": t})


def stacked_arrays(params, fold_biases):
    """Per-direction parameter tensors -> NumPy (w_ih (D, G*H, I), w_hh (D, G*H, H), b_ih, b_hh),
    at a fraction of the cost of torch ops. With ``fold_biases`` b_ih is b_ih + b_hh and b_hh is
    empty; an absent bias is an empty (0, 0) array. One direction takes views, two are copied."""
    arrays = [[t.numpy(force=True) for t in p] for p in params]
    empty = np.empty((0, 0), arrays[0][0].dtype)

    def stacked(i):
        if len(arrays) == 1:
            return arrays[0][i][None]
        return np.stack([a[i] for a in arrays])

    w_ih, w_hh = stacked(0), stacked(1)
    b_ih = stacked(2) if len(arrays[0]) > 2 else empty
    b_hh = stacked(3) if len(arrays[0]) > 3 else empty
    if fold_biases and b_hh.size:
        return w_ih, w_hh, b_ih + b_hh, empty
    return w_ih, w_hh, b_ih, b_hh


def gradient_tuples(params, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, folded):
    """Stacked NumPy gradients -> per direction a tuple of tensors matching ``params``. Sliced in
    NumPy: a torch select per gradient costs more than the slicing and the copy. A ``folded``
    b_hh's gradient is a copy of b_ih's, so that no two .grad tensors share memory."""
    n_params = len(params[0])
    return [
        tuple(
            map(
                torch.from_numpy,
                (grad_w_ih[d], grad_w_hh[d], grad_b_ih[d], grad_b_ih[d].copy() if folded else grad_b_hh[d])[:n_params],
            )
        )
        for d in range(len(params))
    ]
