"""Tiled kernels: any H, W_hh read in N x K tiles every step.

See recurrence.py for the variants and how one is chosen.
"""

import triton
import triton.language as tl

from ._cells import _elman_backward, _elman_forward, _gru_backward, _gru_forward, _lstm_backward, _lstm_forward
from ._common import _block_rows, _mm, _prev_rows, _state_layout, _time_index, _zero_tail_tiled


@triton.jit
def _program_columns(SLICE, SLICE_K, H, K):
    """This program's columns, a slice of W_hh's rows per gate (see _step_sync): [lo, hi_h) of the
    H-wide values, [lo_k, hi_k) of the K-wide ones (the same but for W_hr's P). SLICE and SLICE_K
    are multiples of BLOCK_N, so no tile crosses into the next slice. With W_hr a step has two
    exchanges, each closed by a _step_sync: the H columns (gates, c, m_t), then the P columns
    (h_t = m_t @ W_hr^T; backward in the other order); the kernels' ``phases`` (bits 1 and 2) say
    which of the two a launch runs: the per-step twin launches each alone."""
    lo = tl.program_id(2) * SLICE
    lo_k = tl.program_id(2) * SLICE_K
    return lo, tl.minimum(lo + SLICE, H), lo_k, tl.minimum(lo_k + SLICE_K, K)


@triton.jit
def _step_sync(sync_ptr, steps_done, GRID_SYNC: tl.constexpr):
    """End of an exchange (one per step; two with W_hr): what this program wrote is visible to
    the programs that read it next.

    Without GRID_SYNC a CTA barrier (one program per direction and batch block, or one launch per
    exchange). With it, the programs that split one (direction, batch block) into column slices
    (program_id 2) meet at a grid barrier: a counter per (direction, batch block) that only grows,
    so the n-th exchange of a launch waits for n arrivals of each program (``steps_done``) and
    nothing is ever reset. The release add (one thread: the atomic is scalar) publishes this CTA's
    stores, ordered before it by the CTA barrier. The poll is relaxed; the one acquire after it
    orders the next step's loads after the others' stores and invalidates this SM's L1 (ptxas:
    CCTL.IVALL), which is what keeps those loads fresh (Triton's pipeliner turns some .cg loads
    into L1-cached cp.async). It must stay an acquire: the GRU's state buffers are re-read at the
    same addresses every other step. The launcher guarantees co-residency (a cooperative launch,
    grid at most the SM count).
    """
    tl.debug_barrier()
    if GRID_SYNC:
        counter = sync_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        target = steps_done.to(tl.int64) * tl.num_programs(2)
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        while tl.atomic_add(counter, 0, sem="relaxed", scope="gpu") < target:
            pass
        tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


# s_begin, s_end and phases unspecialised: the per-step twin passes every step index (and phases
# 1 and 2), and Triton would otherwise compile a variant for 1 and for multiples of 16.
@triton.jit(do_not_specialize=["s_begin", "s_end", "phases"])
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
    sync_ptr,
    s_begin,
    s_end,
    SLICE,
    SLICE_K,
    phases,
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
    GRID_SYNC: tl.constexpr,
):
    tl.static_assert(CELL == "LSTM" or not PROJECT, "W_hr (PROJECT) is the LSTM's alone")
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    K, out_stride_t, out_stride_b = _state_layout(B, H, P, stride_t, stride_b, CELL)
    lo, hi_h, lo_k, hi_k = _program_columns(SLICE, SLICE_K, H, K)
    exchanges = 1 + PROJECT  # _step_syncs per step
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
        for s in range(s_begin, tl.minimum(s_end, n_steps)):
            active = (L > s) & row_ok
            t = _time_index(s, L, d)
            prev_rows = state_rows + ((s + 1) % 2) * stride_t
            cur_rows = state_rows + (s % 2) * stride_t
            dst_rows = out_ptr + t.to(tl.int64) * stride_t + seq
            src_rows = proj_ptr + t.to(tl.int64) * (3 * stride_t) + x_seq
            keep_rows = saved_ptr + t.to(tl.int64) * (4 * stride_t) + kept
            for n0 in range(lo, hi_h, BLOCK_N):
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
                    # .cg: from L2; a split's other programs wrote part of it (see _step_sync).
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
            _step_sync(sync_ptr, s - s_begin + 1, GRID_SYNC)
    elif CELL == "LSTM":
        # h_{t-1} is read back from out, as Elman's; c is carried in float32 scratch (2 or 3, D, B, H):
        # step s reads buffer (s + 1) % 2 and writes buffer s % 2 (the launcher puts c0 in buffer 1),
        # and with W_hr buffer 2 holds m_t = o * tanh(c_t) for the second product, h_t = m_t @ W_hr^T.
        x_seq = rows.to(tl.int64) * (4 * stride_b) + d * 4 * H
        kept = rows.to(tl.int64) * (5 * stride_b) + d * 5 * H
        c_rows = scratch_ptr + d * B * H + rows * H
        m_rows = c_rows + 2 * stride_t
        keep_ty = saved_ptr.dtype.element_ty
        for s in range(s_begin, tl.minimum(s_end, n_steps)):
            active = (L > s) & row_ok
            t = _time_index(s, L, d)
            t_prev = tl.where(d == 0, s - 1, L - s)
            prev_rows = tl.where(s == 0, h0_rows, out_ptr + t_prev.to(tl.int64) * out_stride_t + seq)
            c_prev_rows = c_rows + ((s + 1) % 2) * stride_t
            c_cur_rows = c_rows + (s % 2) * stride_t
            dst_rows = out_ptr + t.to(tl.int64) * out_stride_t + seq
            src_rows = proj_ptr + t.to(tl.int64) * (4 * stride_t) + x_seq
            keep_rows = saved_ptr + t.to(tl.int64) * (5 * stride_t) + kept
            if (phases & 1) != 0:
                for n0 in range(lo, hi_h, BLOCK_N):
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
                        # .cg: from L2; a split's other programs wrote part of it (see _step_sync).
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
                _step_sync(sync_ptr, 2 * (s - s_begin) + 1, GRID_SYNC)  # all of m_t before its product
                if (phases & 2) != 0:
                    for n0 in range(lo_k, hi_k, BLOCK_N):
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
            _step_sync(sync_ptr, exchanges * (s - s_begin + 1), GRID_SYNC)
    else:
        for s in range(s_begin, tl.minimum(s_end, n_steps)):
            active = (L > s) & row_ok
            t = _time_index(s, L, d)
            # h_{prev}: h0 at the first step, else the state this program wrote to out one step ago.
            t_prev = tl.where(d == 0, s - 1, L - s)
            prev_rows = tl.where(s == 0, h0_rows, out_ptr + t_prev.to(tl.int64) * stride_t + seq)
            dst_rows = out_ptr + t.to(tl.int64) * stride_t + seq
            src_rows = proj_ptr + t.to(tl.int64) * stride_t + seq
            for n0 in range(lo, hi_h, BLOCK_N):
                cn = n0 + rn
                m_n = active[:, None] & (cn < H)[None, :]
                acc = tl.load(src_rows[:, None] + cn[None, :], mask=m_n, other=0.0).to(tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    ck = k0 + rk
                    # .cg: from L2; a split's other programs wrote part of it (see _step_sync).
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
            _step_sync(sync_ptr, s - s_begin + 1, GRID_SYNC)

    if s_end >= T and phases >= 2:  # the last launch (or the only one) finishes the layer
        _zero_tail_tiled(out_ptr, seq, n_steps, T, out_stride_t, K, row_ok, 1, BLOCK_B, BLOCK_N, lo_k, hi_k)
        if CELL == "GRU":
            # h_n: the buffer of the last step written ((L - 1) % 2), which is h0's for empty sequences.
            last_rows = state_rows + ((L + 1) % 2) * stride_t
        else:
            # h_n: the last state written (t = L-1 forward, t = 0 reversed), or h0 for empty sequences.
            t_last = tl.where(d == 0, L - 1, 0)
            last_rows = tl.where(L > 0, out_ptr + t_last.to(tl.int64) * out_stride_t + seq, h0_rows)
        hn_rows = hn_ptr + d * B * K + rows * K
        for n0 in range(lo_k, hi_k, BLOCK_N):
            cn = n0 + rn
            m_n = row_ok[:, None] & (cn < K)[None, :]
            hv = tl.load(last_rows[:, None] + cn[None, :], mask=m_n, other=0.0, cache_modifier=".cg")
            tl.store(hn_rows[:, None] + cn[None, :], hv.to(hn_ptr.dtype.element_ty), mask=m_n)
        if CELL == "LSTM":
            # c_n: the buffer of the last step written, c0's (buffer 1) for empty sequences.
            last_rows = c_rows + ((L + 1) % 2) * stride_t
            cn_rows = cn_ptr + d * B * H + rows * H
            for n0 in range(lo, hi_h, BLOCK_N):
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


@triton.jit(do_not_specialize=["s_begin", "s_end", "phases"])
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
    sync_ptr,
    s_begin,
    s_end,
    SLICE,
    SLICE_K,
    phases,
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
    GRID_SYNC: tl.constexpr,
):
    tl.static_assert(CELL == "LSTM" or not PROJECT, "W_hr (PROJECT) is the LSTM's alone")
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    K, out_stride_t, out_stride_b = _state_layout(B, H, P, stride_t, stride_b, CELL)
    lo, hi_h, lo_k, hi_k = _program_columns(SLICE, SLICE_K, H, K)
    exchanges = 1 + PROJECT  # _step_syncs per step
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
    for i in range(s_begin, tl.minimum(s_end, n_steps + 1)):
        s = n_steps - 1 - i  # s = -1 is the extra pass that produces grad_h0
        active = (L > s) & row_ok
        has_next = (L > s + 1) & row_ok
        t = _time_index(s, L, d)
        t_next = _time_index(s + 1, L, d)
        next_rows = rec_ptr + t_next.to(tl.int64) * (GATES * stride_t) + x_seq
        if (phases & 1) != 0:
            for n0 in range(lo_k, hi_k, BLOCK_N):
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
                _step_sync(sync_ptr, 2 * (i - s_begin) + 1, GRID_SYNC)  # all of grad_h_t before its product
            if (phases & 2) != 0:
                if PROJECT:
                    if s >= 0:
                        gh_rows = gh_ptr + t.to(tl.int64) * out_stride_t + seq
                        for n0 in range(lo, hi_h, BLOCK_N):
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
                    for n0 in range(lo, hi_h, BLOCK_N):
                        cn = n0 + rn
                        n_ok = (cn < H)[None, :]
                        dc = tl.load(
                            gcn_rows[:, None] + cn[None, :], mask=(row_ok & ~has_next)[:, None] & n_ok, other=0.0
                        )
                        dc = dc.to(tl.float32) + tl.load(
                            dc_rows[:, None] + cn[None, :],
                            mask=has_next[:, None] & n_ok,
                            other=0.0,
                            cache_modifier=".cg",
                        )
                        tl.store(
                            gc0_ptr + d * B * H + rows[:, None] * H + cn[None, :],
                            dc.to(gc0_ptr.dtype.element_ty),
                            mask=row_ok[:, None] & n_ok,
                        )
        _step_sync(sync_ptr, exchanges * (i - s_begin + 1), GRID_SYNC)

    if s_end > T and phases >= 2:  # the last launch (or the only one) finishes the layer
        _zero_tail_tiled(gproj_ptr, x_seq, n_steps, T, GATES * stride_t, H, row_ok, GATES, BLOCK_B, BLOCK_N, lo, hi_h)
        if CELL == "GRU":
            _zero_tail_tiled(grec_ptr, x_seq, n_steps, T, 3 * stride_t, H, row_ok, 3, BLOCK_B, BLOCK_N, lo, hi_h)
        elif CELL == "LSTM":
            if PROJECT:
                _zero_tail_tiled(gh_ptr, seq, n_steps, T, out_stride_t, P, row_ok, 1, BLOCK_B, BLOCK_N, lo_k, hi_k)
