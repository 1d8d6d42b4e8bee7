"""The Numba launchers against the plain reference loop, at the kernel contract (CONTRACTS.md)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastrnn import reference
from fastrnn.kernels.numba import elman as kernels
from helpers import assert_close


def _case(T, B, D, H, dtype, seed=0, descending=False):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(T, B, D, H, generator=g, dtype=dtype)
    w_hh = torch.randn(D, H, H, generator=g, dtype=dtype) / H**0.5
    h0 = torch.randn(D, B, H, generator=g, dtype=dtype)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    if descending:  # as in a PackedSequence: finished rows form a tail the kernels skip
        lengths = lengths.sort(descending=True).values
    return proj, w_hh, h0, lengths


def _reference(proj, w_hh, h0, lengths, relu):
    """The reference loop fed x = proj and a W_ih that selects each direction's block of it."""
    T, B, D, H = proj.shape
    select = torch.zeros(D, H, D * H, dtype=proj.dtype)
    for d in range(D):
        select[d, :, d * H : (d + 1) * H] = torch.eye(H, dtype=proj.dtype)
    out, h_n = reference.elman(proj.reshape(T, B, D * H), h0, select, w_hh, None, lengths, relu)
    return out.view(T, B, D, H), h_n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("T,B,D,H", [(1, 1, 1, 1), (7, 5, 2, 13), (30, 9, 2, 64), (12, 40, 1, 70), (3, 130, 1, 512)])
@pytest.mark.parametrize("descending", [False, True])
def test_forward_and_backward_match_reference(dtype, relu, T, B, D, H, descending):
    proj, w_hh, h0, lengths = _case(T, B, D, H, dtype, descending=descending)
    out, h_n = kernels.elman_forward(proj, w_hh, h0, lengths, relu)
    leaves = [t.clone().requires_grad_() for t in (proj, h0)]
    ref_out, ref_h_n = _reference(leaves[0], w_hh, leaves[1], lengths, relu)
    tol = 1e-12 if dtype == torch.float64 else 2e-5 * (1 + T / 16)
    assert_close(out, ref_out, tol, "out")
    assert_close(h_n, ref_h_n, tol, "h_n")
    padded = torch.arange(T)[:, None] >= lengths[None, :]
    assert bool((out[padded] == 0).all()), "out must be exactly zero past each length"

    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    grad_hn = torch.randn(h_n.shape, generator=g, dtype=dtype)
    grad_pre, grad_h0 = kernels.elman_backward(grad_out, grad_hn, out, w_hh, lengths, relu)
    ref_grad_proj, ref_grad_h0 = torch.autograd.grad([ref_out, ref_h_n], leaves, [grad_out, grad_hn])
    assert_close(grad_pre, ref_grad_proj, tol * 4, "grad_pre")
    assert_close(grad_h0, ref_grad_h0, tol * 4, "grad_h0")
    assert bool((grad_pre[padded] == 0).all())


@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (1, 64, 64), (3, 5, 2), (4, 4, 4), (9, 6, 7), (16, 130, 33)])
def test_blocked_hand_matmul(n, k, m):
    import numpy as np

    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((n, k)), rng.standard_normal((k, m))
    out = np.full((n, m), np.nan)
    kernels._hand_matmul(a, w, out)
    np.testing.assert_allclose(out, a @ w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (4, 64), (13, 7), (64, 64)])
def test_single_row_dot_products(n, k, dtype):
    import numpy as np

    rng = np.random.default_rng(1)
    v, w_rows = rng.standard_normal(k).astype(dtype), rng.standard_normal((n, k)).astype(dtype)
    out = np.full(n, np.nan, dtype)
    kernels._row_dots(v, w_rows, out)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(out, w_rows.astype("float64") @ v.astype("float64"), rtol=tol, atol=tol)


def test_every_driver_is_exercised_above():
    assert kernels._threads() == 2, "conftest runs the suite with 2 threads"
    plans = {kernels._plan(B, D, H, torch.float32) for B, D, H in [(1, 1, 1), (5, 2, 13), (130, 1, 512)]}
    assert plans == {(False, None), (False, 5), (kernels._OPENBLAS is not None, 65)}


def test_rows_per_task_fills_threads_without_splitting_more():
    assert kernels._rows_per_task(batch=1, n_dir=1, threads=2) == 1
    assert kernels._rows_per_task(batch=64, n_dir=1, threads=2) == 32
    assert kernels._rows_per_task(batch=64, n_dir=2, threads=2) == 64
    assert kernels._rows_per_task(batch=5, n_dir=1, threads=4) == 2


@pytest.mark.parametrize(
    "bad,error",
    [
        (lambda p, w, h, l: (p.float(), w, h, l), TypeError),
        (lambda p, w, h, l: (p.half(), w.half(), h.half(), l), TypeError),
        (lambda p, w, h, l: (p.transpose(0, 1), w, h, l), ValueError),
        (lambda p, w, h, l: (p, w[:, :2], h, l), ValueError),
        (lambda p, w, h, l: (p, w, h, l.int()), ValueError),
        (lambda p, w, h, l: (p, w, h.transpose(1, 2).contiguous().transpose(1, 2), l), ValueError),
        (lambda p, w, h, l: (p, w, h[:, :2].contiguous(), l), ValueError),
    ],
)
def test_launcher_rejects_bad_arguments(bad, error):
    args = bad(*_case(4, 3, 1, 3, torch.float64))
    with pytest.raises(error):
        kernels.elman_forward(*args, False)


def test_compiled_kernels_are_cached_on_disk_and_reused(tmp_path):
    """A second process loads the kernels from the cache instead of compiling them again."""
    script = textwrap.dedent("""
        import torch
        from fastrnn.kernels.numba import elman
        p = torch.randn(3, 2, 1, 4); w = torch.randn(1, 4, 4); h = torch.zeros(1, 2, 4)
        out, h_n = elman.elman_forward(p, w, h, torch.tensor([3, 1]), False)
        elman.elman_backward(out, h_n, out, w, torch.tensor([3, 1]), False)
        stats = [elman._elman_fwd_kernel.stats, elman._elman_bwd_kernel.stats]
        print(sum(sum(s.cache_hits.values()) for s in stats), sum(sum(s.cache_misses.values()) for s in stats))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], env=env, check=True, timeout=300, capture_output=True, text=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0] == ["0", "2"], f"first process should compile both kernels, got hits/misses {runs[0]}"
    assert runs[1] == ["2", "0"], f"second process should load both from {tmp_path}, got {runs[1]}"
    assert list(tmp_path.rglob("*.nbi"))


def test_warm_up_compiles_every_kernel_for_both_dtypes():
    kernels.warm_up()
    for kernel in (
        kernels._elman_fwd_kernel,
        kernels._elman_fwd_serial_kernel,
        kernels._layer_fwd_kernel,
        kernels._elman_bwd_kernel,
        kernels._elman_bwd_serial_kernel,
        kernels._layer_bwd_kernel,
    ):
        dtypes = {str(signature[0].dtype) for signature in kernel.signatures}
        assert dtypes == {"float32", "float64"}, f"{kernel.__name__}: {dtypes}"


@pytest.mark.skipif(kernels._OPENBLAS is None, reason="SciPy's OpenBLAS not found")
def test_blas_pinning_restores_the_user_setting_across_threads():
    import threading

    blas = kernels._OPENBLAS
    original = blas.scipy_openblas_get_num_threads()
    blas.scipy_openblas_set_num_threads(2)
    inside, release = threading.Barrier(3), threading.Event()

    def pinned():
        with kernels._single_threaded_blas():
            inside.wait()
            release.wait()

    workers = [threading.Thread(target=pinned) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        inside.wait()
        assert blas.scipy_openblas_get_num_threads() == 1
        release.set()
        for worker in workers:
            worker.join()
        assert blas.scipy_openblas_get_num_threads() == 2
    finally:
        release.set()
        blas.scipy_openblas_set_num_threads(original)


def test_python_threads_share_the_workqueue_layer_safely():
    """The workqueue layer aborts the process on concurrent parallel launches unless they are
    serialised; several Python threads calling the kernels must simply all finish."""
    script = textwrap.dedent("""
        import threading, torch
        from fastrnn.kernels.numba import elman
        torch.set_num_threads(2)
        p = torch.randn(20, 8, 1, 16); w = torch.randn(1, 16, 16) * 0.1; h = torch.zeros(1, 8, 16)
        lengths = torch.full((8,), 20)
        def work():
            for _ in range(200):
                out, h_n = elman.elman_forward(p, w, h, lengths, False)
                elman.elman_backward(out, h_n, out, w, lengths, False)
        threads = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in threads]; [t.join() for t in threads]
        import numba; print(numba.threading_layer())
    """)
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["workqueue"]


@pytest.mark.parametrize("batch,rows_per_task", [(1, 1), (7, 3), (32, 16), (5, 2), (64, 64)])
def test_tasks_cover_every_row_once_interleaved(batch, rows_per_task):
    blocks = -(-batch // rows_per_task)
    covered = []
    for task in range(2 * blocks):  # two directions
        d, b0, stride, rows = kernels._task_rows(task, batch, rows_per_task)
        assert rows <= rows_per_task and stride == blocks
        covered += [(d, b0 + i * stride) for i in range(rows)]
    assert sorted(covered) == [(d, b) for d in range(2) for b in range(batch)]


def test_layer_and_backward_launchers_check_shapes_before_running():
    x, w, h0, lengths = torch.randn(4, 3, 5), torch.randn(6, 6), torch.zeros(1, 3, 6), torch.full((3,), 4)
    params = [(torch.randn(6, 5), w, torch.zeros(6), torch.zeros(6))]
    out, h_n = kernels.layer_forward(x, params, h0, lengths, False)
    with pytest.raises(ValueError):
        kernels.layer_forward(x, [(params[0][0][:, :4].contiguous(), w)], h0, lengths, False)
    with pytest.raises(ValueError):  # a bias of the wrong size
        kernels.layer_forward(x, [(*params[0][:3], torch.zeros(5))], h0, lengths, False)
    with pytest.raises(ValueError):  # a fifth parameter
        kernels.layer_forward(x, [(*params[0], torch.zeros(6))], h0, lengths, False)
    with pytest.raises(TypeError, match="direction 0 parameter 1"):
        kernels.layer_forward(x, [(params[0][0], w.double())], h0, lengths, False)
    with pytest.raises(ValueError):
        kernels.layer_backward(out[:3].contiguous(), h_n, x, params, out, h0, lengths, False, True)
    with pytest.raises(ValueError):
        kernels.layer_backward(out, h_n[:, :2].contiguous(), x, params, out, h0, lengths, False, True)
    w = w[None]
    with pytest.raises(ValueError):
        kernels.elman_backward(out[:3].contiguous(), h_n, out, w, lengths, False)
