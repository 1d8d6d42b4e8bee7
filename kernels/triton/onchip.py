"""On-chip kernels: W_hh[d] loaded once per program and kept in registers, the state too.

See recurrence.py for the variants and how one is chosen.
"""

import triton
import triton.language as tl

from ._cells import _elman_backward, _elman_forward, _gru_backward, _gru_forward, _lstm_backward, _lstm_forward
from ._common import _block_rows, _mm, _prev_rows, _state_layout, _time_index, _zero_tail


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
    K, out_stride_t, out_stride_b = _state_layout(B, H, P, stride_t, stride_b, CELL)
    cols_k = tl.arange(0, BLOCK_P)  # BLOCK_P is BLOCK_H but for the LSTM with W_hr
    mask_k = row_ok[:, None] & (cols_k < K)[None, :]

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
    K, out_stride_t, out_stride_b = _state_layout(B, H, P, stride_t, stride_b, CELL)
    cols_k = tl.arange(0, BLOCK_P)  # BLOCK_P is BLOCK_H but for the LSTM with W_hr
    mask_k = row_ok[:, None] & (cols_k < K)[None, :]

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
