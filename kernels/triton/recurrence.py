"""Persistent Triton kernels of the recurrence, forward and backward, generic over the cell.

Each program owns one direction and a block of BLOCK_B batch rows and walks every time step inside
the kernel, so a whole layer is one launch. The cell is ``CELL``, a ``tl.constexpr`` (the torch
mode string): Triton compiles one kernel per cell and drops the other cells' branches. Two variants:

- ``_recurrence_fwd_kernel`` / ``_recurrence_bwd_kernel``: W_hh[d] is loaded once and kept on chip,
  and the state h (or dh; the LSTM's c and dc too) stays in registers between steps. Used while H,
  padded to a power of two, is at most ``ONCHIP_MAX_H[mode]``. The per-step product is ``tl.dot``
  (tensor cores) for float16/bfloat16 and TF32, and for IEEE float32 a broadcast multiply reduced
  over K on CUDA cores with a few rows per program ("reduce"): tl.dot's float32 FMA lowering spills
  kilobytes per thread at H >= 64.
- ``_recurrence_fwd_tiled_kernel`` / ``_recurrence_bwd_tiled_kernel``: any H. Each step loops over
  N x K tiles of W_hh read from L2, and the previous state is read back from where it was written
  (Elman: ``out`` forward, ``grad_proj`` backward; GRU: a float32 scratch forward, ``grad_rec``
  and a float32 scratch of g * z backward; LSTM: h from ``out`` and c from a float32 scratch
  forward, ``grad_proj`` and a float32 scratch of dc backward), with a CTA barrier between steps.

The LSTM's gates (i, f, g, o) are four N blocks of the one product h_{t-1} @ W_hh[d]^T (one h tile
feeds all four). With proj_size P (W_hr), h and W_hh's columns are P wide: forward adds the product
h_t = m_t @ W_hr[d]^T of m_t = o * tanh(c_t) (on chip in registers; tiled, m_t goes through the
scratch and a barrier first), backward dm = grad_h @ W_hr[d] (tiled: grad_h is stored, then read
back after a barrier).

Block sizes, warps and tiles in ``_launch_config`` were chosen from ptxas resource usage for sm_90
and sm_80 (kernels compiled for both targets with Triton 3.9): GRU's spill nothing; Elman's spill
only in the 32-row tensor-core backward at H = 64 (up to 76 bytes on sm_90); the LSTM's (with and
without W_hr) nothing but 4 bytes in the float32 on-chip backward at H = 64 on sm_80.

Pointwise math, accumulation and the carried state are float32. The matmul operands are the
storage dtype: for float16/bfloat16 the state is rounded to the dtype it is stored in, as
``torch.nn.RNN`` does. float32 matmuls are IEEE unless ``allow_tf32`` (or ``ALLOW_TF32``) opts in.
"""

import torch
import triton
import triton.language as tl

from ._cells import _elman_backward, _elman_forward, _gru_backward, _gru_forward, _lstm_backward, _lstm_forward
from ._common import (
    _block_rows,
    _mm,
    _prev_rows,
    _time_index,
    _zero_tail,
    _zero_tail_tiled,
    check_contiguous,
    check_device,
    check_dtype,
    check_lengths,
    check_shape,
    matmul_mode,
    sm_count,
)

# G (gates: W_hh is (D, G*H, P), P = H but for an LSTM with W_hr) and the H-wide values per step
# that forward saves, per mode.
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}
SAVED = {"RNN_TANH": 0, "RNN_RELU": 0, "GRU": 4, "LSTM": 5}
# Largest padded hidden size that keeps W_hh on chip; above it the tiled kernels run. GRU keeps
# three H x H blocks: at H = 128 its float32 reduce spills (or fits one row per program, at 255
# registers), and its bf16 tl.dot kernels spill and need 100 KiB of shared memory, beyond what
# sm_86/sm_89 give a block (99 KiB). The LSTM keeps four: 128 KiB in bf16 at H = 128.
ONCHIP_MAX_H = {"RNN_TANH": 128, "RNN_RELU": 128, "GRU": 64, "LSTM": 64}
# Tile sizes of the tiled kernels (tl.dot needs every block dim >= 16); None picks them per cell
# and dtype in _tiles.
TILE_N = None
TILE_K = None
# Opt-in TF32 for float32 matmuls (off: results match torch.nn.RNN with TF32 disabled).
ALLOW_TF32 = False


@triton.jit
def _recurrence_fwd_kernel(
    proj_ptr,
    w_ptr,
    b_ptr,
    h0_ptr,
    len_ptr,
    out_ptr,
    hn_ptr,
    saved_ptr,
    c0_ptr,
    cn_ptr,
    whr_ptr,
    T,
    B,
    H,
    P,
    stride_t,
    stride_b,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PROJECT: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = row_ok[:, None] & (cols < H)[None, :]
    if CELL == "LSTM":
        # h, out and W_hh's columns are K = P wide (proj_size with W_hr, else H); the gates, c, proj,
        # saved and the strides passed (stride_t = B*D*H, stride_b = D*H) are H wide.
        K = P
        cols_k = tl.arange(0, BLOCK_P)
        mask_k = row_ok[:, None] & (cols_k < P)[None, :]
        out_stride_b = stride_b // H * P
        out_stride_t = B * out_stride_b
    else:
        K = H
        cols_k = cols
        mask_k = mask
        out_stride_b = stride_b
        out_stride_t = stride_t

    # wt[k, j] = W_hh[d, j, k] (GRU: of the r gate, z and n following H*H apart; LSTM: of i, then
    # f, g, o H*P apart), so that h_proj = h @ wt. Padding is zero, keeping padded columns of h zero.
    wk = tl.arange(0, BLOCK_P)[:, None]
    wj = tl.arange(0, BLOCK_H)[None, :]
    wt = tl.load(w_ptr + d * GATES * H * K + wj * K + wk, mask=(wk < K) & (wj < H), other=0.0)
    if CELL == "GRU":
        wt_z = tl.load(w_ptr + (d * 3 + 1) * H * H + wj * H + wk, mask=(wk < H) & (wj < H), other=0.0)
        wt_n = tl.load(w_ptr + (d * 3 + 2) * H * H + wj * H + wk, mask=(wk < H) & (wj < H), other=0.0)
        bias = b_ptr + d * 3 * H + cols
        b_r = tl.load(bias, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        b_z = tl.load(bias + H, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        b_n = tl.load(bias + 2 * H, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        # saved[t, b, d] = [r, z, n, a_n], each H wide.
        kept = rows[:, None].to(tl.int64) * (4 * stride_b) + d * 4 * H + cols[None, :]
    elif CELL == "LSTM":
        w_mask = (wk < P) & (wj < H)
        wt_f = tl.load(w_ptr + (d * 4 + 1) * H * P + wj * P + wk, mask=w_mask, other=0.0)
        wt_g = tl.load(w_ptr + (d * 4 + 2) * H * P + wj * P + wk, mask=w_mask, other=0.0)
        wt_o = tl.load(w_ptr + (d * 4 + 3) * H * P + wj * P + wk, mask=w_mask, other=0.0)
        if PROJECT:
            # wr[j, p] = W_hr[d, p, j]: h_t = m_t @ wr.
            rj = tl.arange(0, BLOCK_H)[:, None]
            rp = tl.arange(0, BLOCK_P)[None, :]
            wr = tl.load(whr_ptr + d * P * H + rp * H + rj, mask=(rj < H) & (rp < P), other=0.0)
        # saved[t, b, d] = [i, f, g, o, c_t], each H wide; c itself is carried in float32.
        kept = rows[:, None].to(tl.int64) * (5 * stride_b) + d * 5 * H + cols[None, :]
        c_state = d * B * H + rows[:, None] * H + cols[None, :]
        c = tl.load(c0_ptr + c_state, mask=mask, other=0.0).to(tl.float32)

    state = d * B * K + rows[:, None] * K + cols_k[None, :]
    h = tl.load(h0_ptr + state, mask=mask_k, other=0.0).to(tl.float32)
    seq = rows[:, None].to(tl.int64) * out_stride_b + d * K + cols_k[None, :]
    if GATES == 1:
        x_seq = seq
    else:
        # proj rows are GATES times as wide as the H-wide strides: gate g at + g * H.
        x_seq = rows[:, None].to(tl.int64) * (GATES * stride_b) + d * GATES * H + cols[None, :]

    # proj of the next step is loaded one iteration ahead, so its latency hides behind the matmul.
    t = _time_index(0, L, d)
    x = tl.load(
        proj_ptr + t[:, None].to(tl.int64) * (GATES * stride_t) + x_seq, mask=mask & (L > 0)[:, None], other=0.0
    )
    if CELL == "GRU":
        x_ptrs = proj_ptr + t[:, None].to(tl.int64) * (3 * stride_t) + x_seq
        x_z = tl.load(x_ptrs + H, mask=mask & (L > 0)[:, None], other=0.0)
        x_n = tl.load(x_ptrs + 2 * H, mask=mask & (L > 0)[:, None], other=0.0)
    elif CELL == "LSTM":
        x_ptrs = proj_ptr + t[:, None].to(tl.int64) * (4 * stride_t) + x_seq
        x_f = tl.load(x_ptrs + H, mask=mask & (L > 0)[:, None], other=0.0)
        x_g = tl.load(x_ptrs + 2 * H, mask=mask & (L > 0)[:, None], other=0.0)
        x_o = tl.load(x_ptrs + 3 * H, mask=mask & (L > 0)[:, None], other=0.0)
    for s in range(0, n_steps):
        active = (L > s)[:, None]
        ptrs = t[:, None].to(tl.int64) * out_stride_t + seq
        t_next = _time_index(s + 1, L, d)
        x_next = tl.load(
            proj_ptr + t_next[:, None].to(tl.int64) * (GATES * stride_t) + x_seq,
            mask=mask & (L > s + 1)[:, None],
            other=0.0,
        )
        if CELL == "GRU":
            x_ptrs = proj_ptr + t_next[:, None].to(tl.int64) * (3 * stride_t) + x_seq
            m_next = mask & (L > s + 1)[:, None]
            x_z_next = tl.load(x_ptrs + H, mask=m_next, other=0.0)
            x_n_next = tl.load(x_ptrs + 2 * H, mask=m_next, other=0.0)
            a_r = _mm(h, wt, PRECISION, MODE) + b_r
            a_z = _mm(h, wt_z, PRECISION, MODE) + b_z
            a_n = _mm(h, wt_n, PRECISION, MODE) + b_n
            r, z, n, y = _gru_forward(x.to(tl.float32), x_z.to(tl.float32), x_n.to(tl.float32), a_r, a_z, a_n, h)
            keep = saved_ptr + t[:, None].to(tl.int64) * (4 * stride_t) + kept
            keep_ty = saved_ptr.dtype.element_ty
            tl.store(keep, r.to(keep_ty), mask=mask & active)
            tl.store(keep + H, z.to(keep_ty), mask=mask & active)
            tl.store(keep + 2 * H, n.to(keep_ty), mask=mask & active)
            tl.store(keep + 3 * H, a_n.to(keep_ty), mask=mask & active)
            x_z = x_z_next
            x_n = x_n_next
        elif CELL == "LSTM":
            x_ptrs = proj_ptr + t_next[:, None].to(tl.int64) * (4 * stride_t) + x_seq
            m_next = mask & (L > s + 1)[:, None]
            x_f_next = tl.load(x_ptrs + H, mask=m_next, other=0.0)
            x_g_next = tl.load(x_ptrs + 2 * H, mask=m_next, other=0.0)
            x_o_next = tl.load(x_ptrs + 3 * H, mask=m_next, other=0.0)
            # The four gates' parts of one product h @ W_hh[d]^T.
            i, f, g, o, c_new, m = _lstm_forward(
                x.to(tl.float32) + _mm(h, wt, PRECISION, MODE),
                x_f.to(tl.float32) + _mm(h, wt_f, PRECISION, MODE),
                x_g.to(tl.float32) + _mm(h, wt_g, PRECISION, MODE),
                x_o.to(tl.float32) + _mm(h, wt_o, PRECISION, MODE),
                c,
            )
            keep = saved_ptr + t[:, None].to(tl.int64) * (5 * stride_t) + kept
            keep_ty = saved_ptr.dtype.element_ty
            tl.store(keep, i.to(keep_ty), mask=mask & active)
            tl.store(keep + H, f.to(keep_ty), mask=mask & active)
            tl.store(keep + 2 * H, g.to(keep_ty), mask=mask & active)
            tl.store(keep + 3 * H, o.to(keep_ty), mask=mask & active)
            tl.store(keep + 4 * H, c_new.to(keep_ty), mask=mask & active)
            c = tl.where(active, c_new, c)
            if PROJECT:
                y = _mm(m, wr, PRECISION, MODE)
            else:
                y = m
            x_f = x_f_next
            x_g = x_g_next
            x_o = x_o_next
        else:
            z = x.to(tl.float32) + _mm(h, wt, PRECISION, MODE)
            y = _elman_forward(z, CELL)
        h = tl.where(active, y, h)
        tl.store(out_ptr + ptrs, tl.where(active, y, 0.0).to(out_ptr.dtype.element_ty), mask=mask_k)
        t = t_next
        x = x_next
    _zero_tail(out_ptr, seq, n_steps, T, out_stride_t, K, mask_k, 1, BLOCK_B, BLOCK_P)
    tl.store(hn_ptr + state, h.to(hn_ptr.dtype.element_ty), mask=mask_k)
    if CELL == "LSTM":
        tl.store(cn_ptr + c_state, c.to(cn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _recurrence_bwd_kernel(
    gout_ptr,
    ghn_ptr,
    out_ptr,
    saved_ptr,
    w_ptr,
    h0_ptr,
    len_ptr,
    gproj_ptr,
    grec_ptr,
    gh0_ptr,
    gcn_ptr,
    c0_ptr,
    whr_ptr,
    gc0_ptr,
    gh_ptr,
    T,
    B,
    H,
    P,
    stride_t,
    stride_b,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PROJECT: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = row_ok[:, None] & (cols < H)[None, :]
    if CELL == "LSTM":
        # As in forward: dh, grad_out and W_hh's columns are K = P wide, the rest H wide.
        K = P
        cols_k = tl.arange(0, BLOCK_P)
        mask_k = row_ok[:, None] & (cols_k < P)[None, :]
        out_stride_b = stride_b // H * P
        out_stride_t = B * out_stride_b
    else:
        K = H
        cols_k = cols
        mask_k = mask
        out_stride_b = stride_b
        out_stride_t = stride_t

    # w[j, k] = W_hh[d, j, k] (GRU: r gate, z and n H*H apart; LSTM: i, then f, g, o H*P apart):
    # dh_prev = dz @ W_hh[d] (no transpose).
    wj = tl.arange(0, BLOCK_H)[:, None]
    wk = tl.arange(0, BLOCK_P)[None, :]
    w_mask = (wj < H) & (wk < K)
    w = tl.load(w_ptr + d * GATES * H * K + wj * K + wk, mask=w_mask, other=0.0)

    state = d * B * K + rows[:, None] * K + cols_k[None, :]
    dh = tl.load(ghn_ptr + state, mask=mask_k, other=0.0).to(tl.float32)
    seq = rows[:, None].to(tl.int64) * out_stride_b + d * K + cols_k[None, :]
    x_seq = rows[:, None].to(tl.int64) * (GATES * stride_b) + d * GATES * H + cols[None, :]

    s_last = n_steps - 1
    t = _time_index(s_last, L, d)
    ptrs = t[:, None].to(tl.int64) * out_stride_t + seq
    # tl.where, not &, with the scalar condition: the interpreter rejects bool-scalar & block masks.
    first = tl.where(s_last >= 0, L > s_last, False)[:, None]
    m_first = mask & first
    go = tl.load(gout_ptr + ptrs, mask=mask_k & first, other=0.0)
    if CELL == "GRU":
        w_z = tl.load(w_ptr + (d * 3 + 1) * H * H + wj * H + wk, mask=w_mask, other=0.0)
        w_n = tl.load(w_ptr + (d * 3 + 2) * H * H + wj * H + wk, mask=w_mask, other=0.0)
        kept = rows[:, None].to(tl.int64) * (4 * stride_b) + d * 4 * H + cols[None, :]
        h0_rows = h0_ptr + d * B * H + rows * H
        out_rows = out_ptr + rows.to(tl.int64) * stride_b + d * H
        keep = saved_ptr + t[:, None].to(tl.int64) * (4 * stride_t) + kept
        r = tl.load(keep, mask=m_first, other=0.0)
        z = tl.load(keep + H, mask=m_first, other=0.0)
        n = tl.load(keep + 2 * H, mask=m_first, other=0.0)
        a_n = tl.load(keep + 3 * H, mask=m_first, other=0.0)
        h_prev = tl.load(_prev_rows(s_last, L, d, h0_rows, out_rows, stride_t)[:, None] + cols[None, :], mask=m_first)
    elif CELL == "LSTM":
        w_f = tl.load(w_ptr + (d * 4 + 1) * H * P + wj * P + wk, mask=w_mask, other=0.0)
        w_g = tl.load(w_ptr + (d * 4 + 2) * H * P + wj * P + wk, mask=w_mask, other=0.0)
        w_o = tl.load(w_ptr + (d * 4 + 3) * H * P + wj * P + wk, mask=w_mask, other=0.0)
        if PROJECT:
            # wr[p, j] = W_hr[d, p, j]: dm = dLoss/dh @ wr.
            rp = tl.arange(0, BLOCK_P)[:, None]
            rj = tl.arange(0, BLOCK_H)[None, :]
            wr = tl.load(whr_ptr + d * P * H + rp * H + rj, mask=(rp < P) & (rj < H), other=0.0)
        c_state = d * B * H + rows[:, None] * H + cols[None, :]
        dc = tl.load(gcn_ptr + c_state, mask=mask, other=0.0).to(tl.float32)
        kept = rows[:, None].to(tl.int64) * (5 * stride_b) + d * 5 * H + cols[None, :]
        # c_{t-1}: c0 at a sequence's first step, else the c_t saved by the step before.
        c0_rows = c0_ptr + d * B * H + rows * H
        c_rows = saved_ptr + rows.to(tl.int64) * (5 * stride_b) + d * 5 * H + 4 * H
        keep = saved_ptr + t[:, None].to(tl.int64) * (5 * stride_t) + kept
        i = tl.load(keep, mask=m_first, other=0.0)
        f = tl.load(keep + H, mask=m_first, other=0.0)
        g = tl.load(keep + 2 * H, mask=m_first, other=0.0)
        o = tl.load(keep + 3 * H, mask=m_first, other=0.0)
        c = tl.load(keep + 4 * H, mask=m_first, other=0.0)
        c_prev = tl.load(_prev_rows(s_last, L, d, c0_rows, c_rows, 5 * stride_t)[:, None] + cols[None, :], mask=m_first)
    else:
        y = tl.load(out_ptr + ptrs, mask=m_first, other=0.0)
    for it in range(0, n_steps):
        s = n_steps - 1 - it
        active = (L > s)[:, None]
        # Prefetch the step processed next (s - 1) before the dependent matmul.
        t_next = _time_index(s - 1, L, d)
        ptrs_next = t_next[:, None].to(tl.int64) * out_stride_t + seq
        more = tl.where(s > 0, L > s - 1, False)[:, None]
        m_next = mask & more
        go_next = tl.load(gout_ptr + ptrs_next, mask=mask_k & more, other=0.0)
        if CELL == "GRU":
            keep = saved_ptr + t_next[:, None].to(tl.int64) * (4 * stride_t) + kept
            r_next = tl.load(keep, mask=m_next, other=0.0)
            z_next = tl.load(keep + H, mask=m_next, other=0.0)
            n_next = tl.load(keep + 2 * H, mask=m_next, other=0.0)
            a_n_next = tl.load(keep + 3 * H, mask=m_next, other=0.0)
            prev_next = _prev_rows(s - 1, L, d, h0_rows, out_rows, stride_t)[:, None] + cols[None, :]
            h_prev_next = tl.load(prev_next, mask=m_next, other=0.0)

            g = go.to(tl.float32) + dh
            r32 = r.to(tl.float32)
            z32 = z.to(tl.float32)
            dr, dz, dn = _gru_backward(g, r32, z32, n.to(tl.float32), a_n.to(tl.float32), h_prev.to(tl.float32))
            # Rounded once: the stored gradients are what the matmul multiplies.
            dt = gproj_ptr.dtype.element_ty
            dr = tl.where(active, dr, 0.0).to(dt)
            dz = tl.where(active, dz, 0.0).to(dt)
            dn_r = tl.where(active, dn * r32, 0.0).to(dt)
            dn = tl.where(active, dn, 0.0).to(dt)
            x_ptrs = t[:, None].to(tl.int64) * (3 * stride_t) + x_seq
            tl.store(gproj_ptr + x_ptrs, dr, mask=mask)
            tl.store(gproj_ptr + x_ptrs + H, dz, mask=mask)
            tl.store(gproj_ptr + x_ptrs + 2 * H, dn, mask=mask)
            tl.store(grec_ptr + x_ptrs, dr, mask=mask)
            tl.store(grec_ptr + x_ptrs + H, dz, mask=mask)
            tl.store(grec_ptr + x_ptrs + 2 * H, dn_r, mask=mask)
            dh_rec = _mm(dr, w, PRECISION, MODE) + _mm(dz, w_z, PRECISION, MODE) + _mm(dn_r, w_n, PRECISION, MODE)
            dh = tl.where(active, g * z32 + dh_rec, dh)
            r = r_next
            z = z_next
            n = n_next
            a_n = a_n_next
            h_prev = h_prev_next
            t = t_next
        elif CELL == "LSTM":
            keep = saved_ptr + t_next[:, None].to(tl.int64) * (5 * stride_t) + kept
            i_next = tl.load(keep, mask=m_next, other=0.0)
            f_next = tl.load(keep + H, mask=m_next, other=0.0)
            g_next = tl.load(keep + 2 * H, mask=m_next, other=0.0)
            o_next = tl.load(keep + 3 * H, mask=m_next, other=0.0)
            c_next = tl.load(keep + 4 * H, mask=m_next, other=0.0)
            prev_next = _prev_rows(s - 1, L, d, c0_rows, c_rows, 5 * stride_t)[:, None] + cols[None, :]
            c_prev_next = tl.load(prev_next, mask=m_next, other=0.0)

            g_h = go.to(tl.float32) + dh  # dLoss/dh_t in full
            if PROJECT:
                tl.store(gh_ptr + ptrs, tl.where(active, g_h, 0.0).to(gh_ptr.dtype.element_ty), mask=mask_k)
                dm = _mm(g_h, wr, PRECISION, MODE)
            else:
                dm = g_h
            gates = (i.to(tl.float32), f.to(tl.float32), g.to(tl.float32), o.to(tl.float32))
            di, df, dg, do, dc_prev = _lstm_backward(dm, dc, *gates, c.to(tl.float32), c_prev.to(tl.float32))
            # Rounded once: the stored gradients are what the matmul multiplies.
            dt = gproj_ptr.dtype.element_ty
            di = tl.where(active, di, 0.0).to(dt)
            df = tl.where(active, df, 0.0).to(dt)
            dg = tl.where(active, dg, 0.0).to(dt)
            do = tl.where(active, do, 0.0).to(dt)
            x_ptrs = gproj_ptr + t[:, None].to(tl.int64) * (4 * stride_t) + x_seq
            tl.store(x_ptrs, di, mask=mask)
            tl.store(x_ptrs + H, df, mask=mask)
            tl.store(x_ptrs + 2 * H, dg, mask=mask)
            tl.store(x_ptrs + 3 * H, do, mask=mask)
            # The four gates' parts of one product [di, df, dg, do] @ W_hh[d].
            dh_rec = (
                _mm(di, w, PRECISION, MODE)
                + _mm(df, w_f, PRECISION, MODE)
                + _mm(dg, w_g, PRECISION, MODE)
                + _mm(do, w_o, PRECISION, MODE)
            )
            dh = tl.where(active, dh_rec, dh)
            dc = tl.where(active, dc_prev, dc)
            i = i_next
            f = f_next
            g = g_next
            o = o_next
            c = c_next
            c_prev = c_prev_next
            t = t_next
        else:
            y_next = tl.load(out_ptr + ptrs_next, mask=m_next, other=0.0)
            dz = _elman_backward(go.to(tl.float32) + dh, y.to(tl.float32), CELL)
            dz = tl.where(active, dz, 0.0)
            dz = dz.to(gproj_ptr.dtype.element_ty)
            tl.store(gproj_ptr + ptrs, dz, mask=mask)
            dh = tl.where(active, _mm(dz, w, PRECISION, MODE), dh)
            y = y_next
        ptrs = ptrs_next
        go = go_next
    _zero_tail(gproj_ptr, x_seq, n_steps, T, GATES * stride_t, H, mask, GATES, BLOCK_B, BLOCK_H)
    if CELL == "GRU":
        _zero_tail(grec_ptr, x_seq, n_steps, T, 3 * stride_t, H, mask, 3, BLOCK_B, BLOCK_H)
    elif CELL == "LSTM":
        tl.store(gc0_ptr + c_state, dc.to(gc0_ptr.dtype.element_ty), mask=mask)
        if PROJECT:
            _zero_tail(gh_ptr, seq, n_steps, T, out_stride_t, P, mask_k, 1, BLOCK_B, BLOCK_P)
    tl.store(gh0_ptr + state, dh.to(gh0_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _recurrence_fwd_tiled_kernel(
    proj_ptr,
    w_ptr,
    b_ptr,
    h0_ptr,
    len_ptr,
    out_ptr,
    hn_ptr,
    saved_ptr,
    c0_ptr,
    cn_ptr,
    whr_ptr,
    scratch_ptr,
    T,
    B,
    H,
    P,
    stride_t,
    stride_b,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PROJECT: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    if CELL == "LSTM":
        # h, out and W_hh's columns are K = P wide, the rest H wide (see _recurrence_fwd_kernel).
        K = P
        out_stride_b = stride_b // H * P
        out_stride_t = B * out_stride_b
    else:
        K = H
        out_stride_b = stride_b
        out_stride_t = stride_t
    w_base = w_ptr + d * GATES * H * K
    seq = rows.to(tl.int64) * out_stride_b + d * K  # (BLOCK_B,) offset of each row's (b, d) slice
    h0_rows = h0_ptr + d * B * K + rows * K
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)

    if CELL == "GRU":
        # GRU reads h_{t-1} pointwise too, so the state is carried in float32 scratch (2, D, B, H),
        # step s writing buffer s % 2 and reading the other; the launcher puts h0 in buffer 1.
        x_seq = rows.to(tl.int64) * (3 * stride_b) + d * 3 * H
        kept = rows.to(tl.int64) * (4 * stride_b) + d * 4 * H
        state_rows = scratch_ptr + d * B * H + rows * H
        for s in range(0, n_steps):
            active = (L > s) & row_ok
            t = _time_index(s, L, d)
            prev_rows = state_rows + ((s + 1) % 2) * stride_t
            cur_rows = state_rows + (s % 2) * stride_t
            dst_rows = out_ptr + t.to(tl.int64) * stride_t + seq
            src_rows = proj_ptr + t.to(tl.int64) * (3 * stride_t) + x_seq
            keep_rows = saved_ptr + t.to(tl.int64) * (4 * stride_t) + kept
            for n0 in range(0, H, BLOCK_N):
                cn = n0 + rn
                n_ok = (cn < H)[None, :]
                m_n = active[:, None] & n_ok
                b_r = tl.load(b_ptr + d * 3 * H + cn, mask=cn < H, other=0.0).to(tl.float32)[None, :]
                b_z = tl.load(b_ptr + d * 3 * H + H + cn, mask=cn < H, other=0.0).to(tl.float32)[None, :]
                b_n = tl.load(b_ptr + d * 3 * H + 2 * H + cn, mask=cn < H, other=0.0).to(tl.float32)[None, :]
                a_r = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32) + b_r
                a_z = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32) + b_z
                a_n = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32) + b_n
                for k0 in range(0, H, BLOCK_K):
                    ck = k0 + rk
                    # .cg: bypass L1, the state was written by other threads of this CTA.
                    hp = tl.load(
                        prev_rows[:, None] + ck[None, :],
                        mask=active[:, None] & (ck < H)[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    w_tile = w_base + cn[None, :] * H + ck[:, None]
                    w_mask = (ck < H)[:, None] & n_ok
                    a_r += _mm(hp, tl.load(w_tile, mask=w_mask, other=0.0), PRECISION, MODE)
                    a_z += _mm(hp, tl.load(w_tile + H * H, mask=w_mask, other=0.0), PRECISION, MODE)
                    a_n += _mm(hp, tl.load(w_tile + 2 * H * H, mask=w_mask, other=0.0), PRECISION, MODE)
                src = src_rows[:, None] + cn[None, :]
                x_r = tl.load(src, mask=m_n, other=0.0).to(tl.float32)
                x_z = tl.load(src + H, mask=m_n, other=0.0).to(tl.float32)
                x_n = tl.load(src + 2 * H, mask=m_n, other=0.0).to(tl.float32)
                h = tl.load(prev_rows[:, None] + cn[None, :], mask=m_n, other=0.0, cache_modifier=".cg")
                r, z, n, y = _gru_forward(x_r, x_z, x_n, a_r, a_z, a_n, h)
                tl.store(cur_rows[:, None] + cn[None, :], y, mask=m_n)
                y = tl.where(active[:, None], y, 0.0)  # finished rows write zeros at t = s
                tl.store(
                    dst_rows[:, None] + cn[None, :],
                    y.to(out_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & n_ok,
                )
                keep = keep_rows[:, None] + cn[None, :]
                keep_ty = saved_ptr.dtype.element_ty
                tl.store(keep, r.to(keep_ty), mask=m_n)
                tl.store(keep + H, z.to(keep_ty), mask=m_n)
                tl.store(keep + 2 * H, n.to(keep_ty), mask=m_n)
                tl.store(keep + 3 * H, a_n.to(keep_ty), mask=m_n)
            tl.debug_barrier()  # make this step's state visible to the whole CTA before the next reads it
    elif CELL == "LSTM":
        # h_{t-1} is read back from out, as Elman's; c is carried in float32 scratch (2 or 3, D, B, H):
        # step s reads buffer (s + 1) % 2 and writes buffer s % 2 (the launcher puts c0 in buffer 1),
        # and with W_hr buffer 2 holds m_t = o * tanh(c_t) for the second product, h_t = m_t @ W_hr^T.
        x_seq = rows.to(tl.int64) * (4 * stride_b) + d * 4 * H
        kept = rows.to(tl.int64) * (5 * stride_b) + d * 5 * H
        c_rows = scratch_ptr + d * B * H + rows * H
        m_rows = c_rows + 2 * stride_t
        keep_ty = saved_ptr.dtype.element_ty
        for s in range(0, n_steps):
            active = (L > s) & row_ok
            t = _time_index(s, L, d)
            t_prev = tl.where(d == 0, s - 1, L - s)
            prev_rows = tl.where(s == 0, h0_rows, out_ptr + t_prev.to(tl.int64) * out_stride_t + seq)
            c_prev_rows = c_rows + ((s + 1) % 2) * stride_t
            c_cur_rows = c_rows + (s % 2) * stride_t
            dst_rows = out_ptr + t.to(tl.int64) * out_stride_t + seq
            src_rows = proj_ptr + t.to(tl.int64) * (4 * stride_t) + x_seq
            keep_rows = saved_ptr + t.to(tl.int64) * (5 * stride_t) + kept
            for n0 in range(0, H, BLOCK_N):
                cn = n0 + rn
                n_ok = (cn < H)[None, :]
                m_n = active[:, None] & n_ok
                src = src_rows[:, None] + cn[None, :]
                z_i = tl.load(src, mask=m_n, other=0.0).to(tl.float32)
                z_f = tl.load(src + H, mask=m_n, other=0.0).to(tl.float32)
                z_g = tl.load(src + 2 * H, mask=m_n, other=0.0).to(tl.float32)
                z_o = tl.load(src + 3 * H, mask=m_n, other=0.0).to(tl.float32)
                # The four gates' N tiles of one product h_{t-1} @ W_hh[d]^T, sharing each h tile.
                for k0 in range(0, P, BLOCK_K):
                    ck = k0 + rk
                    # .cg: bypass L1, the state was written by other threads of this CTA.
                    hp = tl.load(
                        prev_rows[:, None] + ck[None, :],
                        mask=active[:, None] & (ck < P)[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    w_tile = w_base + cn[None, :] * P + ck[:, None]
                    w_mask = (ck < P)[:, None] & n_ok
                    z_i += _mm(hp, tl.load(w_tile, mask=w_mask, other=0.0), PRECISION, MODE)
                    z_f += _mm(hp, tl.load(w_tile + H * P, mask=w_mask, other=0.0), PRECISION, MODE)
                    z_g += _mm(hp, tl.load(w_tile + 2 * H * P, mask=w_mask, other=0.0), PRECISION, MODE)
                    z_o += _mm(hp, tl.load(w_tile + 3 * H * P, mask=w_mask, other=0.0), PRECISION, MODE)
                c = tl.load(c_prev_rows[:, None] + cn[None, :], mask=m_n, other=0.0, cache_modifier=".cg")
                i, f, g, o, c, m = _lstm_forward(z_i, z_f, z_g, z_o, c)
                tl.store(c_cur_rows[:, None] + cn[None, :], c, mask=m_n)
                keep = keep_rows[:, None] + cn[None, :]
                tl.store(keep, i.to(keep_ty), mask=m_n)
                tl.store(keep + H, f.to(keep_ty), mask=m_n)
                tl.store(keep + 2 * H, g.to(keep_ty), mask=m_n)
                tl.store(keep + 3 * H, o.to(keep_ty), mask=m_n)
                tl.store(keep + 4 * H, c.to(keep_ty), mask=m_n)
                if PROJECT:
                    tl.store(m_rows[:, None] + cn[None, :], m, mask=m_n)
                else:
                    m = tl.where(active[:, None], m, 0.0)  # finished rows write zeros at t = s
                    tl.store(
                        dst_rows[:, None] + cn[None, :], m.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok
                    )
            if PROJECT:
                tl.debug_barrier()  # all of m_t before its product
                for n0 in range(0, P, BLOCK_N):
                    cn = n0 + rn
                    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                    for k0 in range(0, H, BLOCK_K):
                        ck = k0 + rk
                        mk = tl.load(
                            m_rows[:, None] + ck[None, :],
                            mask=active[:, None] & (ck < H)[None, :],
                            other=0.0,
                            cache_modifier=".cg",
                        )
                        # W_hr[d, p, j] at [j, p]: h_t = m_t @ W_hr[d]^T.
                        wr = tl.load(
                            whr_ptr + d * P * H + cn[None, :] * H + ck[:, None],
                            mask=(ck < H)[:, None] & (cn < P)[None, :],
                            other=0.0,
                        )
                        acc += _mm(mk, wr, PRECISION, MODE)
                    acc = tl.where(active[:, None], acc, 0.0)
                    tl.store(
                        dst_rows[:, None] + cn[None, :],
                        acc.to(out_ptr.dtype.element_ty),
                        mask=row_ok[:, None] & (cn < P)[None, :],
                    )
            tl.debug_barrier()  # make this step's state visible to the whole CTA before the next reads it
    else:
        for s in range(0, n_steps):
            active = (L > s) & row_ok
            t = _time_index(s, L, d)
            # h_{prev}: h0 at the first step, else the state this program wrote to out one step ago.
            t_prev = tl.where(d == 0, s - 1, L - s)
            prev_rows = tl.where(s == 0, h0_rows, out_ptr + t_prev.to(tl.int64) * stride_t + seq)
            dst_rows = out_ptr + t.to(tl.int64) * stride_t + seq
            src_rows = proj_ptr + t.to(tl.int64) * stride_t + seq
            for n0 in range(0, H, BLOCK_N):
                cn = n0 + rn
                m_n = active[:, None] & (cn < H)[None, :]
                acc = tl.load(src_rows[:, None] + cn[None, :], mask=m_n, other=0.0).to(tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    ck = k0 + rk
                    # .cg: bypass L1, the state was written by other threads of this CTA.
                    hp = tl.load(
                        prev_rows[:, None] + ck[None, :],
                        mask=active[:, None] & (ck < H)[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    wt = tl.load(
                        w_base + cn[None, :] * H + ck[:, None], mask=(ck < H)[:, None] & (cn < H)[None, :], other=0.0
                    )
                    acc += _mm(hp, wt, PRECISION, MODE)
                y = _elman_forward(acc, CELL)
                y = tl.where(active[:, None], y, 0.0)  # finished rows write zeros at t = s
                tl.store(
                    dst_rows[:, None] + cn[None, :],
                    y.to(out_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & (cn < H)[None, :],
                )
            tl.debug_barrier()  # make this step's state visible to the whole CTA before the next reads it

    _zero_tail_tiled(out_ptr, seq, n_steps, T, out_stride_t, K, row_ok, 1, BLOCK_B, BLOCK_N)
    if CELL == "GRU":
        # h_n: the buffer of the last step written ((L - 1) % 2), which is h0's for empty sequences.
        last_rows = state_rows + ((L + 1) % 2) * stride_t
    else:
        # h_n: the last state written (t = L-1 forward, t = 0 reversed), or h0 for empty sequences.
        t_last = tl.where(d == 0, L - 1, 0)
        last_rows = tl.where(L > 0, out_ptr + t_last.to(tl.int64) * out_stride_t + seq, h0_rows)
    hn_rows = hn_ptr + d * B * K + rows * K
    for n0 in range(0, K, BLOCK_N):
        cn = n0 + rn
        m_n = row_ok[:, None] & (cn < K)[None, :]
        hv = tl.load(last_rows[:, None] + cn[None, :], mask=m_n, other=0.0, cache_modifier=".cg")
        tl.store(hn_rows[:, None] + cn[None, :], hv.to(hn_ptr.dtype.element_ty), mask=m_n)
    if CELL == "LSTM":
        # c_n: the buffer of the last step written, c0's (buffer 1) for empty sequences.
        last_rows = c_rows + ((L + 1) % 2) * stride_t
        cn_rows = cn_ptr + d * B * H + rows * H
        for n0 in range(0, H, BLOCK_N):
            cn = n0 + rn
            m_n = row_ok[:, None] & (cn < H)[None, :]
            cv = tl.load(last_rows[:, None] + cn[None, :], mask=m_n, other=0.0, cache_modifier=".cg")
            tl.store(cn_rows[:, None] + cn[None, :], cv.to(cn_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _lstm_bwd_tile(
    dm, cn, s, t, L, d, active, row_ok, H, stride_t, saved_ptr, kept, c0_rows, dc_rows, gcn_rows, gproj_ptr, x_seq
):
    """The LSTM's pointwise backward of processing step s (time t) for the H columns cn, in the tiled
    kernel: dm = dLoss/dm_t of these columns in, [di, df, dg, do] to grad_proj and dLoss/dc_{t-1}
    to dc_rows' buffer s % 2 out. dLoss/dc_t is buffer (s + 1) % 2, or grad_c_n at a row's last step."""
    n_ok = (cn < H)[None, :]
    m_n = active[:, None] & n_ok
    keep = saved_ptr + t.to(tl.int64)[:, None] * (5 * stride_t) + kept[:, None] + cn[None, :]
    i = tl.load(keep, mask=m_n, other=0.0).to(tl.float32)
    f = tl.load(keep + H, mask=m_n, other=0.0).to(tl.float32)
    g = tl.load(keep + 2 * H, mask=m_n, other=0.0).to(tl.float32)
    o = tl.load(keep + 3 * H, mask=m_n, other=0.0).to(tl.float32)
    c = tl.load(keep + 4 * H, mask=m_n, other=0.0).to(tl.float32)
    # c_{t-1}: c0 at a sequence's first step, else the c_t saved by the step before.
    prev = _prev_rows(s, L, d, c0_rows, saved_ptr + kept + 4 * H, 5 * stride_t)
    c_prev = tl.load(prev[:, None] + cn[None, :], mask=m_n, other=0.0).to(tl.float32)
    has_next = (L > s + 1) & row_ok
    dc = tl.load(gcn_rows[:, None] + cn[None, :], mask=(active & ~has_next)[:, None] & n_ok, other=0.0)
    dc_next = dc_rows + ((s + 1) % 2) * stride_t
    dc = dc.to(tl.float32) + tl.load(
        dc_next[:, None] + cn[None, :], mask=has_next[:, None] & n_ok, other=0.0, cache_modifier=".cg"
    )
    di, df, dg, do, dc_prev = _lstm_backward(dm, dc, i, f, g, o, c, c_prev)
    dt = gproj_ptr.dtype.element_ty
    x_ptrs = gproj_ptr + t.to(tl.int64)[:, None] * (4 * stride_t) + x_seq[:, None] + cn[None, :]
    m_w = row_ok[:, None] & n_ok
    tl.store(x_ptrs, tl.where(active[:, None], di, 0.0).to(dt), mask=m_w)
    tl.store(x_ptrs + H, tl.where(active[:, None], df, 0.0).to(dt), mask=m_w)
    tl.store(x_ptrs + 2 * H, tl.where(active[:, None], dg, 0.0).to(dt), mask=m_w)
    tl.store(x_ptrs + 3 * H, tl.where(active[:, None], do, 0.0).to(dt), mask=m_w)
    dc_cur = dc_rows + (s % 2) * stride_t
    tl.store(dc_cur[:, None] + cn[None, :], dc_prev, mask=m_n)


@triton.jit
def _recurrence_bwd_tiled_kernel(
    gout_ptr,
    ghn_ptr,
    out_ptr,
    saved_ptr,
    w_ptr,
    h0_ptr,
    len_ptr,
    gproj_ptr,
    grec_ptr,
    gh0_ptr,
    gcn_ptr,
    c0_ptr,
    whr_ptr,
    gc0_ptr,
    gh_ptr,
    scratch_ptr,
    T,
    B,
    H,
    P,
    stride_t,
    stride_b,
    CELL: tl.constexpr,
    GATES: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PROJECT: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    if CELL == "LSTM":
        # dh, grad_out and W_hh's columns are K = P wide, the rest H wide (see _recurrence_fwd_kernel).
        K = P
        out_stride_b = stride_b // H * P
        out_stride_t = B * out_stride_b
    else:
        K = H
        out_stride_b = stride_b
        out_stride_t = stride_t
    w_base = w_ptr + d * GATES * H * K
    seq = rows.to(tl.int64) * out_stride_b + d * K
    x_seq = rows.to(tl.int64) * (GATES * stride_b) + d * GATES * H
    ghn_rows = ghn_ptr + d * B * K + rows * K
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if CELL == "GRU":
        kept = rows.to(tl.int64) * (4 * stride_b) + d * 4 * H
        h0_rows = h0_ptr + d * B * H + rows * H
        out_rows = out_ptr + seq
        # g * z of step s + 1 (dLoss/dh_s minus its W_hh part), float32 scratch (2, D, B, H) that
        # step s reads from buffer (s + 1) % 2 while writing buffer s % 2.
        gz_rows = scratch_ptr + d * B * H + rows * H
        rec_ptr = grec_ptr
    elif CELL == "LSTM":
        kept = rows.to(tl.int64) * (5 * stride_b) + d * 5 * H
        c0_rows = c0_ptr + d * B * H + rows * H
        gcn_rows = gcn_ptr + d * B * H + rows * H
        # dLoss/dc_s (from step s + 1) in float32 scratch (2, D, B, H), read and written as gz_rows.
        dc_rows = scratch_ptr + d * B * H + rows * H
        rec_ptr = gproj_ptr  # LSTM's grad_rec is grad_proj
    else:
        rec_ptr = gproj_ptr  # Elman's grad_rec is grad_proj

    # Processing step s (walked from the last one down) needs dh_s = dz_{s+1} @ W_hh[d], with
    # dz_{s+1} read back from grad_rec (Elman, LSTM: grad_proj, the same), or grad_hn for a row
    # whose step s+1 does not exist. The N tiles span h's width (LSTM: P), the K tiles G*H.
    for i in range(0, n_steps + 1):
        s = n_steps - 1 - i  # s = -1 is the extra pass that produces grad_h0
        active = (L > s) & row_ok
        has_next = (L > s + 1) & row_ok
        t = _time_index(s, L, d)
        t_next = _time_index(s + 1, L, d)
        next_rows = rec_ptr + t_next.to(tl.int64) * (GATES * stride_t) + x_seq
        for n0 in range(0, K, BLOCK_N):
            cn = n0 + rn
            n_ok = (cn < K)[None, :]
            dh = tl.load(ghn_rows[:, None] + cn[None, :], mask=(active & ~has_next)[:, None] & n_ok, other=0.0).to(
                tl.float32
            )
            if CELL == "GRU":
                gz_next = gz_rows + ((s + 1) % 2) * stride_t
                dh += tl.load(
                    gz_next[:, None] + cn[None, :], mask=has_next[:, None] & n_ok, other=0.0, cache_modifier=".cg"
                )
            for k0 in range(0, H, BLOCK_K):
                ck = k0 + rk
                for g in tl.static_range(GATES):
                    dzn = tl.load(
                        next_rows[:, None] + g * H + ck[None, :],
                        mask=has_next[:, None] & (ck < H)[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    w = tl.load(
                        w_base + (g * H + ck[:, None]) * K + cn[None, :], mask=(ck < H)[:, None] & n_ok, other=0.0
                    )
                    dh += _mm(dzn, w, PRECISION, MODE)
            if s >= 0:
                ptrs = t.to(tl.int64)[:, None] * out_stride_t + seq[:, None] + cn[None, :]
                m_n = active[:, None] & n_ok
                go = tl.load(gout_ptr + ptrs, mask=m_n, other=0.0).to(tl.float32)
                if CELL == "GRU":
                    keep = saved_ptr + t.to(tl.int64)[:, None] * (4 * stride_t) + kept[:, None] + cn[None, :]
                    r = tl.load(keep, mask=m_n, other=0.0).to(tl.float32)
                    z = tl.load(keep + H, mask=m_n, other=0.0).to(tl.float32)
                    n = tl.load(keep + 2 * H, mask=m_n, other=0.0).to(tl.float32)
                    a_n = tl.load(keep + 3 * H, mask=m_n, other=0.0).to(tl.float32)
                    prev = _prev_rows(s, L, d, h0_rows, out_rows, stride_t)
                    h_prev = tl.load(prev[:, None] + cn[None, :], mask=m_n, other=0.0).to(tl.float32)
                    g_h = go + dh
                    dr, dz, dn = _gru_backward(g_h, r, z, n, a_n, h_prev)
                    dt = gproj_ptr.dtype.element_ty
                    dr = tl.where(active[:, None], dr, 0.0).to(dt)
                    dz = tl.where(active[:, None], dz, 0.0).to(dt)
                    dn_r = tl.where(active[:, None], dn * r, 0.0).to(dt)
                    dn = tl.where(active[:, None], dn, 0.0).to(dt)
                    x_ptrs = t.to(tl.int64)[:, None] * (3 * stride_t) + x_seq[:, None] + cn[None, :]
                    m_w = row_ok[:, None] & n_ok
                    tl.store(gproj_ptr + x_ptrs, dr, mask=m_w)
                    tl.store(gproj_ptr + x_ptrs + H, dz, mask=m_w)
                    tl.store(gproj_ptr + x_ptrs + 2 * H, dn, mask=m_w)
                    tl.store(grec_ptr + x_ptrs, dr, mask=m_w)
                    tl.store(grec_ptr + x_ptrs + H, dz, mask=m_w)
                    tl.store(grec_ptr + x_ptrs + 2 * H, dn_r, mask=m_w)
                    gz_cur = gz_rows + (s % 2) * stride_t
                    tl.store(gz_cur[:, None] + cn[None, :], g_h * z, mask=m_n)
                elif CELL == "LSTM":
                    g_h = go + dh  # dLoss/dh_t in full
                    if PROJECT:  # to grad_h, and dm = grad_h @ W_hr[d] once all of it is there
                        g_h = tl.where(active[:, None], g_h, 0.0)
                        tl.store(gh_ptr + ptrs, g_h.to(gh_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok)
                    else:
                        _lstm_bwd_tile(
                            g_h,
                            cn,
                            s,
                            t,
                            L,
                            d,
                            active,
                            row_ok,
                            H,
                            stride_t,
                            saved_ptr,
                            kept,
                            c0_rows,
                            dc_rows,
                            gcn_rows,
                            gproj_ptr,
                            x_seq,
                        )
                else:
                    y = tl.load(out_ptr + ptrs, mask=m_n, other=0.0).to(tl.float32)
                    dz = _elman_backward(go + dh, y, CELL)
                    dz = tl.where(active[:, None], dz, 0.0)
                    tl.store(gproj_ptr + ptrs, dz.to(gproj_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok)
            else:
                # Rows with L = 0 never ran: their grad_h0 is grad_hn (loaded above, active is all rows).
                tl.store(
                    gh0_ptr + d * B * K + rows[:, None] * K + cn[None, :],
                    dh.to(gh0_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & n_ok,
                )
        if CELL == "LSTM":
            if PROJECT:
                if s >= 0:
                    tl.debug_barrier()  # all of grad_h_t before its product
                    gh_rows = gh_ptr + t.to(tl.int64) * out_stride_t + seq
                    for n0 in range(0, H, BLOCK_N):
                        cn = n0 + rn
                        dm = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                        for k0 in range(0, P, BLOCK_K):
                            ck = k0 + rk
                            ghk = tl.load(
                                gh_rows[:, None] + ck[None, :],
                                mask=active[:, None] & (ck < P)[None, :],
                                other=0.0,
                                cache_modifier=".cg",
                            )
                            wr = tl.load(
                                whr_ptr + d * P * H + ck[:, None] * H + cn[None, :],
                                mask=(ck < P)[:, None] & (cn < H)[None, :],
                                other=0.0,
                            )
                            dm += _mm(ghk, wr, PRECISION, MODE)
                        _lstm_bwd_tile(
                            dm,
                            cn,
                            s,
                            t,
                            L,
                            d,
                            active,
                            row_ok,
                            H,
                            stride_t,
                            saved_ptr,
                            kept,
                            c0_rows,
                            dc_rows,
                            gcn_rows,
                            gproj_ptr,
                            x_seq,
                        )
            if s < 0:
                # grad_c0: dLoss/dc of the first step, or grad_c_n for rows with L = 0.
                for n0 in range(0, H, BLOCK_N):
                    cn = n0 + rn
                    n_ok = (cn < H)[None, :]
                    dc = tl.load(gcn_rows[:, None] + cn[None, :], mask=(row_ok & ~has_next)[:, None] & n_ok, other=0.0)
                    dc = dc.to(tl.float32) + tl.load(
                        dc_rows[:, None] + cn[None, :], mask=has_next[:, None] & n_ok, other=0.0, cache_modifier=".cg"
                    )
                    tl.store(
                        gc0_ptr + d * B * H + rows[:, None] * H + cn[None, :],
                        dc.to(gc0_ptr.dtype.element_ty),
                        mask=row_ok[:, None] & n_ok,
                    )
        tl.debug_barrier()

    _zero_tail_tiled(gproj_ptr, x_seq, n_steps, T, GATES * stride_t, H, row_ok, GATES, BLOCK_B, BLOCK_N)
    if CELL == "GRU":
        _zero_tail_tiled(grec_ptr, x_seq, n_steps, T, 3 * stride_t, H, row_ok, 3, BLOCK_B, BLOCK_N)
    elif CELL == "LSTM":
        if PROJECT:
            _zero_tail_tiled(gh_ptr, seq, n_steps, T, out_stride_t, P, row_ok, 1, BLOCK_B, BLOCK_N)


def _tiles(mode, ieee_f32, tf32):
    """(BLOCK_N, BLOCK_K, num_stages or None for Triton's default) of the tiled kernels."""
    if GATES[mode] == 1:
        # K 32 for IEEE float32 (FMA dot, register-bound), 64 for the tensor-core dtypes.
        return 64, (32 if ieee_f32 else 64), None
    # GRU carries three accumulators and loads three W tiles per K step: N 64 spills in every
    # dtype, and so do IEEE float32's pipelining buffers (hence one stage) and TF32's K 32.
    if mode == "LSTM":
        # Four accumulators and four W tiles per K step. Spills seen: IEEE float32 at K 32 (backward
        # with W_hr), TF32 at K 16 (forward) and with its pipelining buffers at K 32 (backward),
        # float16/bfloat16 at K 64 (backward with W_hr).
        if ieee_f32 or tf32:
            return 32, (16 if ieee_f32 else 32), 1
        return 32, 32, None
    if ieee_f32:
        return 32, 32, 1
    return 32, (16 if tf32 else 64), None


def _launch_config(B, D, H, dtype, device, mode, allow_tf32=None, width=None, project=False):
    """(on-chip?, grid, kernel meta-parameters) for this problem; width is the state's (P, the
    LSTM's proj_size with W_hr (project); H otherwise and by default).

    Register budgets below were read off ptxas for sm_90 and sm_80; see the module docstring.
    """
    allow = ALLOW_TF32 if allow_tf32 is None else allow_tf32
    ieee_f32, precision, dot_mode = matmul_mode(dtype, allow)
    gru = GATES[mode] >= 3  # GRU and LSTM: three or four W_hh blocks
    block_h = max(16, triton.next_power_of_2(H))
    onchip = block_h <= ONCHIP_MAX_H[mode]
    width = H if width is None else width
    # P's block: H's without W_hr; with it at least 32 (16 wide, the products spill: tl.dot's
    # layouts replicate, and the reduce's (BLOCK_B, H, P) grows beyond what 8 warps hold).
    block_p = max(32, triton.next_power_of_2(width)) if project else block_h
    if onchip and ieee_f32:
        # Few rows per program: the (BLOCK_B, H, H) product of the reduce lives in registers.
        block_b = 8 if block_h <= 32 else (4 if block_h <= 64 else 2)
        # The LSTM's backward with W_hr (H 64, P 32) spills with 8 warps and fits 4.
        num_warps = 4 if block_h <= 32 or (project and block_p <= 32) else 8
        meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, MODE="reduce", num_warps=num_warps)
    elif onchip:
        # tl.dot needs M >= 16. Grow the batch block only once programs outnumber SMs (W_hh is
        # read once per program), and not at H = 128, where 32 rows already spill. GRU (three W
        # blocks, six tiles prefetched in backward) spills with 32 rows at any H, and with 4
        # warps at H = 64; the LSTM is held to the same.
        block_b = 16
        if block_h <= 64 and not gru and D * triton.cdiv(B, block_b) > sm_count(device):
            block_b = 32
        num_warps = 8 if block_h >= (64 if gru else 128) else 4
        meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, MODE=dot_mode, num_warps=num_warps)
    else:
        block_b = 16
        tile_n, tile_k, stages = _tiles(mode, ieee_f32, precision == "tf32")
        meta = dict(BLOCK_B=block_b, BLOCK_N=TILE_N or tile_n, BLOCK_K=TILE_K or tile_k, MODE=dot_mode, num_warps=8)
        if stages:
            meta["num_stages"] = stages
    if onchip:
        meta["BLOCK_P"] = block_p
    meta = dict(meta, PRECISION=precision, CELL=mode, GATES=GATES[mode], PROJECT=project)
    return onchip, (D, triton.cdiv(B, block_b)), meta


def _gates(mode):
    if mode not in GATES:
        raise ValueError(f"fastrnn triton: unknown mode {mode!r}, expected one of {sorted(GATES)}")
    return GATES[mode]


def _check_4d(name, x):
    if x.dim() != 4 or x.shape[2] not in (1, 2):
        raise ValueError(f"fastrnn triton: {name} must be (T, B, D, ...) with D in (1, 2), got {tuple(x.shape)}")


def _pair(states, name, parts):
    if not (isinstance(states, (tuple, list)) and len(states) == 2):
        raise ValueError(
            f"fastrnn triton: the LSTM cell takes {name} as the pair ({parts}), got {type(states).__name__}"
        )
    return states


def _lstm_checks(h0, w_hr, D, B, H, P, named):
    """The LSTM's extra checks: c0 (D, B, H) and w_hr (D, P, H), or P = H without it."""
    check_shape("c0", h0[1], (D, B, H))
    named.append(("c0", h0[1]))
    if w_hr is not None:
        check_shape("w_hr", w_hr, (D, P, H))
        named.append(("w_hr", w_hr))
    elif P != H:
        raise ValueError(f"fastrnn triton: h is {P} wide and c {H} wide, which needs w_hr (D, {P}, {H})")


def forward(proj, w_hh, b_hh, h0, lengths, mode, keep_saved=True, w_hr=None, *, allow_tf32=None):
    """The recurrence of cell ``mode`` over a batch padded to T, all directions in one launch.
    ``keep_saved`` is accepted for the launcher contract; these kernels save the gates always.

    proj (T, B, D, G*H) = x @ W_ih[d]^T + b_ih[d] (+ b_hh[d] for Elman and LSTM); w_hh (D, G*H, P);
    b_hh (D, G*H) for GRU, None for Elman and LSTM (folded into proj); h0 (D, B, P), for LSTM the
    pair (h0 (D, B, P), c0 (D, B, H)); lengths (B,) int64 in [0, T]; w_hr (D, P, H) (LSTM's
    proj_size) or None. P is the state's width: proj_size with w_hr, else H. Direction 0 runs
    t = 0 .. L_b-1, direction 1 runs t = L_b-1 .. 0. Returns out (T, B, D, P), zero for t >= L_b,
    h_n (D, B, P) (h0 where L_b = 0; for LSTM the pair (h_n, c_n)) and saved: () for Elman,
    (gates,) for GRU with gates (T, B, D, 4H) = [r, z, n, W_hn h_{t-1} + b_hn] per step, and for
    LSTM (T, B, D, 5H) = [i, f, g, o, c_t] (zero for t >= L_b).
    """
    G = _gates(mode)
    lstm = mode == "LSTM"
    if lstm:
        h0, c0 = _pair(h0, "h0", "h0 (D, B, P), c0 (D, B, H)")
    elif w_hr is not None:
        raise ValueError(f"fastrnn triton: w_hr is the LSTM's projection; {mode} has none")
    _check_4d("proj", proj)
    T, B, D, GH = proj.shape
    if h0.dim() != 3:
        raise ValueError(f"fastrnn triton: h0 must be (D, B, H), got shape {tuple(h0.shape)}")
    P = h0.shape[2]
    if lstm and c0.dim() != 3:
        raise ValueError(f"fastrnn triton: c0 must be (D, B, H), got shape {tuple(c0.shape)}")
    H = c0.shape[2] if lstm else P
    check_shape("proj", proj, (T, B, D, G * H))
    check_shape("h0", h0, (D, B, P))
    check_shape("w_hh", w_hh, (D, G * H, P))
    named = [("w_hh", w_hh), ("h0", h0)]
    if mode == "GRU":
        if b_hh is None:
            raise ValueError("fastrnn triton: GRU needs b_hh (D, 3H) (zeros for bias=False)")
        check_shape("b_hh", b_hh, (D, G * H))
        named.append(("b_hh", b_hh))
    elif b_hh is not None:
        raise ValueError(f"fastrnn triton: {mode} folds b_hh into proj; pass b_hh=None")
    if lstm:
        _lstm_checks((h0, c0), w_hr, D, B, H, P, named)
    check_dtype(proj.dtype, *named)
    check_device(proj, *(x for _, x in named))
    check_contiguous(("proj", proj), *named)
    lengths = check_lengths(lengths, B, proj.device)

    out = proj.new_empty(T, B, D, P)
    h_n = torch.empty_like(h0)
    c_n = torch.empty_like(c0) if lstm else None
    # Zeroed, not empty: the kernels write only valid steps, and the custom op returns saved, so
    # its padding must be deterministic.
    saved = (proj.new_zeros(T, B, D, SAVED[mode] * H),) if SAVED[mode] else ()
    states = (h_n, c_n) if lstm else h_n
    if T == 0 or B == 0 or H == 0:
        h_n.copy_(h0)
        if lstm:
            c_n.copy_(c0)
        return out, states, saved
    onchip, grid, meta = _launch_config(B, D, H, proj.dtype, proj.device, mode, allow_tf32, P, w_hr is not None)
    gates = saved[0] if saved else None
    args = (proj, w_hh, b_hh, h0, lengths, out, h_n, gates, c0 if lstm else None, c_n, w_hr)
    if onchip:
        _recurrence_fwd_kernel[grid](*args, T, B, H, P, B * D * H, D * H, **meta)
    else:
        scratch = None
        if mode == "GRU":
            scratch = torch.empty(2, D, B, H, device=proj.device, dtype=torch.float32)
            scratch[1].copy_(h0)
        elif lstm:  # c's two buffers (c0 in buffer 1), and m_t for W_hr's product
            scratch = torch.empty(2 if w_hr is None else 3, D, B, H, device=proj.device, dtype=torch.float32)
            scratch[1].copy_(c0)
        _recurrence_fwd_tiled_kernel[grid](*args, scratch, T, B, H, P, B * D * H, D * H, **meta)
    return out, states, saved


def backward(grad_out, grad_hn, out, saved, w_hh, h0, lengths, mode, w_hr=None, *, allow_tf32=None):
    """Gradients of :func:`forward` with respect to both projections and h0.

    grad_out and out (T, B, D, P), grad_hn (D, B, P) (None means zeros; for LSTM the pair
    (grad_h_n, grad_c_n (D, B, H)), either None for zeros), saved as forward returned it, w_hh
    (D, G*H, P), h0 as forward took it (read by GRU, and LSTM's c0), lengths (B,), w_hr as forward
    took it. Returns grad_proj = dLoss/d x_proj and grad_rec = dLoss/d h_proj, (T, B, D, G*H),
    zero for t >= L_b (one tensor for Elman and LSTM, whose cells add the two), and grad_h0
    (D, B, P), for LSTM the pair (grad_h0, grad_c0); with w_hr a fourth value, grad_h
    (T, B, D, P) = dLoss/dh_t in full (zero for t >= L_b), for W_hr's gradient.
    """
    G = _gates(mode)
    lstm = mode == "LSTM"
    if lstm:
        h0, c0 = _pair(h0, "h0", "h0 (D, B, P), c0 (D, B, H)")
        grad_hn, grad_cn = (None, None) if grad_hn is None else _pair(grad_hn, "grad_hn", "grad_h_n, grad_c_n")
    elif w_hr is not None:
        raise ValueError(f"fastrnn triton: w_hr is the LSTM's projection; {mode} has none")
    _check_4d("out", out)
    T, B, D, P = out.shape
    if lstm and c0.dim() != 3:
        raise ValueError(f"fastrnn triton: c0 must be (D, B, H), got shape {tuple(c0.shape)}")
    H = c0.shape[2] if lstm else P
    if grad_hn is None:
        grad_hn = out.new_zeros(D, B, P)
    named = [("grad_out", grad_out), ("grad_hn", grad_hn), ("w_hh", w_hh)]
    check_shape("grad_out", grad_out, (T, B, D, P))
    check_shape("grad_hn", grad_hn, (D, B, P))
    check_shape("w_hh", w_hh, (D, G * H, P))
    gates = None
    if SAVED[mode]:
        if len(saved) != 1:
            raise ValueError(f"fastrnn triton: {mode} backward needs saved = (gates,) from forward")
        (gates,) = saved
        check_shape("saved[0]", gates, (T, B, D, SAVED[mode] * H))
        named.append(("saved[0]", gates))
    if mode == "GRU":
        check_shape("h0", h0, (D, B, H))
        named.append(("h0", h0))
    elif lstm:
        if grad_cn is None:
            grad_cn = out.new_zeros(D, B, H)
        check_shape("grad_c_n", grad_cn, (D, B, H))
        named.append(("grad_c_n", grad_cn))
        _lstm_checks((h0, c0), w_hr, D, B, H, P, named)
    check_dtype(out.dtype, *named)
    check_device(out, *(x for _, x in named))
    check_contiguous(("out", out), *named)
    lengths = check_lengths(lengths, B, out.device)

    grad_proj = out.new_empty(T, B, D, G * H)
    grad_rec = torch.empty_like(grad_proj) if mode == "GRU" else grad_proj
    grad_h0 = torch.empty_like(grad_hn)
    grad_c0 = torch.empty_like(grad_cn) if lstm else None
    grad_h = out.new_empty(T, B, D, P) if w_hr is not None else None
    if T == 0 or B == 0 or H == 0:
        grad_proj.zero_()
        grad_rec.zero_()
        grad_h0.copy_(grad_hn)
        if lstm:
            grad_c0.copy_(grad_cn)
        if grad_h is not None:
            grad_h.zero_()
    else:
        onchip, grid, meta = _launch_config(B, D, H, out.dtype, out.device, mode, allow_tf32, P, w_hr is not None)
        # Each cell's kernels get None for what they never touch (b_hh, saved, h0, grad_rec, scratch,
        # the LSTM's c and W_hr).
        gru = mode == "GRU"
        args = (
            grad_out,
            grad_hn,
            out,
            gates,
            w_hh,
            h0 if gru else None,
            lengths,
            grad_proj,
            grad_rec if gru else None,
            grad_h0,
            grad_cn if lstm else None,
            c0 if lstm else None,
            w_hr,
            grad_c0,
            grad_h,
        )
        if onchip:
            _recurrence_bwd_kernel[grid](*args, T, B, H, P, B * D * H, D * H, **meta)
        else:
            scratch = torch.empty(2, D, B, H, device=out.device, dtype=torch.float32) if gru or lstm else None
            _recurrence_bwd_tiled_kernel[grid](*args, scratch, T, B, H, P, B * D * H, D * H, **meta)
    if not lstm:
        return grad_proj, grad_rec, grad_h0
    if w_hr is None:
        return grad_proj, grad_rec, (grad_h0, grad_c0)
    return grad_proj, grad_rec, (grad_h0, grad_c0), grad_h


def fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden, mode):
    """No whole-layer kernel on GPU: the caller's cuBLAS GEMMs always surround the recurrence."""
    return False
