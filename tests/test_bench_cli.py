"""``python -m fastrnn.bench`` end to end on the tiny grid; the grid and FLOP model it reads.

No timing asserts: only that the run finishes and its files exist and parse.
"""

import json
import os
import subprocess
import sys

import pytest

from fastrnn.bench import cases, gpu_check
from fastrnn.bench.__main__ import _default_out, _parser


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Run outside the checkout: the installed package needs nothing from it (its subprocesses too).
    proc = subprocess.run(
        [sys.executable, "-m", "fastrnn.bench", "--grid", "tiny", "--no-keras", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_tiny_run_writes_report_json_and_plots(tiny_run):
    out, proc = tiny_run
    assert "[1/" in proc.stderr.replace(" ", "")  # one progress line per case
    results = json.loads((out / "results.json").read_text())
    meta = results["meta"]
    assert meta["torch_threads"] >= 1 and meta["cpu_model"] and meta["versions"]["torch"]
    assert results["gemm_peak"]["float32"]["gflops"] > 0
    rows = results["rows"]
    assert {r["mode"] for r in rows} == {"train", "inference"}
    assert {r["label"] for r in rows} >= {c.label for c in cases.grid("tiny")}
    for row in rows:
        assert row["ms_median"] >= row["ms_min"] > 0
        assert row["tokens_per_s"] > 0 and row["gflops"] > 0 and row["device"] == "cpu"
    fused = [r for r in rows if r["impl"] != "torch"]
    if fused:  # a fused backend is available: speedups and saved-bytes comparisons exist
        assert all(r["speedup"] > 0 and r["speedup_min"] > 0 for r in fused)
        assert all(r["torch_saved_bytes"] > 0 for r in fused if r["mode"] == "train")
        assert all(
            r["saved_beyond_outputs_bytes"] < r["torch_saved_beyond_outputs_bytes"]
            for r in fused
            if r["mode"] == "train"
        )
    assert results["memory"] and all("step_bytes" in m for m in results["memory"])
    assert results["first_call"] and all("first_call_s" in r for r in results["first_call"])
    report = (out / "report.md").read_text()
    for heading in ("# fastrnn benchmark", "## Training step", "## Inference", "## Memory", "## First call"):
        assert heading in report
    for png in ("speedup_vs_hidden.png", "memory.png"):
        if (out / png).exists() or png == "memory.png":
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({png})" in report


def test_other_grids_do_not_overwrite_the_default_report():
    env = {"gpu_name": None, "cpu_model": "Some CPU", "device": "cpu"}
    full, quick = _default_out(env, "default"), _default_out(env, "quick")
    assert quick != full and quick.startswith(full)
    # Under the working directory (the checkout's bench/results when run from its root).
    assert full.startswith(os.path.join("bench", "results", "cpu-some-cpu-"))


def test_options_exist():
    args = _parser().parse_args(
        ["--quick", "--device", "cpu", "--dtype", "float64", "--backend", "numba", "--out", "x"]
    )
    assert args.quick and args.dtype == "float64" and args.backend == "numba" and args.out == "x"
    assert _parser().parse_args(["--full"]).full


def test_default_grid_covers_the_issue():
    default = cases.grid("default", "cpu")
    shapes = {(c.T, c.B, c.H) for c in default if c.dtype == "float32" and c.layers == 1 and not c.bidirectional}
    assert set(cases.TRAIN_SHAPES) <= shapes  # holds (100, 64, 512) and (300, 20, 800)
    assert any(c.T >= 1000 for c in default)
    assert any(c.bidirectional for c in default) and any(c.layers > 1 for c in default)
    assert any(c.packed for c in default) and any(c.dtype == "float64" for c in default)
    assert len({c.key() for c in default}) == len(default)
    half = {c.dtype for c in cases.grid("default", "cuda")}
    assert {"bfloat16", "float16"} <= half and "float64" not in half
    assert {c.dtype for c in cases.grid("quick", "cpu", ["float64"])} == {"float64"}


def test_flop_model():
    case = cases.Case("main", 100, 64, 512)
    assert case.forward_flops() == 2 * 100 * 64 * 512 * (512 + 512)
    assert case.flops("train") == 3 * case.forward_flops()
    stacked = cases.Case("layers", 10, 2, 4, I=3, layers=2, bidirectional=True)
    assert stacked.forward_flops() == 2 * (2 * 20 * 4 * (3 + 4)) + 2 * (2 * 20 * 4 * (8 + 4))
    packed = cases.Case("packed", 200, 32, 256, packed=True)
    lengths = packed.lengths()
    assert lengths[0] == 200 and lengths[-1] == 20 and lengths == sorted(lengths, reverse=True)
    assert packed.tokens == sum(lengths)


def test_gpu_check_versions_runs_anywhere(capsys):
    assert gpu_check.main(["versions"]) == 0
    assert capsys.readouterr().out.startswith("python ")
