"""results.json and report.md from the rows a run measured (no measuring here).

Every row names its cell (``RNN``, ``GRU`` or ``LSTM``, in the label too) and is compared with
torch's module of that cell; rows of reports written before GRU rows existed have no ``cell`` and
are RNN rows. :data:`GOALS` holds what the issues ask of a cell; the report checks them.
"""

import json
import math
import os

from .cases import CELL_NAMES, geomean

# What the issues ask of a cell's fused module against torch's, on the CPU grid (one layer, the
# run's dtype): issue 16, item 5 for the LSTM (against torch.nn.LSTM, oneDNN on CPU for float32).
GOALS = {
    "LSTM": dict(
        issue="issue 16, item 5",
        lowest_train=1.0,  # the training step's lowest speedup over the grid's shapes
        at_shape=((100, 1, 64), 3.0),  # (T, B, H), the speedup there
        geomean_train=1.5,
        packed_over_padded=0.8,  # packed time / the same batch padded, at most
        packed_vs_torch=3.0,  # speedup against torch's module on the same PackedSequence
        first_call_warm_s=1.0,  # a fresh process's first forward+backward, Numba cache warm
    )
}


def write_json(results, path):
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False, default=str)
        f.write("\n")


def fmt_ms(ms):
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _ms(row, prefix=""):
    if f"{prefix}ms_median" not in row:
        return "—"
    return f"{fmt_ms(row[prefix + 'ms_median'])} ({fmt_ms(row[prefix + 'ms_min'])})"


def _num(value, fmt="{:.3g}"):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return fmt.format(value)


def _tokens(value):
    if value is None:
        return "—"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _bytes(n):
    if n is None:
        return "—"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.3g} {unit}"
    return f"{sign}{n} B"


def _speedup(row):
    if row["impl"] == "torch":
        return "1"
    if row.get("speedup") is None:
        return "—"
    return f"**×{row['speedup']:.2f}** (×{row['speedup_min']:.2f})"


def _table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _cell(row):
    return row.get("cell", "RNN")


def _cells(rows):
    """The cells ``rows`` hold, in CELL_NAMES order (RNN first)."""
    present = {_cell(r) for r in rows}
    return [c for c in CELL_NAMES if c in present] + sorted(present - set(CELL_NAMES))


def _rows(results, mode, sections=None, dtype=None, cell=None):
    return [
        r
        for r in results["rows"]
        if r["mode"] == mode
        and (sections is None or r["section"] in sections)
        and (dtype is None or r["dtype"] == dtype)
        and (cell is None or _cell(r) == cell)
    ]


def _error_line(row):
    return [row["label"], row["impl"], f"error: {row['error']}"] + ["—"] * 3


def _fused_impls(rows):
    return sorted({r["impl"] for r in rows if r["impl"] != "torch"})


def _speedups(rows, impl):
    return [r for r in rows if r["impl"] == impl and r.get("speedup")]


def _geomean_line(rows, what):
    """One sentence per cell: each fused implementation's geometric-mean speedup over ``rows``."""
    out = []
    for cell in _cells(rows):
        parts = []
        for impl in _fused_impls(rows):
            mine = _speedups([r for r in rows if _cell(r) == cell], impl)
            if mine:
                med = geomean(r["speedup"] for r in mine)
                low = geomean(r["speedup_min"] for r in mine)
                parts.append(f"{impl} **×{med:.2f}** by median (×{low:.2f} by min) over {len(mine)} shapes")
        if parts:
            out.append(f"Geometric mean speedup against torch.nn.{cell}, {what}: " + "; ".join(parts) + ".")
    return "\n\n".join(out)


def _train_table(rows, with_peak=True):
    if not rows:
        return ""
    header = ["shape", "impl", "ms median (min)", "fwd / bwd ms", "tokens/s", "GFLOP/s"]
    header += (["% GEMM peak"] if with_peak else []) + ["× torch median (min)", "saved for bwd"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(_error_line(r))
            continue
        line = [
            r["label"],
            r["impl"],
            _ms(r),
            f"{fmt_ms(r['fwd_ms_median'])} / {fmt_ms(r['bwd_ms_median'])}",
            _tokens(r["tokens_per_s"]),
            _num(r["gflops"]),
        ]
        line += [_num(100 * r["peak_share"], "{:.1f}%") if r.get("peak_share") else "—"] if with_peak else []
        line += [_speedup(r), _bytes(r.get("saved_bytes"))]
        lines.append(line)
    return _table(header, lines)


def _inference_table(rows):
    if not rows:
        return ""
    header = ["shape", "impl", "ms median (min)", "tokens/s", "GFLOP/s", "× torch median (min)"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(_error_line(r))
            continue
        lines.append([r["label"], r["impl"], _ms(r), _tokens(r["tokens_per_s"]), _num(r["gflops"]), _speedup(r)])
    return _table(header, lines)


def _sweep_tables(results):
    """B x H tables of speedups at T = 100, for the cells the grid sweeps (RNN)."""
    base = results["meta"]["base_dtype"]
    swept = {_cell(r) for r in results["rows"] if r["section"] == "sweep"}
    rows = [
        r
        for r in _rows(results, "train", dtype=base)
        if r["T"] == 100
        and r["layers"] == 1
        and not r["bidirectional"]
        and not r["packed"]
        and not r.get("proj_size")
        and r.get("speedup")
    ]
    out = []
    for cell in [c for c in _cells(rows) if c in swept]:
        for impl in _fused_impls(rows):
            mine = {(r["B"], r["H"]): r["speedup"] for r in rows if r["impl"] == impl and _cell(r) == cell}
            if not mine:
                continue
            batches, hidden = sorted({b for b, _ in mine}), sorted({h for _, h in mine})
            lines = [[f"B={b}"] + [_num(mine.get((b, h)), "×{:.2f}") for h in hidden] for b in batches]
            out.append(
                f"{impl} against torch.nn.{cell}, training step, T=100, {base}, median speedup:\n\n"
                + _table(["", *(f"H={h}" for h in hidden)], lines)
            )
    return "\n\n".join(out)


def _key(row, k):
    return _cell(row) if k == "cell" else row.get(k)


_TWIN_KEYS = ("cell", "T", "B", "H", "I", "layers", "bidirectional", "nonlinearity", "dtype", "proj_size")


def _twin(rows, packed):
    """The padded row of ``packed``'s configuration and implementation, or None."""
    return next(
        (
            r
            for r in rows
            if not r["packed"]
            and "error" not in r
            and r["impl"] == packed["impl"]
            and all(_key(r, k) == _key(packed, k) for k in _TWIN_KEYS)
        ),
        None,
    )


def _packed_table(results):
    train = _rows(results, "train")
    lines = []
    for packed in (r for r in train if r["packed"] and "error" not in r):
        twin = _twin(train, packed)
        lines.append(
            [
                packed["label"],
                packed["impl"],
                _ms(packed),
                _ms(twin) if twin else "—",
                _num(packed["ms_median"] / twin["ms_median"], "{:.2f}") if twin else "—",
                _speedup(packed),
                _speedup(twin) if twin else "—",
            ]
        )
    header = [
        "case (lengths T..T/10)",
        "impl",
        "packed ms",
        "padded ms",
        "packed / padded",
        "× torch packed",
        "× torch padded",
    ]
    return _table(header, lines) if lines else ""


def _memory_section(results):
    out = []
    train = [r for r in _rows(results, "train") if "saved_bytes" in r]
    lines, same = [], 0
    for r in train:
        if r["impl"] == "torch" or r.get("torch_saved_bytes") is None:
            continue
        diff = r["torch_saved_bytes"] - r["saved_bytes"]
        share = diff / r["torch_saved_bytes"] if r["torch_saved_bytes"] else float("nan")
        if abs(share) < 0.01 and r["section"] != "main":
            same += 1  # the table lists the main shapes and every case that differs
            continue
        lines.append(
            [
                r["label"],
                r["impl"],
                _bytes(r["torch_saved_bytes"]),
                _bytes(r["saved_bytes"]),
                f"{'+' if diff >= 0 else ''}{_bytes(diff)} ({100 * share:+.0f}%)",
                _bytes(r.get("torch_saved_beyond_outputs_bytes")),
                _bytes(r.get("saved_beyond_outputs_bytes")),
            ]
        )
    if lines:
        out.append(
            "Bytes autograd keeps for backward (unique storages; parameters and input excluded); "
            "positive = fastrnn keeps less than torch. The last two columns also leave out the "
            "storages the call returns (output, h_n): what backward keeps on top of them while "
            "the caller holds them.\n\n"
            + _table(
                ["case", "impl", "torch", "impl", "saved against torch", "torch beyond outputs", "impl beyond outputs"],
                lines,
            )
            + (f"\n\n{same} more cases are within 1% of torch." if same else "")
        )
    memory = results.get("memory", [])
    if memory:
        torch_step = {m["label"]: m.get("step_bytes") for m in memory if m["impl"] == "torch"}
        lines = []
        for m in memory:
            if "error" in m:
                lines.append([m["label"], m["impl"], "—", f"error: {m['error']}", "—"])
                continue
            ref = torch_step.get(m["label"])
            ratio = "1" if m["impl"] == "torch" else (_num(m["step_bytes"] / ref, "{:.2f}") if ref else "—")
            lines.append([m["label"], m["impl"], _bytes(m["before_bytes"]), _bytes(m["step_bytes"]), ratio])
        what = (
            "CUDA `max_memory_allocated` above what was allocated before the step"
            if memory[0].get("method") == "cuda"
            else "resident set (VmHWM after resetting it), each in a fresh process, kernels warmed up first"
        )
        out.append(
            f"Peak memory of one training step: {what}:\n\n"
            + _table(["case", "impl", "before step", "peak above before", "/ torch"], lines)
        )
    return "\n\n".join(out)


def _first_call_table(rows):
    lines = []
    for r in rows:
        cache = "cold (empty JIT cache)" if r.get("cold_cache") else "warm"
        if "error" in r:
            lines.append([_cell(r), r["impl"], cache, f"error: {r['error']}", "—", "—", "—"])
            continue
        lines.append(
            [
                _cell(r),
                r["impl"],
                cache,
                f"{r['import_torch_s']:.2f}",
                f"{r['import_fastrnn_s']:.2f}" if r["impl"] != "torch" else "—",
                f"{r['first_call_s']:.2f}",
                f"{1e3 * r['second_call_s']:.1f} ms",
            ]
        )
    return _table(["cell", "impl", "cache", "import torch s", "import fastrnn s", "first fwd+bwd s", "second"], lines)


def _first_call_text(results):
    rows = results["first_call"]
    shape = next((tuple(r.get(k) for k in "TBH") for r in rows if "T" in r), None)
    text = (
        f"Small module (T, B, H) = {shape}, `nn.RNN(H, H)`, `nn.GRU(H, H)` or `nn.LSTM(H, H)`, or fastrnn's, "
        "interpreter start not counted"
    )
    warm_up = results["meta"].get("numba_warm_up")
    if warm_up:
        done = f"took {warm_up['warm_up_s']:.1f} s" if "warm_up_s" in warm_up else f"failed: {warm_up.get('error')}"
        text += f"; warm = after `python -m fastrnn.kernels.numba` filled Numba's cache (it {done} here)"
    return text + ":\n\n" + _first_call_table(rows)


def _packed_pair(train, cell, impl, base):
    """(packed row, its padded twin) of ``impl`` for the cell's first one-layer packed case (the
    run's dtype first), or None."""
    candidates = [
        r
        for r in train
        if r["packed"]
        and "error" not in r
        and r["impl"] == impl
        and _cell(r) == cell
        and r["layers"] == 1
        and not r["bidirectional"]
    ]
    candidates.sort(key=lambda r: r["dtype"] != base)  # the run's dtype first
    for mine in candidates:
        twin = _twin(train, mine)
        if twin is not None:
            return mine, twin
    return None


def _packed_ratio(train, cell, impl, base):
    """(impl packed / padded time, torch's) for the cell's first one-layer packed case, or None."""
    pair = _packed_pair(train, cell, impl, base)
    if pair is None:
        return None
    mine, twin = pair
    ref = next((r for r in train if r["impl"] == "torch" and _same_config(r, mine)), None)
    ref_twin = _twin(train, ref) if ref else None
    return mine["ms_median"] / twin["ms_median"], (ref["ms_median"] / ref_twin["ms_median"] if ref_twin else None)


def _same_config(r, other):
    return r["packed"] == other["packed"] and "error" not in r and all(_key(r, k) == _key(other, k) for k in _TWIN_KEYS)


def _verdict(value, limit, at_least=True):
    if value is None or not math.isfinite(value):
        return "not measured"
    return "met" if (value >= limit if at_least else value <= limit) else "**not met**"


def _goal_lines(results, cell, impl, goals):
    """[goal, measured, verdict] rows of one cell's fused implementation against ``goals``."""
    base = results["meta"]["base_dtype"]
    train_all = _rows(results, "train")
    main = _speedups(_rows(results, "train", {"main"}, base, cell), impl)
    shape = lambda r: f"T={r['T']} B={r['B']} H={r['H']}"  # noqa: E731
    lines = []
    worst = min(main, key=lambda r: r["speedup"]) if main else None
    lines.append(
        [
            f"training step never below ×{goals['lowest_train']:g} on the grid",
            f"lowest ×{worst['speedup']:.2f} at {shape(worst)}, over {len(main)} shapes" if worst else "—",
            _verdict(worst["speedup"] if worst else None, goals["lowest_train"]),
        ]
    )
    (T, B, H), want = goals["at_shape"]
    there = next((r for r in main if (r["T"], r["B"], r["H"]) == (T, B, H)), None)
    lines.append(
        [
            f"training step ≥ ×{want:g} at T={T} B={B} H={H}",
            f"×{there['speedup']:.2f} (×{there['speedup_min']:.2f} by min)" if there else "—",
            _verdict(there["speedup"] if there else None, want),
        ]
    )
    mean = geomean(r["speedup"] for r in main) if main else None
    lines.append(
        [
            f"training step geomean ≥ ×{goals['geomean_train']:g}",
            f"×{mean:.2f} over {len(main)} shapes" if main else "—",
            _verdict(mean, goals["geomean_train"]),
        ]
    )
    pair = _packed_pair(train_all, cell, impl, base)
    ratio = pair[0]["ms_median"] / pair[1]["ms_median"] if pair else None
    lines.append(
        [
            f"packed ≤ {goals['packed_over_padded']:g} of the same batch padded",
            f"{ratio:.2f} ({pair[0]['label']})" if pair else "—",
            _verdict(ratio, goals["packed_over_padded"], at_least=False),
        ]
    )
    packed = pair[0] if pair and pair[0].get("speedup") else None
    lines.append(
        [
            f"packed ≥ ×{goals['packed_vs_torch']:g} torch.nn.{cell} on the same PackedSequence",
            f"×{packed['speedup']:.2f} (×{packed['speedup_min']:.2f} by min)" if packed else "—",
            _verdict(packed["speedup"] if packed else None, goals["packed_vs_torch"]),
        ]
    )
    warm = next(
        (
            r["first_call_s"]
            for r in results.get("first_call", [])
            if r["impl"] == impl and _cell(r) == cell and not r.get("cold_cache") and "first_call_s" in r
        ),
        None,
    )
    lines.append(
        [
            f"first forward+backward, warm cache, < {goals['first_call_warm_s']:g} s",
            f"{warm:.2f} s" if warm is not None else "—",
            "not measured" if warm is None else "met" if warm < goals["first_call_warm_s"] else "**not met**",
        ]
    )
    return lines


def _goals_section(results):
    """Per cell with :data:`GOALS` and fused implementation: each goal, what this run measured, and
    whether it is met (by median). Empty off the CPU or when no such cell was timed fused."""
    if not results["meta"]["device"].startswith("cpu"):
        return ""
    out = []
    train = _rows(results, "train")
    for cell, goals in GOALS.items():
        for impl in _fused_impls([r for r in train if _cell(r) == cell]):
            lines = _goal_lines(results, cell, impl, goals)
            out.append(
                f"{impl} against torch.nn.{cell} ({goals['issue']}; speedups by median, "
                f"{results['meta']['base_dtype']}, one layer):\n\n" + _table(["goal", "this run", ""], lines)
            )
    return "\n\n".join(out)


def _summary_table(results):
    """Per cell and fused implementation: the training grid's geomean and worst shape, inference, the
    packed/padded ratio and the first call. Empty when nothing fused was timed."""
    base = results["meta"]["base_dtype"]
    train_all = _rows(results, "train")
    lines = []
    for cell in _cells(_rows(results, "train", {"main"}, base)):
        train = _rows(results, "train", {"main"}, base, cell)
        infer = _rows(results, "inference", {"main"}, base, cell)
        for impl in _fused_impls(train):
            t, i = _speedups(train, impl), _speedups(infer, impl)
            if not t:
                continue
            line = [cell, impl]
            for rows in (t, i):
                if not rows:
                    line += ["—", "—"]
                    continue
                med, low = geomean(r["speedup"] for r in rows), geomean(r["speedup_min"] for r in rows)
                worst = min(rows, key=lambda r: r["speedup"])
                shape = f"T={worst['T']} B={worst['B']} H={worst['H']}"
                line += [f"**×{med:.2f}** (×{low:.2f}) over {len(rows)}", f"×{worst['speedup']:.2f} at {shape}"]
            ratio = _packed_ratio(train_all, cell, impl, base)
            if ratio:
                line.append(f"{ratio[0]:.2f}" + (f" (torch {ratio[1]:.2f})" if ratio[1] else ""))
            else:
                line.append("—")
            first = {
                r.get("cold_cache", False): r["first_call_s"]
                for r in results.get("first_call", [])
                if r["impl"] == impl and _cell(r) == cell and "first_call_s" in r
            }
            line.append(" / ".join(f"{first[c]:.2f}" if c in first else "—" for c in (False, True)))
            lines.append(line)
    if not lines:
        return ""
    header = [
        "cell",
        "impl",
        "training × torch: geomean by median (by min) over shapes",
        "lowest training ×",
        "inference × torch: geomean (by min)",
        "lowest inference ×",
        "packed / padded time",
        "first fwd+bwd s: warm / cold cache",
    ]
    return _table(header, lines)


def _generic_table(rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: _num(v) if isinstance(v, float) else str(v)  # noqa: E731
    return _table(keys, [[fmt(r.get(k, "")) for k in keys] for r in rows])


def write_markdown(results, path, plots=()):
    meta = results["meta"]
    peaks = results["gemm_peak"]
    base = meta["base_dtype"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    lines = [
        f"# fastrnn benchmark: {meta['device_name']} ({meta['device']}), {meta['date']}",
        "",
        f"- Machine: {meta['cpu_model']}, {meta['cpu_count']} cores, torch threads {meta['torch_threads']}"
        + (f"; GPU {meta['gpu_name']}" if meta.get("gpu_name") else ""),
        f"- Versions: {versions}",
        f"- Grid `{meta['grid']}`; cells: {', '.join(meta.get('cells', ['RNN']))} (each fastrnn module against "
        f"torch's of the same cell: nn.RNN, nn.GRU, nn.LSTM); implementations: {', '.join(meta['impls'])}",
        "- GEMM peak (fastest `torch.mm` n×n, before and after the cases): "
        + ", ".join(f"{d} {p['gflops']:.1f} GFLOP/s (n={p['n']})" for d, p in peaks.items()),
        "- Timing: implementations alternate within every repeat; times are median (min) over repeats, "
        "speedup = torch time / impl time from the same run (> 1: faster than torch). "
        "FLOPs per layer-direction: forward 2·tokens·G·H·(I+H) with G gates (RNN 1, GRU 3, LSTM 4); "
        "an LSTM with proj_size P: 2·tokens·(4H·(I+P) + P·H); backward 2× forward. "
        "How to read: bench/README.md.",
        f"- Run time {meta['run_s']:.0f} s; command `{meta['command']}`",
    ]
    if meta.get("note"):
        lines += ["", f"> {meta['note']}"]

    def section(title, body):
        if body:
            lines.extend(["", f"## {title}", "", body])

    summary = _summary_table(results)
    section(
        "Summary per cell",
        summary
        and "Each fused module against torch's of its cell over the training grid (one layer, "
        f"{base}); lowest: the shape with the smallest median speedup; packed / padded: time of the "
        "PackedSequence case over the same batch padded (below 1: packing saves time); first call: "
        "a fresh process's first forward+backward.\n\n"
        + summary,
    )
    section("Goals", _goals_section(results))
    for cell in _cells(_rows(results, "train", {"main"}) + _rows(results, "inference", {"main"})):
        main = _rows(results, "train", {"main"}, base, cell)
        section(
            f"{cell} training step (forward+backward), {base}, one layer" + (", tanh" if cell == "RNN" else ""),
            "\n\n".join(x for x in (_train_table(main), _geomean_line(main, "training step")) if x),
        )
        inference = _rows(results, "inference", {"main"}, base, cell)
        section(
            f"{cell} inference (forward under no_grad)",
            "\n\n".join(x for x in (_inference_table(inference), _geomean_line(inference, "inference")) if x),
        )
    section("Hidden-size sweep", _sweep_tables(results))
    section("Layers and bidirectional", _train_table(_rows(results, "train", {"layers"})))
    section("Long sequences", _train_table(_rows(results, "train", {"long"})))
    section("PackedSequence against the same batch padded", _packed_table(results))
    for dtype in ("float64", "bfloat16", "float16"):
        rows = _rows(results, "train", {dtype}, dtype)
        if rows:
            section(f"{dtype}", "\n\n".join(x for x in (_train_table(rows), _geomean_line(rows, dtype)) if x))
    section("LSTM with proj_size", _train_table(_rows(results, "train", {"proj"})))
    section("Other cases", _train_table(_rows(results, "train", {"relu"})))
    section("Memory", _memory_section(results))
    if results.get("first_call"):
        section("First call (fresh process)", _first_call_text(results))
    if results.get("keras_seed"):
        section("Keras seed model (SimpleRNN: stock vs fused)", _generic_table(results["keras_seed"]))
    if results.get("errors"):
        section("Errors", "\n".join(f"- {e}" for e in results["errors"]))
    section("Plots", "\n\n".join(f"![{os.path.splitext(p)[0]}]({p})" for p in plots))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: either way not part of this run
        return None


def environment(device):
    """Machine and versions, recorded in results.json and the report header."""
    import platform

    import torch

    info = {
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "versions": {
            "fastrnn": _version("fastrnn"),
            "torch": torch.__version__,
            "numba": _version("numba"),
            "triton": _version("triton"),
            "numpy": _version("numpy"),
            "python": platform.python_version(),
        },
        "platform": platform.platform(),
    }
    info["device_name"] = info["gpu_name"] or info["cpu_model"]
    return info
