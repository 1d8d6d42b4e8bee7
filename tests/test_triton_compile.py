"""The Triton kernels compile for a real GPU target (sm_90) with the arguments the launchers pass,
without a GPU: the interpreter runs the kernels' Python, never Triton's compiler, so a kernel can
pass every interpreter test and still fail to compile. bench/triton_resources.py does the work
(and prints registers, stack and shared memory); here it compiles the split kernels' persistent
variant (its grid barrier), and the LSTM with proj_size on chip and split."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
if torch.cuda.is_available():  # the CUDA tests compile them for the GPU at hand
    pytest.skip("compiled for real by the CUDA tests", allow_module_level=True)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def compile_rows(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns without it; the launchers' default
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "triton_resources.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [line.split() for line in run.stdout.splitlines()[1:]]


def test_split_persistent_kernels_compile_for_sm90():
    rows = compile_rows("--modes", "RNN_TANH,GRU,LSTM", "--hidden", "1024", "--batch", "16", "--split", "persistent")
    # Per cell and dtype: forward and backward, tiled, split 64 ways, with the grid barrier.
    assert len(rows) == 3 * 2 * 2
    for row in rows:
        assert row[5].endswith("tiled_kernel") and row[6:9] == ["(1,", "1,", "64)"] and row[9] == "1", row


def test_lstm_projection_kernels_compile_for_sm90():
    # On chip at H = 48; split at H = 1024, with W_hr's two exchanges (two barriers) per step.
    args = ("--modes", "LSTM", "--dtypes", "bfloat16", "--hidden", "48,1024", "--batch", "16", "--proj", "20")
    rows = compile_rows(*args, "--split", "persistent")
    assert [row[5] for row in rows] == [
        "_recurrence_fwd_kernel",
        "_recurrence_bwd_kernel",
        "_recurrence_fwd_tiled_kernel",
        "_recurrence_bwd_tiled_kernel",
    ]
    assert [row[-6] for row in rows] == ["0", "0", "1", "1"]  # the sync column
