"""Persistent Triton kernels for the Elman recurrence (forward and backward).

Each program owns one direction and a block of BLOCK_B batch rows and walks every time step inside
the kernel, so a whole layer is one launch. Two variants:

- ``_elman_fwd_kernel`` / ``_elman_bwd_kernel``: W_hh[d] is loaded once and kept on chip, and the
  state h (or dh) stays in registers between steps. Used while H, padded to a power of two, is at
  most ``ONCHIP_MAX_H``. The per-step product is ``tl.dot`` (tensor cores) for float16/bfloat16
  and TF32, and for IEEE float32 a broadcast multiply reduced over K on CUDA cores with a few rows
  per program ("reduce"): tl.dot's float32 FMA lowering spills kilobytes per thread at H >= 64.
- ``_elman_fwd_tiled_kernel`` / ``_elman_bwd_tiled_kernel``: any H. Each step loops over N x K
  tiles of W_hh read from L2, and the previous state is read back from the output it was written
  to (``out`` forward, ``grad_pre`` backward), with a CTA barrier between steps.

Block sizes and warps in ``_launch_config`` were chosen from ptxas resource usage for sm_90 and
sm_80 (Triton 3.6 and 3.9): no register spills except a few bytes in two float32 tiled variants.

Pointwise math, accumulation and the carried state are float32. The matmul operands are the
storage dtype: for float16/bfloat16 the state is rounded to the dtype it is stored in, as
``torch.nn.RNN`` does. float32 matmuls are IEEE unless ``allow_tf32`` (or ``ALLOW_TF32``) opts in.
"""

import torch
import triton
import triton.language as tl

# Largest padded hidden size that keeps W_hh on chip; above it the tiled kernels run.
ONCHIP_MAX_H = 128
# Tile sizes of the tiled kernels (tl.dot needs every block dim >= 16); TILE_K None picks 32 for
# IEEE float32 (FMA dot, register-bound) and 64 for the tensor-core dtypes.
TILE_N = 64
TILE_K = None
# Opt-in TF32 for float32 matmuls (off: results match torch.nn.RNN with TF32 disabled).
ALLOW_TF32 = False

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tanh(z):
    # exp-based tanh on |z| (no overflow); tl has no portable tanh across triton 3.6 and 3.9.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _activate(z, RELU: tl.constexpr):
    if RELU:
        return tl.where(z < 0, 0.0, z)  # not tl.maximum: it drops NaN like torch.relu must not
    else:
        return _tanh(z)


@triton.jit
def _activate_grad(g, y, RELU: tl.constexpr):
    # Derivative from the output y = act(z): tanh' = 1 - y^2, relu' = [y > 0] (as torch's
    # threshold_backward: only y <= 0 blocks, so a NaN passes through).
    if RELU:
        return tl.where(y <= 0, 0.0, g)
    else:
        return g * (1.0 - y * y)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, MODE: tl.constexpr):
    # a (M, K) float32 state @ b (K, N) weights -> float32. a is first rounded to b's storage
    # dtype: the state as torch.nn.RNN would have stored it.
    a = a.to(b.dtype)
    if MODE == "reduce":
        # IEEE float32 on CUDA cores. tl.dot's FMA lowering keeps whole K rows of both operands
        # in registers and spills at K >= 64; a broadcast product reduced over K does not.
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif MODE == "dot_f32":
        # The interpreter's tl.dot multiplies bfloat16 bit patterns; float32 products of the
        # rounded operands are exact, so this matches the GPU's bf16 dot with fp32 accumulation.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _time_index(s, L, d):
    # Time index of processing step s for each row: s forward, L-1-s for the reversed direction.
    # Rows that have finished (s >= L) get t = s, a padded position where they write zeros.
    t = tl.where(d == 0, s, L - 1 - s)
    return tl.where(s < L, t, s)


@triton.jit
def _block_rows(len_ptr, B, T, BLOCK_B: tl.constexpr):
    """This program's batch rows, which exist, their lengths and the block's longest length."""
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    L = tl.load(len_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    L = tl.minimum(tl.maximum(L, 0), T)  # memory safety only; lengths are checked by callers
    return rows, row_ok, L, tl.max(L, axis=0)


@triton.jit
def _elman_fwd_kernel(
    proj_ptr,
    w_ptr,
    h0_ptr,
    len_ptr,
    out_ptr,
    hn_ptr,
    T,
    B,
    H,
    stride_t,
    stride_b,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = row_ok[:, None] & (cols < H)[None, :]

    # wt[k, j] = W_hh[d, j, k], so that z = h @ wt. Padding is zero, keeping padded columns of h zero.
    wk = tl.arange(0, BLOCK_H)[:, None]
    wj = tl.arange(0, BLOCK_H)[None, :]
    wt = tl.load(w_ptr + d * H * H + wj * H + wk, mask=(wk < H) & (wj < H), other=0.0)

    state = d * B * H + rows[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state, mask=mask, other=0.0).to(tl.float32)
    seq = rows[:, None].to(tl.int64) * stride_b + d * H + cols[None, :]

    # proj of the next step is loaded one iteration ahead, so its latency hides behind the matmul.
    t = _time_index(0, L, d)
    x = tl.load(proj_ptr + t[:, None].to(tl.int64) * stride_t + seq, mask=mask & (L > 0)[:, None], other=0.0)
    for s in range(0, n_steps):
        active = (L > s)[:, None]
        ptrs = t[:, None].to(tl.int64) * stride_t + seq
        t_next = _time_index(s + 1, L, d)
        x_next = tl.load(
            proj_ptr + t_next[:, None].to(tl.int64) * stride_t + seq, mask=mask & (L > s + 1)[:, None], other=0.0
        )
        z = x.to(tl.float32) + _mm(h, wt, PRECISION, MODE)
        y = _activate(z, RELU)
        h = tl.where(active, y, h)
        tl.store(out_ptr + ptrs, tl.where(active, y, 0.0).to(out_ptr.dtype.element_ty), mask=mask)
        t = t_next
        x = x_next
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=out_ptr.dtype.element_ty)
    dst = out_ptr + n_steps.to(tl.int64) * stride_t + seq
    for _ in range(n_steps, T):
        tl.store(dst, zero, mask=mask)
        dst += stride_t
    tl.store(hn_ptr + state, h.to(hn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _elman_bwd_kernel(
    gout_ptr,
    ghn_ptr,
    out_ptr,
    w_ptr,
    len_ptr,
    gpre_ptr,
    gh0_ptr,
    T,
    B,
    H,
    stride_t,
    stride_b,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    mask = row_ok[:, None] & (cols < H)[None, :]

    # w[j, k] = W_hh[d, j, k]: dh_prev = dz @ W_hh[d] (no transpose).
    wj = tl.arange(0, BLOCK_H)[:, None]
    wk = tl.arange(0, BLOCK_H)[None, :]
    w = tl.load(w_ptr + d * H * H + wj * H + wk, mask=(wj < H) & (wk < H), other=0.0)

    state = d * B * H + rows[:, None] * H + cols[None, :]
    dh = tl.load(ghn_ptr + state, mask=mask, other=0.0).to(tl.float32)
    seq = rows[:, None].to(tl.int64) * stride_b + d * H + cols[None, :]

    s_last = n_steps - 1
    t = _time_index(s_last, L, d)
    ptrs = t[:, None].to(tl.int64) * stride_t + seq
    # tl.where, not &, with the scalar condition: the interpreter rejects bool-scalar & block masks.
    m_first = mask & tl.where(s_last >= 0, L > s_last, False)[:, None]
    go = tl.load(gout_ptr + ptrs, mask=m_first, other=0.0)
    y = tl.load(out_ptr + ptrs, mask=m_first, other=0.0)
    for i in range(0, n_steps):
        s = n_steps - 1 - i
        active = (L > s)[:, None]
        # Prefetch the step processed next (s - 1) before the dependent matmul.
        t_next = _time_index(s - 1, L, d)
        ptrs_next = t_next[:, None].to(tl.int64) * stride_t + seq
        m_next = mask & tl.where(s > 0, L > s - 1, False)[:, None]
        go_next = tl.load(gout_ptr + ptrs_next, mask=m_next, other=0.0)
        y_next = tl.load(out_ptr + ptrs_next, mask=m_next, other=0.0)
        dz = _activate_grad(go.to(tl.float32) + dh, y.to(tl.float32), RELU)
        dz = tl.where(active, dz, 0.0)
        dz = dz.to(gpre_ptr.dtype.element_ty)
        tl.store(gpre_ptr + ptrs, dz, mask=mask)
        dh = tl.where(active, _mm(dz, w, PRECISION, MODE), dh)
        ptrs = ptrs_next
        go = go_next
        y = y_next
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=gpre_ptr.dtype.element_ty)
    dst = gpre_ptr + n_steps.to(tl.int64) * stride_t + seq
    for _ in range(n_steps, T):
        tl.store(dst, zero, mask=mask)
        dst += stride_t
    tl.store(gh0_ptr + state, dh.to(gh0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _elman_fwd_tiled_kernel(
    proj_ptr,
    w_ptr,
    h0_ptr,
    len_ptr,
    out_ptr,
    hn_ptr,
    T,
    B,
    H,
    stride_t,
    stride_b,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    w_base = w_ptr + d * H * H
    seq = rows.to(tl.int64) * stride_b + d * H  # (BLOCK_B,) offset of each row's (b, d) slice
    h0_rows = h0_ptr + d * B * H + rows * H
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)

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
            y = _activate(acc, RELU)
            y = tl.where(active[:, None], y, 0.0)  # finished rows write zeros at t = s
            tl.store(
                dst_rows[:, None] + cn[None, :],
                y.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & (cn < H)[None, :],
            )
        tl.debug_barrier()  # make this step's state visible to the whole CTA before the next reads it

    dst_rows = out_ptr + n_steps.to(tl.int64) * stride_t + seq
    zero = tl.zeros((BLOCK_B, BLOCK_N), dtype=out_ptr.dtype.element_ty)
    for _ in range(n_steps, T):
        for n0 in range(0, H, BLOCK_N):
            cn = n0 + rn
            tl.store(dst_rows[:, None] + cn[None, :], zero, mask=row_ok[:, None] & (cn < H)[None, :])
        dst_rows += stride_t

    # h_n: the last state written (t = L-1 forward, t = 0 reversed), or h0 for empty sequences.
    t_last = tl.where(d == 0, L - 1, 0)
    last_rows = tl.where(L > 0, out_ptr + t_last.to(tl.int64) * stride_t + seq, h0_rows)
    hn_rows = hn_ptr + d * B * H + rows * H
    for n0 in range(0, H, BLOCK_N):
        cn = n0 + rn
        m_n = row_ok[:, None] & (cn < H)[None, :]
        hv = tl.load(last_rows[:, None] + cn[None, :], mask=m_n, other=0.0, cache_modifier=".cg")
        tl.store(hn_rows[:, None] + cn[None, :], hv.to(hn_ptr.dtype.element_ty), mask=m_n)


@triton.jit
def _elman_bwd_tiled_kernel(
    gout_ptr,
    ghn_ptr,
    out_ptr,
    w_ptr,
    len_ptr,
    gpre_ptr,
    gh0_ptr,
    T,
    B,
    H,
    stride_t,
    stride_b,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    d = tl.program_id(0)
    rows, row_ok, L, n_steps = _block_rows(len_ptr, B, T, BLOCK_B)
    w_base = w_ptr + d * H * H
    seq = rows.to(tl.int64) * stride_b + d * H
    ghn_rows = ghn_ptr + d * B * H + rows * H
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)

    # Processing step s (walked from the last one down) needs dh_s = dz_{s+1} @ W_hh[d], with
    # dz_{s+1} read back from grad_pre, or grad_hn for a row whose step s+1 does not exist.
    for i in range(0, n_steps + 1):
        s = n_steps - 1 - i  # s = -1 is the extra pass that produces grad_h0
        active = (L > s) & row_ok
        has_next = (L > s + 1) & row_ok
        t = _time_index(s, L, d)
        t_next = _time_index(s + 1, L, d)
        next_rows = gpre_ptr + t_next.to(tl.int64) * stride_t + seq
        for n0 in range(0, H, BLOCK_N):
            cn = n0 + rn
            n_ok = (cn < H)[None, :]
            dh = tl.load(ghn_rows[:, None] + cn[None, :], mask=(active & ~has_next)[:, None] & n_ok, other=0.0).to(
                tl.float32
            )
            for k0 in range(0, H, BLOCK_K):
                ck = k0 + rk
                dzn = tl.load(
                    next_rows[:, None] + ck[None, :],
                    mask=has_next[:, None] & (ck < H)[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                w = tl.load(w_base + ck[:, None] * H + cn[None, :], mask=(ck < H)[:, None] & n_ok, other=0.0)
                dh += _mm(dzn, w, PRECISION, MODE)
            if s >= 0:
                ptrs = t.to(tl.int64)[:, None] * stride_t + seq[:, None] + cn[None, :]
                m_n = active[:, None] & n_ok
                go = tl.load(gout_ptr + ptrs, mask=m_n, other=0.0).to(tl.float32)
                y = tl.load(out_ptr + ptrs, mask=m_n, other=0.0).to(tl.float32)
                dz = _activate_grad(go + dh, y, RELU)
                dz = tl.where(active[:, None], dz, 0.0)
                tl.store(gpre_ptr + ptrs, dz.to(gpre_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok)
            else:
                # Rows with L = 0 never ran: their grad_h0 is grad_hn (loaded above, active is all rows).
                tl.store(
                    gh0_ptr + d * B * H + rows[:, None] * H + cn[None, :],
                    dh.to(gh0_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & n_ok,
                )
        tl.debug_barrier()

    dst_rows = gpre_ptr + n_steps.to(tl.int64) * stride_t + seq
    zero = tl.zeros((BLOCK_B, BLOCK_N), dtype=gpre_ptr.dtype.element_ty)
    for _ in range(n_steps, T):
        for n0 in range(0, H, BLOCK_N):
            cn = n0 + rn
            tl.store(dst_rows[:, None] + cn[None, :], zero, mask=row_ok[:, None] & (cn < H)[None, :])
        dst_rows += stride_t


# TRITON_INTERPRET=1 at import turns @triton.jit into the CPU interpreter (tests without a GPU).
_INTERPRET = not isinstance(_elman_fwd_kernel, triton.runtime.JITFunction)
_SM_COUNT = {}


def _sm_count(device):
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _launch_config(B, D, H, dtype, device, allow_tf32=None):
    """(on-chip?, grid, kernel meta-parameters) for this problem.

    Register budgets below were read off ptxas for sm_90 (no spills); see the module docstring.
    """
    allow = ALLOW_TF32 if allow_tf32 is None else allow_tf32
    ieee_f32 = dtype == torch.float32 and not allow
    precision = "tf32" if (allow and dtype == torch.float32) else "ieee"
    mode = "dot_f32" if (_INTERPRET and dtype == torch.bfloat16) else "dot"
    block_h = max(16, triton.next_power_of_2(H))
    onchip = block_h <= ONCHIP_MAX_H
    if onchip and ieee_f32:
        # Few rows per program: the (BLOCK_B, H, H) product of the reduce lives in registers.
        block_b = 8 if block_h <= 32 else (4 if block_h <= 64 else 2)
        meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, MODE="reduce", num_warps=4 if block_h <= 32 else 8)
    elif onchip:
        # tl.dot needs M >= 16. Grow the batch block only once programs outnumber SMs (W_hh is
        # read once per program), and not at H = 128, where 32 rows already spill.
        block_b = 16
        if block_h <= 64 and D * triton.cdiv(B, block_b) > _sm_count(device):
            block_b = 32
        meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, MODE=mode, num_warps=8 if block_h >= 128 else 4)
    else:
        block_b = 16
        tile_k = TILE_K or (32 if ieee_f32 else 64)
        meta = dict(BLOCK_B=block_b, BLOCK_N=TILE_N, BLOCK_K=tile_k, MODE=mode, num_warps=8)
    return onchip, (D, triton.cdiv(B, block_b)), dict(meta, PRECISION=precision)


def _check_device(*tensors):
    device = tensors[0].device
    for x in tensors:
        if x.device != device:
            raise RuntimeError(f"fastrnn triton: tensors on {x.device} and {device}; expected one device")
    if device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(f"fastrnn triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def _check_dtype(dtype, *named):
    if dtype not in _DTYPES:
        raise TypeError(f"fastrnn triton kernels support float32, float16 and bfloat16, got {dtype}")
    for name, x in named:
        if x.dtype != dtype:
            raise TypeError(f"fastrnn triton: {name} has dtype {x.dtype}, expected {dtype}")


def _check_shape(name, x, shape):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"fastrnn triton: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _check_contiguous(*named):
    for name, x in named:
        if not x.is_contiguous():
            raise RuntimeError(f"fastrnn triton: {name} must be contiguous")


def _check_lengths(lengths, B, device):
    _check_shape("lengths", lengths, (B,))
    if lengths.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fastrnn triton: lengths must be int64, got {lengths.dtype}")
    return lengths.to(device).contiguous()


def elman_forward(proj, w_hh, h0, lengths, relu, *, allow_tf32=None):
    """Elman recurrence over a packed-by-lengths batch, all directions in one launch.

    proj (T, B, D, H) = x @ W_ih[d]^T + biases; w_hh (D, H, H); h0 (D, B, H); lengths (B,) int64
    with values in [0, T]. Direction 0 runs t = 0 .. L_b-1, direction 1 runs t = L_b-1 .. 0.
    Returns out (T, B, D, H), zero for t >= L_b, and h_n (D, B, H) (h0 where L_b = 0).
    """
    if proj.dim() != 4:
        raise ValueError(f"fastrnn triton: proj must be (T, B, D, H), got shape {tuple(proj.shape)}")
    T, B, D, H = proj.shape
    if D not in (1, 2):
        raise ValueError(f"fastrnn triton: D (directions) must be 1 or 2, got {D}")
    _check_dtype(proj.dtype, ("w_hh", w_hh), ("h0", h0))
    _check_shape("w_hh", w_hh, (D, H, H))
    _check_shape("h0", h0, (D, B, H))
    _check_device(proj, w_hh, h0)
    _check_contiguous(("proj", proj), ("w_hh", w_hh), ("h0", h0))
    lengths = _check_lengths(lengths, B, proj.device)

    out = torch.empty_like(proj)
    h_n = torch.empty_like(h0)
    if T == 0 or B == 0 or H == 0:
        h_n.copy_(h0)
        return out, h_n
    onchip, grid, meta = _launch_config(B, D, H, proj.dtype, proj.device, allow_tf32)
    kernel = _elman_fwd_kernel if onchip else _elman_fwd_tiled_kernel
    kernel[grid](
        proj,
        w_hh,
        h0,
        lengths,
        out,
        h_n,
        T,
        B,
        H,
        B * D * H,
        D * H,
        RELU=bool(relu),
        **meta,
    )
    return out, h_n


def elman_backward(grad_out, grad_hn, out, w_hh, lengths, relu, *, allow_tf32=None):
    """Gradients of ``elman_forward`` with respect to the pre-activations and h0.

    grad_out and out (T, B, D, H), grad_hn (D, B, H) (None means zeros), w_hh (D, H, H),
    lengths (B,). Returns grad_pre (T, B, D, H) = dLoss/dz, zero for t >= L_b, and grad_h0 (D, B, H).
    """
    if out.dim() != 4:
        raise ValueError(f"fastrnn triton: out must be (T, B, D, H), got shape {tuple(out.shape)}")
    T, B, D, H = out.shape
    if D not in (1, 2):
        raise ValueError(f"fastrnn triton: D (directions) must be 1 or 2, got {D}")
    if grad_hn is None:
        grad_hn = out.new_zeros(D, B, H)
    _check_dtype(out.dtype, ("grad_out", grad_out), ("grad_hn", grad_hn), ("w_hh", w_hh))
    _check_shape("grad_out", grad_out, (T, B, D, H))
    _check_shape("grad_hn", grad_hn, (D, B, H))
    _check_shape("w_hh", w_hh, (D, H, H))
    _check_device(out, grad_out, grad_hn, w_hh)
    _check_contiguous(("grad_out", grad_out), ("grad_hn", grad_hn), ("out", out), ("w_hh", w_hh))
    lengths = _check_lengths(lengths, B, out.device)

    grad_pre = torch.empty_like(out)
    grad_h0 = torch.empty_like(grad_hn)
    if T == 0 or B == 0 or H == 0:
        grad_pre.zero_()
        grad_h0.copy_(grad_hn)
        return grad_pre, grad_h0
    onchip, grid, meta = _launch_config(B, D, H, out.dtype, out.device, allow_tf32)
    kernel = _elman_bwd_kernel if onchip else _elman_bwd_tiled_kernel
    kernel[grid](
        grad_out,
        grad_hn,
        out,
        w_hh,
        lengths,
        grad_pre,
        grad_h0,
        T,
        B,
        H,
        B * D * H,
        D * H,
        RELU=bool(relu),
        **meta,
    )
    return grad_pre, grad_h0


def fuses_whole_layer(seq_len, batch, n_in, n_dir, hidden):
    """No whole-layer kernel on GPU: the caller's cuBLAS GEMMs always surround the recurrence."""
    return False
