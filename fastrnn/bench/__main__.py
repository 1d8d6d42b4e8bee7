"""``python -m fastrnn.bench``: time fastrnn.RNN, fastrnn.GRU and fastrnn.LSTM against
torch.nn.RNN, torch.nn.GRU and torch.nn.LSTM and write a report.

Writes report.md, results.json and PNG plots to bench/results/<device>-<cpu or gpu>-<date>/
under the working directory, with -<grid> added for grids other than the default (or to --out).
Progress goes to stderr, one line per case. See bench/README.md for how to read the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import re
import sys
import time

import torch

from . import cases as grids
from . import impls, memory, report, timing
from .firstcall import first_call, warm_numba_cache


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m fastrnn.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Default: about 8 minutes on a 2-core CPU (4 of them the GRU's); --quick: under a minute.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few shapes, few repeats (under a minute)")
    size.add_argument("--full", action="store_true", help="the whole grid, more repeats")
    size.add_argument("--grid", choices=grids.GRIDS, help="grid by name (tiny: a smoke test for the tests)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        help="comma list, e.g. float32 or float64 or bfloat16,float16: the main "
        "sections run in the first; dtype sections only for the listed ones",
    )
    p.add_argument(
        "--backend",
        help="comma list of fastrnn backends to compare (default: every fused "
        "backend available on the device; 'torch' adds fastrnn's torch path)",
    )
    p.add_argument("--out", help="output directory (default bench/results/<device>-<cpu or gpu>-<date>[-<grid>])")
    p.add_argument(
        "--sections",
        help="comma list of grid sections to run (main, sweep, long, layers, "
        "packed, padded, float64, bfloat16, float16, relu)",
    )
    p.add_argument(
        "--cells",
        help=f"comma list of cells to time ({', '.join(grids.CELL_NAMES)}; default: all): "
        "fastrnn's module of each against torch's",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile of torch's module (slow: compiles every shape, minutes on a small CPU)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-process peak memory runs")
    p.add_argument("--no-first-call", action="store_true", help="skip the first-call latency runs")
    keras = p.add_mutually_exclusive_group()
    keras.add_argument("--keras", action="store_true", help="add the Keras seed model rows to --quick")
    keras.add_argument("--no-keras", action="store_true", help="skip the Keras seed model rows")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _default_out(env, grid):
    name = env["gpu_name"] or env["cpu_model"]
    device = env["device"].split(":")[0]
    stem = f"{device}-{_slug(name)[:32].strip('-')}-{datetime.date.today().isoformat()}"
    if grid != "default":  # a quick or full run must not overwrite the day's default report
        stem += f"-{grid}"
    # Relative to the working directory: `make bench` runs from the checkout, so reports land in its
    # bench/results/ (where the committed ones live) without the installed package knowing the path.
    return os.path.join("bench", "results", stem)


def _rows_for(case, mode, result, saved, peak, device, versions):
    """One row per implementation; speedups against torch's row from the same interleaved run."""
    part = "train" if mode == "train" else "inference"
    base = result.get("torch", {}).get(part)
    rows = []
    for impl, parts in result.items():
        stats = parts[part]
        seconds = stats["ms_median"] / 1e3
        row = dict(
            label=case.label,
            **case.to_json(),
            tokens=case.tokens,
            mode=mode,
            impl=impl,
            backend=impls.backend_of(impl),
            device=device,
            torch=versions["torch"],
            fastrnn=versions["fastrnn"],
            ms_median=stats["ms_median"],
            ms_min=stats["ms_min"],
            repeats=stats["n"],
            inner=stats["inner"],
            tokens_per_s=case.tokens / seconds,
            gflops=case.flops(mode) / seconds / 1e9,
        )
        row["peak_share"] = row["gflops"] / peak if peak else None
        if mode == "train":
            for name, key in (("forward", "fwd_"), ("backward", "bwd_")):
                row[key + "ms_median"], row[key + "ms_min"] = parts[name]["ms_median"], parts[name]["ms_min"]
            if impl in saved:
                row.update(saved[impl])
                for key in ("saved_bytes", "saved_beyond_outputs_bytes"):
                    row["torch_" + key] = saved.get("torch", {}).get(key)
        if base:
            row["speedup"] = base["ms_median"] / stats["ms_median"]
            row["speedup_min"] = base["ms_min"] / stats["ms_min"]
        rows.append(row)
    return rows


def _progress(i, n, case, mode, rows, started):
    parts = []
    for r in rows:
        text = f"{r['impl']} {report.fmt_ms(r['ms_median'])} ms"
        if r["impl"] != "torch" and r.get("speedup"):
            text += f" x{r['speedup']:.2f}"
        parts.append(text)
    _log(
        f"[{i:>2}/{n}] {case.section:<8} {case.label:<32} {mode:<9} "
        + " | ".join(parts)
        + f"  ({time.perf_counter() - started:.0f} s)"
    )


def _pick_cells(arg):
    if arg is None:
        return list(grids.CELL_NAMES)
    wanted = [c.strip() for c in arg.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in grids.CELL_NAMES]
    if unknown or not wanted:
        raise SystemExit(f"--cells {arg!r}: choose from {', '.join(grids.CELL_NAMES)}")
    return [c for c in grids.CELL_NAMES if c in wanted]


def _first_call_plan(grid, backends, cells):
    """(impl, cell, cold cache) of every first-call run: torch and each fused backend with a warm
    cache per cell, and cold caches on the default and full grids (the quick grid skips torch's
    GRU, the tiny grid runs only the last fused one)."""
    plan = []
    for cell in cells:
        impl_list = ([] if grid == "quick" and cell != "RNN" else ["torch"]) + [f"fastrnn[{b}]" for b in backends]
        plan += [(impl, cell, False) for impl in impl_list]
        if grid in ("default", "full"):
            plan += [(f"fastrnn[{b}]", cell, True) for b in backends if b != "torch"]
    return plan[-1:] if grid == "tiny" else plan


def _keras_rows(quick):
    try:
        from . import keras_seed

        return list(keras_seed.run(quick=quick)), None
    except Exception as exc:  # keras is optional: a missing or broken install only drops these rows
        return [], f"keras seed skipped: {type(exc).__name__}: {exc}"


def _pick_backends(arg, device):
    available = impls.fastrnn_backends(device)
    if arg is None:
        return available
    wanted = [b.strip() for b in arg.split(",") if b.strip()]
    try:
        import fastrnn

        usable = set(fastrnn.available_backends())
    except ImportError:
        usable = set()
    missing = [b for b in wanted if b not in usable]
    if missing:
        raise SystemExit(
            f"fastrnn backend(s) {', '.join(missing)} not available here "
            f"(available: {', '.join(sorted(usable)) or 'none'})"
        )
    return wanted


def run(args: argparse.Namespace) -> tuple[str, dict]:
    """Measure what ``args`` (from the parser, plus ``args.argv``) asks; returns the output folder and results."""
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here")
    grid = args.grid or ("quick" if args.quick else "full" if args.full else "default")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtype.split(",")] if args.dtype else None
    for d in dtypes or ():
        if d not in grids.DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(grids.DTYPES)}")
    backends = _pick_backends(args.backend, device)
    cells = _pick_cells(args.cells)
    names = impls.impl_names(device, backends, compile=args.compile)
    case_list = [c for c in grids.grid(grid, device, dtypes) if c.cell in cells]
    if args.sections:
        keep = {s.strip() for s in args.sections.split(",")}
        case_list = [c for c in case_list if c.section in keep]
    budget = timing.BUDGETS[grid]
    env = report.environment(device)
    out = args.out or _default_out(env, grid)
    os.makedirs(out, exist_ok=True)
    base_dtype = dtypes[0] if dtypes else "float32"
    note = None
    if not backends:
        note = (
            "No fused fastrnn backend is available on this device: only torch's modules were timed, "
            "so there are no speedups in this report."
        )
        _log("warning: " + note)
    _log(
        f"fastrnn.bench: grid {grid}, {len(case_list)} cases on {device} ({env['device_name']}), "
        f"{', '.join(names)} -> {out}"
    )

    peaks = {}
    for dtype in dict.fromkeys([base_dtype] + [c.dtype for c in case_list]):
        peaks[dtype] = timing.gemm_peak(device, dtype, grids.GEMM_N[grid])
        _log(f"GEMM peak {dtype}: {peaks[dtype]['gflops']:.1f} GFLOP/s (n={peaks[dtype]['n']})")

    rows, errors, mem_rows, first, keras_rows = [], [], [], [], []
    env.update(
        grid=grid,
        cells=cells,
        impls=names,
        base_dtype=base_dtype,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=("python -m fastrnn.bench " + " ".join(args.argv)).strip(),
        note=note,
        budget=dict(vars(budget)),
        cases=[c.to_json() for c in case_list],
    )
    results = {
        "meta": env,
        "gemm_peak": peaks,
        "rows": rows,
        "memory": mem_rows,
        "first_call": first,
        "keras_seed": keras_rows,
        "errors": errors,
    }

    def save(plots=()):
        # Written after every case too, so that a run killed by a timeout still leaves a report.
        env["run_s"] = time.perf_counter() - started
        report.write_json(results, os.path.join(out, "results.json"))
        report.write_markdown(results, os.path.join(out, "report.md"), plots)

    for i, case in enumerate(case_list, 1):
        reference = impls.reference_module(case, device)
        runners = []
        for impl in names:
            try:
                runners.append(impls.Runner.create(impl, case, device, reference))
            except Exception as exc:  # one implementation failing a case must not end the run
                errors.append(f"{case.label} {impl}: build failed: {type(exc).__name__}: {exc}")
        saved = {}
        for runner in list(runners):
            if runner.impl == impls.COMPILE:
                continue  # the hooks would be traced into the compiled graph and force recompiles
            try:
                saved[runner.impl] = memory.saved_bytes(runner)
            except Exception as exc:
                errors.append(f"{case.label} {runner.impl}: {type(exc).__name__}: {exc}")
                runners.remove(runner)
        modes = ["train"] + (["inference"] if case.inference else [])
        for mode in modes:
            if not runners:
                break
            try:
                result = timing.interleaved(runners, mode, budget, few=case.few_repeats)
            except Exception as exc:
                errors.append(f"{case.label} {mode}: {type(exc).__name__}: {exc}")
                _log("error: " + errors[-1])
                break
            new = _rows_for(case, mode, result, saved, peaks[case.dtype]["gflops"], device, env["versions"])
            rows += new
            _progress(i, len(case_list), case, mode, new, started)
        if device.startswith("cuda") and case.section == "main":
            for runner in runners:
                mem_rows.append(dict(label=case.label, impl=runner.impl, method="cuda", **memory.cuda_peak(runner)))
                mem_rows[-1]["step_bytes"] = mem_rows[-1].pop("peak_bytes")
        del runners, reference
        save()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    # Again after the cases: on a busy machine the first measurement can come out low.
    for dtype, peak in peaks.items():
        again = timing.gemm_peak(device, dtype, grids.GEMM_N[grid])
        peak["gflops_start"], peak["gflops_end"] = peak["gflops"], again["gflops"]
        peak["gflops"] = max(peak["gflops"], again["gflops"])
    for row in rows:
        peak = peaks[row["dtype"]]["gflops"]
        row["peak_share"] = row["gflops"] / peak if peak else None

    if not args.no_memory and not device.startswith("cuda"):
        for case in [c for c in grids.memory_cases(grid) if c.cell in cells]:
            if dtypes:
                case = dataclasses.replace(case, dtype=base_dtype)
            # The tiny grid only checks the path: one subprocess, the last implementation.
            for impl in [n for n in names if n != impls.COMPILE][-1 if grid == "tiny" else 0 :]:
                res = memory.peak_rss(impl, case, device)
                entry = {"label": case.label, "impl": impl, "method": "rss"}
                if "error" in res:
                    entry["error"] = res["error"]
                else:
                    entry.update(
                        before_bytes=1024 * res["rss_before_kb"],
                        peak_bytes=1024 * res["rss_peak_kb"],
                        step_bytes=1024 * res["rss_step_kb"],
                        hwm_reset=res["hwm_reset"],
                    )
                mem_rows.append(entry)
                shown = f"{entry['step_bytes'] / 2**20:.1f} MB" if "step_bytes" in entry else entry["error"]
                _log(
                    f"memory      {case.label:<32} {impl:<16} peak above start of step {shown}"
                    f"  ({time.perf_counter() - started:.0f} s)"
                )

    save()
    if not args.no_first_call:
        plan = _first_call_plan(grid, backends, cells)
        # "Warm" must mean a cache holding every kernel; the tiny grid's cases just compiled its few.
        if grid != "tiny" and any(impl == "fastrnn[numba]" and not cold for impl, _, cold in plan):
            env["numba_warm_up"] = warm_numba_cache()
            shown = env["numba_warm_up"].get("error") or f"{env['numba_warm_up']['warm_up_s']:.1f} s"
            _log(f"python -m fastrnn.kernels.numba (warm cache): {shown}  ({time.perf_counter() - started:.0f} s)")
        for impl, cell, cold in plan:
            row = first_call(impl, device=device, cold_cache=cold, cell=cell)
            first.append(row)
            shown = f"first fwd+bwd {row['first_call_s']:.2f} s" if "error" not in row else row["error"]
            _log(
                f"first call  {cell:<4} {impl:<16} {'cold' if cold else 'warm'} cache: {shown}"
                f"  ({time.perf_counter() - started:.0f} s)"
            )
            save()

    if args.keras or (not args.no_keras and grid in ("default", "full")):
        found, problem = _keras_rows(quick=grid != "full")
        keras_rows.extend(found)
        if problem:
            _log(problem)
        elif keras_rows:
            _log(f"keras seed: {len(keras_rows)} rows  ({time.perf_counter() - started:.0f} s)")

    plots = []
    if not args.no_plots:
        from . import plots as plotting  # matplotlib only after measuring

        plots = plotting.write_all(results, out)
    save(plots)
    for e in errors:
        _log("error: " + e)
    return out, results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    out, results = run(args)
    main_rows = [r for r in results["rows"] if r["section"] == "main" and r["mode"] == "train"]
    summary = report._geomean_line(main_rows, "training step")
    print(f"wrote {os.path.join(out, 'report.md')} ({results['meta']['run_s']:.0f} s)")
    if summary:
        print(summary.replace("**", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
