"""Numba CPU kernels for the Elman recurrence ``h_t = act(proj_t + h_{t-1} @ W_hh^T)``.

Each kernel runs the whole time loop in one call. Work is split into tasks of one direction and
a block of batch rows; a task runs every step for its rows, so threads never synchronise inside
the loop. For most layers the input projection and all weight gradients are GEMMs done by the
caller and the recurrence kernels carry only the sequential part; small layers run whole (GEMMs
included, on one thread) in the layer kernels, where torch's per-op cost would dominate. Layouts
follow CONTRACTS.md.
"""

import contextlib
import ctypes
import glob
import os
import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from .fast_tanh import tanh_float32, tanh_float64

# Keeps NaN/inf semantics (no "nnan"/"ninf") while letting LLVM vectorise and contract.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
_JIT = dict(fastmath=_FASTMATH, nogil=True, cache=True)
# A task multiplies with BLAS only when its row block is tall enough to amortise BLAS's packing
# of W_hh, which it redoes on every call; below that the hand loop wins (measured on Zen 4). The
# float64 hand loop falls behind much sooner (2x slower than BLAS at 32 rows, H = 512).
_BLAS_MIN_ROWS = {torch.float32: 64, torch.float64: 8}
_BLAS_MIN_HIDDEN = 512
# Whole-layer kernels run on one thread; up to this many multiply-adds per layer (T·B·D·H·(I+H))
# the torch ops they replace cost more than a second thread saves (paired runs on 2-thread Zen 4:
# 20-30% faster at 3.3M, e.g. T=100 with B=1, H=128 or B=4, H=64; even at 4.1M; mixed from 6.5M).
# A setting (README, "Settings"): FASTRNN_WHOLE_LAYER_MACS at import, or assign it; -1 sends
# every layer to the split path, a huge value every layer to the whole-layer kernels.
WHOLE_LAYER_MACS = int(os.environ.get("FASTRNN_WHOLE_LAYER_MACS", 1 << 22))


@njit(inline="always", **_JIT)
def _rows_times_four(a, w, out, i, k):
    """out[i:i+4] += a[i:i+4, k:k+4] @ w[k:k+4]: each loaded row of w serves four rows of out."""
    a00, a01, a02, a03 = a[i, k], a[i, k + 1], a[i, k + 2], a[i, k + 3]
    a10, a11, a12, a13 = a[i + 1, k], a[i + 1, k + 1], a[i + 1, k + 2], a[i + 1, k + 3]
    a20, a21, a22, a23 = a[i + 2, k], a[i + 2, k + 1], a[i + 2, k + 2], a[i + 2, k + 3]
    a30, a31, a32, a33 = a[i + 3, k], a[i + 3, k + 1], a[i + 3, k + 2], a[i + 3, k + 3]
    for j in range(w.shape[1]):
        w0, w1, w2, w3 = w[k, j], w[k + 1, j], w[k + 2, j], w[k + 3, j]
        out[i, j] += a00 * w0 + a01 * w1 + a02 * w2 + a03 * w3
        out[i + 1, j] += a10 * w0 + a11 * w1 + a12 * w2 + a13 * w3
        out[i + 2, j] += a20 * w0 + a21 * w1 + a22 * w2 + a23 * w3
        out[i + 3, j] += a30 * w0 + a31 * w1 + a32 * w2 + a33 * w3


@njit(inline="always", **_JIT)
def _row_times(a, w, out, i, k_start, k_stop):
    """out[i] += a[i, k_start:k_stop] @ w[k_start:k_stop], four rows of w per pass."""
    k_main = k_stop - (k_stop - k_start) % 4
    for k in range(k_start, k_main, 4):
        a0, a1, a2, a3 = a[i, k], a[i, k + 1], a[i, k + 2], a[i, k + 3]
        for j in range(w.shape[1]):
            out[i, j] += a0 * w[k, j] + a1 * w[k + 1, j] + a2 * w[k + 2, j] + a3 * w[k + 3, j]
    for k in range(k_main, k_stop):
        a_ik = a[i, k]
        for j in range(w.shape[1]):
            out[i, j] += a_ik * w[k, j]


@njit(**_JIT)
def _hand_matmul(a, w, out):
    """out = a @ w, vectorised over the contiguous output columns. The compiler cannot keep
    ``out`` in registers (it may alias ``w``), so blocks of four rows of ``a`` and four of ``w``
    share each pass over ``out``."""
    n, k_dim = a.shape
    n_main, k_main = n - n % 4, k_dim - k_dim % 4
    out[:, :] = 0.0
    for i in range(0, n_main, 4):
        for k in range(0, k_main, 4):
            _rows_times_four(a, w, out, i, k)
        for r in range(4):
            _row_times(a, w, out, i + r, k_main, k_dim)
    for i in range(n_main, n):
        _row_times(a, w, out, i, 0, k_dim)


@njit(**_JIT)
def _matmul(a, w, out, use_blas):
    if use_blas:
        np.dot(a, w, out)
    else:
        _hand_matmul(a, w, out)


@njit(**_JIT)
def _row_dots(v, w_rows, out):
    """out[j] = w_rows[j] . v for one row vector: the single-row step product. Four dot products
    share each load of v, and their sums stay in registers; the four-row ``_hand_matmul`` would
    re-load and re-store the output row for every four elements of v (1.6x slower at H = 64)."""
    n, k_dim = w_rows.shape
    n_main = n - n % 4
    for j in range(0, n_main, 4):
        s0 = s1 = s2 = s3 = v.dtype.type(0.0)
        for k in range(k_dim):
            v_k = v[k]
            s0 += w_rows[j, k] * v_k
            s1 += w_rows[j + 1, k] * v_k
            s2 += w_rows[j + 2, k] * v_k
            s3 += w_rows[j + 3, k] * v_k
        out[j], out[j + 1], out[j + 2], out[j + 3] = s0, s1, s2, s3
    for j in range(n_main, n):
        s = v.dtype.type(0.0)
        for k in range(k_dim):
            s += w_rows[j, k] * v[k]
        out[j] = s


@njit(inline="always", **_JIT)
def _activation(z, relu, single):
    if relu:
        return 0.0 if z < 0.0 else z
    return tanh_float32(z) if single else tanh_float64(z)


@njit(**_JIT)
def _time_index(step, length, direction):
    return step if direction == 0 else length - 1 - step


@njit(inline="always", **_JIT)
def _is_descending(lengths, b0, stride, rows):
    for i in range(1, rows):
        if lengths[b0 + i * stride] > lengths[b0 + (i - 1) * stride]:
            return False
    return True


@njit(inline="always", **_JIT)
def _live_rows(lengths, b0, stride, rows, step, descending):
    """How many leading rows to multiply at ``step``. With lengths sorted, as a PackedSequence's
    are, finished rows form a tail that is skipped, so the work follows the valid tokens."""
    live = rows
    if descending:
        while live > 0 and lengths[b0 + (live - 1) * stride] <= step:
            live -= 1
    return live


@njit(inline="always", **_JIT)
def _start_rows(state_in, lengths, d, b0, stride, rows, padded_out, state):
    """Load each row's starting state, zero its steps past the length in ``padded_out``, and
    return the longest length among the rows."""
    seq_len = padded_out.shape[0]
    longest = 0
    for i in range(rows):
        length = lengths[b0 + i * stride]
        longest = max(longest, length)
        state[i, :] = state_in[d, b0 + i * stride, :]
        for t in range(length, seq_len):
            padded_out[t, b0 + i * stride, d, :] = 0.0
    return longest


@njit(**_JIT)
def _fwd_task(proj, w_hh, w_hh_t, h0, lengths, relu, single, d, b0, stride, rows, use_blas, out, h_n):
    """The whole forward time loop of one direction for the batch rows b0 + i * stride, i < rows.
    h @ W_hh^T reads w_hh_t, or w_hh itself once a single row is left."""
    hidden = proj.shape[3]
    h = np.empty((rows, hidden), proj.dtype)
    acc = np.empty((rows, hidden), proj.dtype)
    longest = _start_rows(h0, lengths, d, b0, stride, rows, out, h)
    descending = _is_descending(lengths, b0, stride, rows)
    for step in range(longest):
        live = _live_rows(lengths, b0, stride, rows, step, descending)
        if live == 1:
            _row_dots(h[0], w_hh[d], acc[0])
        else:
            _matmul(h[:live], w_hh_t[d], acc[:live], use_blas)
        for i in range(live):
            b = b0 + i * stride
            length = lengths[b]
            if step < length:
                t = _time_index(step, length, d)
                for j in range(hidden):
                    z = acc[i, j] + proj[t, b, d, j]
                    v = _activation(z, relu, single)
                    h[i, j] = v
                    out[t, b, d, j] = v
    for i in range(rows):
        h_n[d, b0 + i * stride, :] = h[i, :]


@njit(**_JIT)
def _bwd_task(grad_out, grad_hn, out, w_hh, lengths, relu, d, b0, stride, rows, use_blas, grad_pre, grad_h0):
    """The whole reverse-time loop of one direction for the batch rows b0 + i * stride, i < rows.
    (dz @ W_hh keeps the row-wise product even for one row: its dot form would need W_hh^T, and
    the transposed copy costs more than the dot form saves above H = 64.)"""
    hidden = out.shape[3]
    dh = np.empty((rows, hidden), out.dtype)
    dz = np.zeros((rows, hidden), out.dtype)
    dh_prev = np.empty((rows, hidden), out.dtype)
    longest = _start_rows(grad_hn, lengths, d, b0, stride, rows, grad_pre, dh)
    descending = _is_descending(lengths, b0, stride, rows)
    for step in range(longest - 1, -1, -1):
        live = _live_rows(lengths, b0, stride, rows, step, descending)
        for i in range(live):
            b = b0 + i * stride
            length = lengths[b]
            if step < length:
                t = _time_index(step, length, d)
                for j in range(hidden):
                    g = grad_out[t, b, d, j] + dh[i, j]
                    y = out[t, b, d, j]
                    if relu:  # as torch's threshold_backward: only y <= 0 blocks, so NaN passes
                        g = 0.0 if y <= 0.0 else g
                    else:
                        g = g * (1.0 - y * y)
                    dz[i, j] = g
                    grad_pre[t, b, d, j] = g
        _matmul(dz[:live], w_hh[d], dh_prev[:live], use_blas)
        # Rows whose sequence has not started yet (in reverse order) keep their incoming dh.
        for i in range(live):
            if step < lengths[b0 + i * stride]:
                dh[i, :] = dh_prev[i, :]
    for i in range(rows):
        grad_h0[d, b0 + i * stride, :] = dh[i, :]


@njit(inline="always", **_JIT)
def _task_rows(task, batch, rows_per_task):
    """Task -> (direction, first row, stride, rows); tasks run direction-major. A task takes every
    ``blocks``-th row rather than a contiguous block: with lengths sorted (packed input) each task
    then gets long and short sequences alike, and the tasks finish together."""
    blocks = (batch + rows_per_task - 1) // rows_per_task
    d = task // blocks
    b0 = task - d * blocks
    return d, b0, blocks, (batch - b0 + blocks - 1) // blocks


@njit(**_JIT)
def _transposed(w_hh):
    """w_hh[d].T for every direction, contiguous: the forward multiplies several rows h @ W_hh^T
    row-wise. Copied in 32x32 tiles, so that the strided side stays in cache at large H."""
    n_dir, hidden = w_hh.shape[0], w_hh.shape[1]
    w_t = np.empty_like(w_hh)
    for d in range(n_dir):
        for i0 in range(0, hidden, 32):
            for j0 in range(0, hidden, 32):
                for i in range(i0, min(i0 + 32, hidden)):
                    for j in range(j0, min(j0 + 32, hidden)):
                        w_t[d, j, i] = w_hh[d, i, j]
    return w_t


@njit(**_JIT)
def _transposed_for_rows(w_hh, most_rows):
    """W_hh^T for steps with several rows; a lone row takes dot products with W_hh itself, so
    where no task has more than one row the copy is skipped (w_hh stands in, unread)."""
    return _transposed(w_hh) if most_rows > 1 else w_hh


# The parallel drivers split rows across Numba's threads (OpenMP, TBB or workqueue); the serial
# ones run a single task without entering a parallel region.
@njit(parallel=True, **_JIT)
def _elman_fwd_kernel(proj, w_hh, h0, lengths, relu, single, rows_per_task, use_blas, out, h_n):
    batch, n_dir = proj.shape[1], proj.shape[2]
    w_hh_t = _transposed_for_rows(w_hh, rows_per_task)
    for task in prange(n_dir * ((batch + rows_per_task - 1) // rows_per_task)):
        d, b0, stride, rows = _task_rows(task, batch, rows_per_task)
        _fwd_task(proj, w_hh, w_hh_t, h0, lengths, relu, single, d, b0, stride, rows, use_blas, out, h_n)


@njit(**_JIT)
def _elman_fwd_serial_kernel(proj, w_hh, h0, lengths, relu, single, use_blas, out, h_n):
    w_hh_t = _transposed_for_rows(w_hh, proj.shape[1])
    for d in range(proj.shape[2]):
        _fwd_task(proj, w_hh, w_hh_t, h0, lengths, relu, single, d, 0, 1, proj.shape[1], use_blas, out, h_n)


@njit(parallel=True, **_JIT)
def _elman_bwd_kernel(grad_out, grad_hn, out, w_hh, lengths, relu, rows_per_task, use_blas, grad_pre, grad_h0):
    batch, n_dir = out.shape[1], out.shape[2]
    for task in prange(n_dir * ((batch + rows_per_task - 1) // rows_per_task)):
        d, b0, stride, rows = _task_rows(task, batch, rows_per_task)
        _bwd_task(grad_out, grad_hn, out, w_hh, lengths, relu, d, b0, stride, rows, use_blas, grad_pre, grad_h0)


@njit(**_JIT)
def _elman_bwd_serial_kernel(grad_out, grad_hn, out, w_hh, lengths, relu, use_blas, grad_pre, grad_h0):
    for d in range(out.shape[2]):
        _bwd_task(grad_out, grad_hn, out, w_hh, lengths, relu, d, 0, 1, out.shape[1], use_blas, grad_pre, grad_h0)


# Whole-layer kernels for small problems: the GEMMs around the recurrence run here too, so the
# layer costs one call instead of one per torch op (each ~10 us, more than the arithmetic here).
# They allocate their outputs: a NumPy array made here costs far less than a torch tensor made and
# converted in Python (about 3 us each, in the budget of a ~100 us layer).
@njit(**_JIT)
def _layer_fwd_kernel(x, w_ih, bias, w_hh, h0, lengths, relu, single):
    seq_len, batch, n_in = x.shape
    n_dir, hidden = w_hh.shape[0], w_hh.shape[1]
    out = np.empty((seq_len, batch, n_dir, hidden), x.dtype)
    h_n = np.empty_like(h0)
    proj = np.empty((seq_len, batch, n_dir, hidden), x.dtype)
    flat_proj = proj.reshape(seq_len * batch, n_dir * hidden)
    _hand_matmul(
        x.reshape(seq_len * batch, n_in), np.ascontiguousarray(w_ih.reshape(n_dir * hidden, n_in).T), flat_proj
    )
    if bias.size:
        flat_proj += bias.reshape(1, n_dir * hidden)
    _elman_fwd_serial_kernel(proj, w_hh, h0, lengths, relu, single, False, out, h_n)
    return out, h_n


@njit(**_JIT)
def _previous_states(out, h0, lengths, d):
    """(T*B, H): the state each step of direction d started from (h0 at a sequence's first step)."""
    seq_len, batch, _, hidden = out.shape
    prev = np.zeros((seq_len, batch, hidden), out.dtype)
    for b in range(batch):
        for step in range(lengths[b]):
            t = _time_index(step, lengths[b], d)
            if step == 0:
                prev[t, b] = h0[d, b]
            else:
                prev[t, b] = out[t - 1 if d == 0 else t + 1, b, d]
    return prev.reshape(seq_len * batch, hidden)


@njit(**_JIT)
def _layer_bwd_kernel(grad_out, grad_hn, x, w_ih, w_hh, out, h0, lengths, relu, input_grad):
    seq_len, batch, n_in = x.shape
    n_dir, hidden = w_hh.shape[0], w_hh.shape[1]
    grad_x, grad_h0, grad_w_ih = np.empty_like(x), np.empty_like(h0), np.empty_like(w_ih)
    grad_w_hh, grad_bias = np.empty_like(w_hh), np.empty((n_dir, hidden), x.dtype)
    grad_pre = np.empty_like(out)
    _elman_bwd_serial_kernel(grad_out, grad_hn, out, w_hh, lengths, relu, False, grad_pre, grad_h0)
    flat = grad_pre.reshape(seq_len * batch, n_dir * hidden)
    rows = x.reshape(seq_len * batch, n_in)
    if input_grad:
        _hand_matmul(flat, w_ih.reshape(n_dir * hidden, n_in), grad_x.reshape(seq_len * batch, n_in))
    flat_t = np.ascontiguousarray(flat.T)
    _hand_matmul(flat_t, rows, grad_w_ih.reshape(n_dir * hidden, n_in))
    grad_bias[:] = flat.sum(axis=0).reshape(n_dir, hidden)
    for d in range(n_dir):
        _hand_matmul(flat_t[d * hidden : (d + 1) * hidden], _previous_states(out, h0, lengths, d), grad_w_hh[d])
    return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_bias


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


_OPENBLAS = _scipy_openblas()


_BLAS_LOCK = threading.Lock()
_blas_pins = {"count": 0, "threads_before": 1}


@contextlib.contextmanager
def _single_threaded_blas():
    """Inside an OpenMP region OpenBLAS must not start its own threads (it can deadlock there, and
    would oversubscribe the cores anyway), so pin it to one thread for the call. Counted, so that
    calls from several Python threads restore the user's setting only when the last one ends."""
    with _BLAS_LOCK:
        if _blas_pins["count"] == 0:
            _blas_pins["threads_before"] = _OPENBLAS.scipy_openblas_get_num_threads()
            _OPENBLAS.scipy_openblas_set_num_threads(1)
        _blas_pins["count"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_pins["count"] -= 1
            if _blas_pins["count"] == 0:
                _OPENBLAS.scipy_openblas_set_num_threads(_blas_pins["threads_before"])


def _plan(batch, n_dir, hidden, dtype):
    """(use_blas, rows_per_task); rows_per_task is None where the tasks run serially: one task, or
    one thread (then no parallel region starts, which keeps forked children safe, as in torch)."""
    threads = _threads()
    rows = _rows_per_task(batch, n_dir, threads)
    use_blas = _OPENBLAS is not None and rows >= _BLAS_MIN_ROWS[dtype] and hidden >= _BLAS_MIN_HIDDEN
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


def _launch(parallel_kernel, serial_kernel, args, outputs, batch, n_dir, hidden, dtype):
    use_blas, rows = _plan(batch, n_dir, hidden, dtype)
    with _single_threaded_blas() if use_blas else contextlib.nullcontext():
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


def _arrays(*tensors):
    # force=True detaches in C++ (cheaper than .detach().numpy()). It copies only a tensor off the
    # CPU (ruled out by _check) or with a conj/neg view bit (never set on the real float tensors
    # the launchers allocate, so the outputs the kernels write are never copies).
    return [t.numpy(force=True) for t in tensors]


def _check(lengths, batch, **named):
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


def _check_recurrence(proj, w_hh, lengths, state, **named):
    """proj (or out) (T, B, D, H), w_hh (D, H, H), the (D, B, H) state (h0 or grad_hn) and any other
    tensor shaped like proj."""
    if proj.dim() != 4 or w_hh.shape != (proj.shape[2], proj.shape[3], proj.shape[3]):
        raise ValueError(
            f"expected proj (T, B, D, H) and w_hh (D, H, H), got {tuple(proj.shape)} and {tuple(w_hh.shape)}"
        )
    if state.shape != (proj.shape[2], proj.shape[1], proj.shape[3]) or any(
        t.shape != proj.shape for t in named.values()
    ):
        raise ValueError(f"expected a (D, B, H) state and (T, B, D, H) tensors for proj {tuple(proj.shape)}")
    _check(lengths, proj.shape[1], proj=proj, w_hh=w_hh, state=state, **named)


def elman_forward(proj, w_hh, h0, lengths, relu):
    """Run the recurrence; returns out (T, B, D, H), zero past each length, and h_n (D, B, H)."""
    _check_recurrence(proj, w_hh, lengths, h0)
    _, batch, n_dir, _ = proj.shape
    out = torch.empty_like(proj)
    h_n = torch.empty_like(h0)
    args = (*_arrays(proj, w_hh, h0, lengths), bool(relu), proj.dtype == torch.float32)
    _launch(
        _elman_fwd_kernel, _elman_fwd_serial_kernel, args, _arrays(out, h_n), batch, n_dir, proj.shape[3], proj.dtype
    )
    return out, h_n


def elman_backward(grad_out, grad_hn, out, w_hh, lengths, relu):
    """Reverse recurrence; returns grad_pre (T, B, D, H) = dLoss/dz, and grad_h0 (D, B, H)."""
    _check_recurrence(out, w_hh, lengths, grad_hn, grad_out=grad_out)
    _, batch, n_dir, _ = out.shape
    grad_pre = torch.empty_like(out)
    grad_h0 = torch.empty_like(grad_hn)
    inputs, outputs = _arrays(grad_out, grad_hn, out, w_hh, lengths), _arrays(grad_pre, grad_h0)
    _launch(
        _elman_bwd_kernel,
        _elman_bwd_serial_kernel,
        (*inputs, bool(relu)),
        outputs,
        batch,
        n_dir,
        out.shape[3],
        out.dtype,
    )
    return grad_pre, grad_h0


def fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden):
    """Whether :func:`layer_forward` / :func:`layer_backward` are the faster way to run this layer;
    above this size the caller's multi-threaded GEMMs around the recurrence kernels win."""
    macs = seq_len * batch * n_dir * hidden * (n_in + hidden)
    # Tuned with 2 threads. With more, those GEMMs get faster while the torch-op overhead the
    # whole-layer call saves does not, so the crossover moves down (about 2x in a fixed-overhead
    # cost model; not measured here).
    return macs <= (WHOLE_LAYER_MACS if torch.get_num_threads() <= 2 else WHOLE_LAYER_MACS // 2)


def _check_layer(lengths, x, params, h0, grad_hn=None, **outputs_like):
    """x (T, B, I); params: per direction (w_ih (H, I), w_hh (H, H)[, b_ih (H,)[, b_hh (H,)]]);
    h0 and grad_hn (if given) (D, B, H); outputs_like: tensors shaped (T, B, D, H). Then dtypes,
    devices, contiguity."""
    n_dir, (hidden, n_in) = len(params), params[0][0].shape
    shapes = ((hidden, n_in), (hidden, hidden), (hidden,), (hidden,))
    out_shape = (x.shape[0], x.shape[1], n_dir, hidden)
    fits = 2 <= len(params[0]) <= 4 and x.dim() == 3 and x.shape[2] == n_in and h0.shape == (n_dir, x.shape[1], hidden)
    for t in outputs_like.values():
        fits = fits and t.shape == out_shape
    if grad_hn is not None:
        fits = fits and grad_hn.shape == h0.shape
        outputs_like["grad_hn"] = grad_hn  # for the dtype, device and contiguity checks below
    for p in params:
        fits = fits and len(p) == len(params[0])
        for t, shape in zip(p, shapes):
            fits = fits and t.shape == shape
    if not fits:
        raise ValueError(
            f"expected x (T, B, I), per direction w_ih (H, I), w_hh (H, H) and biases (H,), h0 and grad_hn "
            f"(D, B, H), out and grad_out (T, B, D, H); got x {tuple(x.shape)}, h0 {tuple(h0.shape)}, "
            f"{'' if grad_hn is None else f'grad_hn {tuple(grad_hn.shape)}, '}parameters "
            f"{[[tuple(t.shape) for t in p] for p in params]}"
        )
    _check(lengths, x.shape[1], x=x, h0=h0, **outputs_like)
    for d, p in enumerate(params):
        for i, t in enumerate(p):
            if not (t.is_cpu and t.dtype == x.dtype and t.is_contiguous()):  # named only on error
                _check(lengths, x.shape[1], x=x, **{f"direction {d} parameter {i}": t})


def _stacked_arrays(params, with_bias=True):
    """Per-direction parameter tensors -> NumPy w_ih (D, H, I), w_hh (D, H, H) and bias (D, H) =
    b_ih + b_hh (an empty (0, 0) one without biases or ``with_bias``); in NumPy, at a fraction of
    the cost of torch ops. One direction takes views, two are stacked (copied)."""
    arrays = [[t.numpy(force=True) for t in (p if with_bias else p[:2])] for p in params]
    biases = None if len(arrays[0]) == 2 else [a[2] if len(a) == 3 else a[2] + a[3] for a in arrays]
    if len(arrays) == 1:
        w_ih, w_hh, bias = arrays[0][0][None], arrays[0][1][None], None if biases is None else biases[0][None]
    else:
        w_ih, w_hh = np.stack([a[0] for a in arrays]), np.stack([a[1] for a in arrays])
        bias = None if biases is None else np.stack(biases)
    return w_ih, w_hh, np.empty((0, 0), w_ih.dtype) if bias is None else bias


def layer_forward(x, params, h0, lengths, relu):
    """The whole layer (projection and recurrence) in one call, on one thread: (out (T, B, D, H),
    h_n). params: per direction (w_ih, w_hh[, b_ih[, b_hh]]) as in ``nn.RNN``."""
    _check_layer(lengths, x, params, h0)
    w_ih, w_hh, bias = _stacked_arrays(params)
    x_a, h0_a, lengths_a = _arrays(x, h0, lengths)
    out, h_n = _layer_fwd_kernel(x_a, w_ih, bias, w_hh, h0_a, lengths_a, bool(relu), x.dtype == torch.float32)
    return torch.from_numpy(out), torch.from_numpy(h_n)


def layer_backward(grad_out, grad_hn, x, params, out, h0, lengths, relu, input_grad):
    """Every gradient of a layer in one call, on one thread: (grad_x or None, grad_h0, per direction
    a tuple of gradients matching ``params``; b_hh's is a copy of b_ih's, so that no two .grad
    tensors share memory). ``out`` is (T, B, D, H)."""
    _check_layer(lengths, x, params, h0, grad_hn, grad_out=grad_out, out=out)
    w_ih, w_hh, _ = _stacked_arrays(params, with_bias=False)
    grad_out_a, grad_hn_a, x_a, out_a, h0_a, lengths_a = _arrays(grad_out, grad_hn, x, out, h0, lengths)
    grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_bias = _layer_bwd_kernel(
        grad_out_a, grad_hn_a, x_a, w_ih, w_hh, out_a, h0_a, lengths_a, bool(relu), bool(input_grad)
    )
    n_params = len(params[0])
    # Sliced in NumPy: a torch select per gradient costs more than the slicing and the copy.
    grad_params = [
        tuple(map(torch.from_numpy, (grad_w_ih[d], grad_w_hh[d], grad_bias[d], grad_bias[d].copy())[:n_params]))
        for d in range(len(params))
    ]
    return (torch.from_numpy(grad_x) if input_grad else None), torch.from_numpy(grad_h0), grad_params


def warm_up():
    """Compile (or load from Numba's cache) every kernel variant for float32 and float64, so that a
    first call in a later process only loads them. ``python -m fastrnn.kernels.numba.elman``."""
    for dtype in (torch.float32, torch.float64):
        x, w, h0 = (
            torch.zeros(2, 1, 4, dtype=dtype),
            torch.zeros(1, 4, 4, dtype=dtype),
            torch.zeros(1, 1, 4, dtype=dtype),
        )
        params = [(w[0], w[0])]
        out, h_n = layer_forward(x, params, h0, torch.full((1,), 2), False)
        layer_backward(out, h_n, x, params, out, h0, torch.full((1,), 2), False, True)
        for batch, use_blas in ((1, False), (2, False), (2, True)):
            proj = torch.zeros(2, batch, 1, 4, dtype=dtype)
            h0, lengths = torch.zeros(1, batch, 4, dtype=dtype), torch.full((batch,), 2)
            out, h_n = torch.empty_like(proj), torch.empty_like(h0)
            fwd = (*_arrays(proj, w, h0, lengths), False, dtype == torch.float32)
            bwd = (*_arrays(out, h0, out, w, lengths), False)
            with _single_threaded_blas() if use_blas and _OPENBLAS is not None else contextlib.nullcontext():
                if batch == 1:
                    _elman_fwd_serial_kernel(*fwd, use_blas, *_arrays(out, h_n))
                    _elman_bwd_serial_kernel(*bwd, use_blas, *_arrays(out, h_n))
                else:
                    _elman_fwd_kernel(*fwd, 1, use_blas, *_arrays(out, h_n))
                    _elman_bwd_kernel(*bwd, 1, use_blas, *_arrays(out, h_n))


if __name__ == "__main__":
    warm_up()
