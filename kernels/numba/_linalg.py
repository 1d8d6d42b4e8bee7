"""Small dense products for the Numba kernels: hand GEMMs for the few rows a task multiplies per
step (BLAS repacks W_hh on every call, which costs more than the product at small sizes), row dots
for a single row, and a tiled transpose. After editing this file, delete kernels/numba/__pycache__:
the cell kernels that call these are cached by their own files (see ``_runtime``)."""

import numpy as np
from numba import njit

from ._runtime import JIT as _JIT
from ._runtime import previous_states


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
def hand_matmul(a, w, out):
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
def matmul(a, w, out, use_blas):
    if use_blas:
        np.dot(a, w, out)
    else:
        hand_matmul(a, w, out)


@njit(**_JIT)
def row_dots(v, w_rows, out):
    """out[j] = w_rows[j] . v for one row vector: the single-row step product. Four dot products
    share each load of v, and their sums stay in registers; the four-row ``hand_matmul`` would
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
def recurrent_product(h, w_hh, w_hh_t, d, live, use_blas, out):
    """out[:live] = h[:live] @ W_hh[d]^T, the step's product: row dots against W_hh for a lone
    row, else rows against the transposed copy (hand loop or BLAS)."""
    if live == 1:
        row_dots(h[0], w_hh[d], out[0])
    else:
        matmul(h[:live], w_hh_t[d], out[:live], use_blas)


@njit(**_JIT)
def transposed(w):
    """w[d].T for every direction, contiguous: several rows h @ W_hh^T are multiplied row-wise.
    Copied in 32x32 tiles, so that the strided side stays in cache at large sizes."""
    n_dir, n_rows, n_cols = w.shape
    w_t = np.empty((n_dir, n_cols, n_rows), w.dtype)
    for d in range(n_dir):
        for i0 in range(0, n_rows, 32):
            for j0 in range(0, n_cols, 32):
                for i in range(i0, min(i0 + 32, n_rows)):
                    for j in range(j0, min(j0 + 32, n_cols)):
                        w_t[d, j, i] = w[d, i, j]
    return w_t


@njit(**_JIT)
def transposed_for_rows(w_hh, most_rows):
    """W_hh^T for steps with several rows; a lone row takes dot products with W_hh itself, so
    where no task has more than one row the copy is skipped (w_hh stands in, unread)."""
    return transposed(w_hh) if most_rows > 1 else w_hh


# The GEMMs of the whole-layer kernels, the same for every cell (CONTRACTS.md, "Cells").
@njit(**_JIT)
def project(x, w_ih, bias):
    """x (T, B, I) @ W_ih[d]^T (+ bias[d] unless empty) for every direction -> (T, B, D, G*H)."""
    seq_len, batch, n_in = x.shape
    n_dir, width = w_ih.shape[0], w_ih.shape[1]
    proj = np.empty((seq_len, batch, n_dir, width), x.dtype)
    flat = proj.reshape(seq_len * batch, n_dir * width)
    hand_matmul(x.reshape(seq_len * batch, n_in), np.ascontiguousarray(w_ih.reshape(n_dir * width, n_in).T), flat)
    if bias.size:
        flat += bias.reshape(1, n_dir * width)
    return proj


@njit(**_JIT)
def layer_gradients(grad_proj, grad_rec, separate_rec, x, w_ih, out, h0, lengths, input_grad):
    """(grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh): the input side's from grad_proj and x,
    the recurrent side's from grad_rec (grad_proj itself unless ``separate_rec``) and the
    previous states, each a GEMM over all T*B rows. grad_x is unset unless ``input_grad``."""
    seq_len, batch, n_in = x.shape
    n_dir, width = w_ih.shape[0], w_ih.shape[1]
    hidden = out.shape[3]
    grad_x, grad_w_ih = np.empty_like(x), np.empty_like(w_ih)
    grad_w_hh = np.empty((n_dir, width, hidden), x.dtype)
    flat = grad_proj.reshape(seq_len * batch, n_dir * width)
    if input_grad:
        hand_matmul(flat, w_ih.reshape(n_dir * width, n_in), grad_x.reshape(seq_len * batch, n_in))
    flat_t = np.ascontiguousarray(flat.T)
    hand_matmul(flat_t, x.reshape(seq_len * batch, n_in), grad_w_ih.reshape(n_dir * width, n_in))
    grad_b_ih = flat.sum(axis=0).reshape(n_dir, width)
    rec = grad_rec.reshape(seq_len * batch, n_dir * width) if separate_rec else flat
    rec_t = np.ascontiguousarray(rec.T) if separate_rec else flat_t
    grad_b_hh = rec.sum(axis=0).reshape(n_dir, width) if separate_rec else grad_b_ih
    for d in range(n_dir):
        hand_matmul(rec_t[d * width : (d + 1) * width], previous_states(out, h0, lengths, d), grad_w_hh[d])
    return grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh
