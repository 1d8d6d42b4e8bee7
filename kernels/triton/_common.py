"""What every recurrence kernel shares: row blocks, time index, the matmul modes, tanh, zero tails,
launch-config helpers and the launchers' checks."""

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tanh(z):
    # exp-based tanh on |z| (no overflow); tl has no portable tanh across triton 3.6 and 3.9.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


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
def _state_layout(B, H, P, stride_t, stride_b, CELL: tl.constexpr):
    """(K, out's stride_t, out's stride_b). For the LSTM h, out and W_hh's columns are K = P wide
    (proj_size with W_hr, else H); everything else (the gates, c, proj, saved and the strides
    passed: stride_t = B*D*H, stride_b = D*H) is H wide, as all of every other cell is."""
    if CELL == "LSTM":
        width = P
        out_stride_b = stride_b // H * P
        out_stride_t = B * out_stride_b
    else:
        width = H
        out_stride_b = stride_b
        out_stride_t = stride_t
    return width, out_stride_t, out_stride_b


@triton.jit
def _prev_rows(s, L, d, h0_rows, out_rows, stride_t):
    # Row pointers to h_{s-1}, the state processing step s starts from: h0 at a sequence's first
    # step, else the output of the step before (t-1 forward, t+1 reversed). out_rows is at t = 0.
    t_prev = _time_index(s - 1, L, d)
    return tl.where(s == 0, h0_rows, out_rows + t_prev.to(tl.int64) * stride_t)


@triton.jit
def _zero_tail(
    ptr, seq, n_steps, T, stride_t, H, mask, GATES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr
):
    # Steps past the block's longest length are never processed, so nothing else zeroes them.
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=ptr.dtype.element_ty)
    dst = ptr + n_steps.to(tl.int64) * stride_t + seq
    for _ in range(n_steps, T):
        for g in tl.static_range(GATES):
            tl.store(dst + g * H, zero, mask=mask)
        dst += stride_t


@triton.jit
def _zero_tail_tiled(
    ptr,
    seq,
    n_steps,
    T,
    stride_t,
    H,
    row_ok,
    GATES: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    lo,
    hi,
):
    # _zero_tail for rows of any width: seq (BLOCK_B,) row offsets, columns [lo, hi) of each of the
    # GATES H-wide blocks in N tiles (hi <= H).
    rn = tl.arange(0, BLOCK_N)
    dst_rows = ptr + n_steps.to(tl.int64) * stride_t + seq
    zero = tl.zeros((BLOCK_B, BLOCK_N), dtype=ptr.dtype.element_ty)
    for _ in range(n_steps, T):
        for g in tl.static_range(GATES):
            for n0 in range(lo, hi, BLOCK_N):
                cn = n0 + rn
                tl.store(dst_rows[:, None] + g * H + cn[None, :], zero, mask=row_ok[:, None] & (cn < hi)[None, :])
        dst_rows += stride_t


# TRITON_INTERPRET=1 at import turns @triton.jit into the CPU interpreter (tests without a GPU).
INTERPRET = not isinstance(_tanh, triton.runtime.JITFunction)
_SM_COUNT = {}


def sm_count(device):
    # The interpreter runs one program at a time, even on CUDA tensors: one SM, as far as a
    # grid barrier can tell.
    if device.type != "cuda" or INTERPRET:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def matmul_mode(dtype, allow_tf32):
    """(IEEE float32?, tl.dot input precision, _mm MODE for the tensor-core dtypes)."""
    ieee_f32 = dtype == torch.float32 and not allow_tf32
    precision = "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"
    mode = "dot_f32" if (INTERPRET and dtype == torch.bfloat16) else "dot"
    return ieee_f32, precision, mode


def check_device(*tensors):
    device = tensors[0].device
    for x in tensors:
        if x.device != device:
            raise RuntimeError(f"fastrnn triton: tensors on {x.device} and {device}; expected one device")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"fastrnn triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def check_dtype(dtype, *named):
    if dtype not in DTYPES:
        raise TypeError(f"fastrnn triton kernels support float32, float16 and bfloat16, got {dtype}")
    for name, x in named:
        if x.dtype != dtype:
            raise TypeError(f"fastrnn triton: {name} has dtype {x.dtype}, expected {dtype}")


def check_shape(name, x, shape):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"fastrnn triton: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def check_contiguous(*named):
    for name, x in named:
        if not x.is_contiguous():
            raise RuntimeError(f"fastrnn triton: {name} must be contiguous")


def check_lengths(lengths, B, device):
    check_shape("lengths", lengths, (B,))
    if lengths.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fastrnn triton: lengths must be int64, got {lengths.dtype}")
    return lengths.to(device).contiguous()
