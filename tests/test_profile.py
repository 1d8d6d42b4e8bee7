"""``python -m fastrnn.profile`` and ``fastrnn.profile.profiled`` end to end on CPU."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import fastrnn
import fastrnn.profile as fprofile
from fastrnn.bench import cases, impls

FUSED_ON_CPU = "numba" in fastrnn.available_backends()


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _trace_names(path):
    trace = json.loads(path.read_text())
    return {event.get("name", "") for event in trace["traceEvents"]}


def test_cli_writes_trace_and_table(tmp_path):
    out = tmp_path / "prof"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastrnn.profile",
            "--device",
            "cpu",
            "--T",
            "8",
            "--B",
            "2",
            "--H",
            "8",
            "--layers",
            "2",
            "--bidirectional",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = _trace_names(out / "trace.json")
    assert {"step/forward", "step/backward"} <= names
    ops = (out / "ops.txt").read_text()
    assert "Self CPU" in ops and "Self CPU" in proc.stdout
    if FUSED_ON_CPU:
        assert any(n.startswith("fastrnn::rnn_fwd") for n in names)
        assert any(n.startswith("fastrnn::rnn_bwd") for n in names)
        assert "fastrnn::rnn_fwd" in ops


def test_context_manager_exports_on_exit(tmp_path):
    rnn = fastrnn.RNN(6, 5, num_layers=2)
    x = torch.randn(7, 3, 6, requires_grad=True)
    with fprofile.profiled(tmp_path, device="cpu") as prof:
        out, h_n = rnn(x)
        (out.sum() + h_n.sum()).backward()
    assert prof.key_averages()
    assert (tmp_path / "ops.txt").read_text().strip()
    names = _trace_names(tmp_path / "trace.json")
    if FUSED_ON_CPU:
        assert any(n.startswith("fastrnn::") for n in names)
        assert "fastrnn::" in fprofile.fastrnn_table(prof)


def test_cli_profiles_the_gru(tmp_path, capsys):
    # In process (the subprocess test above covers the command line itself): --cell GRU profiles fastrnn.GRU.
    out = tmp_path / "prof"
    argv = ["--device", "cpu", "--cell", "GRU", "--T", "6", "--B", "2", "--H", "4", "--warmup", "1", "--steps", "1"]
    assert fprofile.main([*argv, "--out", str(out)]) == 0
    assert "profiling fastrnn.GRU[auto] T=6 B=2 H=4" in capsys.readouterr().err
    names = _trace_names(out / "trace.json")
    assert {"step/forward", "step/backward"} <= names
    if FUSED_ON_CPU:  # the op's label names the cell's mode
        assert any(n.startswith("fastrnn::rnn_fwd[") and ",GRU," in n for n in names)
        assert any(n.startswith("fastrnn::rnn_bwd[") and ",GRU," in n for n in names)
    with pytest.raises(SystemExit):
        fprofile.main([*argv, "--nonlinearity", "relu", "--out", str(out)])  # an RNN option


def test_cli_profiles_the_lstm_with_its_projection(tmp_path, capsys):
    # --cell LSTM: the states are (h_n, c_n), both get upstream gradients; --proj-size adds W_hr.
    out = tmp_path / "prof"
    argv = ["--device", "cpu", "--cell", "LSTM", "--T", "6", "--B", "2", "--H", "4", "--warmup", "1", "--steps", "1"]
    assert fprofile.main([*argv, "--proj-size", "2", "--out", str(out)]) == 0
    assert "profiling fastrnn.LSTM[auto] T=6 B=2 H=4" in capsys.readouterr().err
    names = _trace_names(out / "trace.json")
    assert {"step/forward", "step/backward"} <= names
    if FUSED_ON_CPU:
        assert any(n.startswith("fastrnn::rnn_fwd[") and ",LSTM," in n for n in names)
        assert any(n.startswith("fastrnn::rnn_bwd[") and ",LSTM," in n for n in names)
    assert fprofile.main([*argv, "--impl", "torch", "--out", str(out)]) == 0
    for bad in (["--proj-size", "4"], ["--proj-size", "2", "--cell", "GRU"]):  # proj_size < H, LSTM only
        with pytest.raises(SystemExit):
            fprofile.main([*argv, *bad, "--out", str(out)])


def _triton_kernel_names():
    # find_spec locates the package (kernels/ in a checkout) without importing it, or Triton.
    folder = pathlib.Path(importlib.util.find_spec("fastrnn.kernels").origin).parent / "triton"
    return [
        name
        for module in ("onchip.py", "tiled.py")
        for name in re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+)\(", (folder / module).read_text())
    ]


def test_ncu_command_names_the_kernels():
    cmd = fprofile._ncu_command(["--device", "cuda", "--H", "256", "--steps", "5", "--nvtx"], "out")
    assert cmd.startswith(f"ncu -k {fprofile.NCU_KERNELS} ")
    assert "python -m fastrnn.profile --device cuda --H 256" in cmd and "--no-profiler" in cmd
    assert "--nvtx" not in cmd and "--steps 5" not in cmd
    # --cell travels into the profiled command.
    assert "--cell GRU" in fprofile._ncu_command(["--device", "cuda", "--cell", "GRU"], "out")
    # The regex picks every kernel of kernels/triton/onchip.py and tiled.py (forward, backward,
    # on-chip, tiled and split, all cells), read from the source so that no GPU or Triton is needed.
    kernels = _triton_kernel_names()
    pattern = fprofile.NCU_KERNELS.removeprefix("regex:")
    assert {"_recurrence_fwd_kernel", "_recurrence_bwd_kernel", "_recurrence_fwd_tiled_kernel"} <= set(kernels)
    assert all(re.search(pattern, name) for name in kernels if name.endswith("_kernel"))


def test_workload_steps_and_matches_the_bench():
    work = fprofile.workload("fastrnn", T=9, B=4, H=5, I=3, layers=2, bidirectional=True, packed=True, dtype="float64")
    work.step()
    assert work.x.data.grad is not None and all(p.grad is not None for p in work.module.parameters())
    assert fprofile.workload("torch", T=3, B=2, H=4).module.__class__ is torch.nn.RNN
    gru = fprofile.workload("fastrnn", cell="GRU", T=5, B=3, H=4, layers=2)
    assert type(gru.module) is fastrnn.GRU and gru.module.weight_hh_l1.shape == (12, 4)
    gru.step()
    assert all(p.grad is not None for p in gru.module.parameters())
    assert fprofile.workload("torch", cell="GRU", T=3, B=2, H=4).module.__class__ is torch.nn.GRU
    lstm = fprofile.workload("fastrnn", cell="LSTM", T=5, B=3, H=4, bidirectional=True, packed=True)
    assert type(lstm.module) is fastrnn.LSTM and lstm.module.weight_hh_l0.shape == (16, 4)
    lstm.step()
    assert all(p.grad is not None for p in lstm.module.parameters())
    assert len(lstm.grads) == 3  # output, h_n, c_n
    proj = fprofile.workload("fastrnn", cell="LSTM", T=5, B=3, H=4, proj_size=2, layers=2)
    assert proj.module.proj_size == 2 and proj.module.weight_hr_l1.shape == (2, 4)
    proj.step()
    assert all(p.grad is not None for p in proj.module.parameters())
    assert fprofile.workload("torch", cell="LSTM", T=3, B=2, H=4, proj_size=3).module.__class__ is torch.nn.LSTM
    with pytest.raises(ValueError, match="proj_size"):
        fprofile.workload(cell="GRU", proj_size=2)
    with pytest.raises(ValueError, match="cell"):
        fprofile.workload(cell="LSTMCell")
    with pytest.raises(ValueError, match="nonlinearity"):
        fprofile.workload(cell="GRU", nonlinearity="relu")
    # The bench's packed cases and inputs come from the same builder.
    case = cases.Case("packed", 9, 4, 5, I=3, packed=True, dtype="float64")
    assert case.lengths() == fprofile.packed_lengths(9, 4) == [9, 6, 4, 1]
    assert torch.equal(impls.make_inputs(case, "cpu").data, work.x.data)


def test_profile_does_not_import_the_bench():
    code = "import sys, fastrnn.profile; print(sorted(m for m in sys.modules if m.startswith('fastrnn.bench')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
