"""PNG plots of a results.json (matplotlib, Agg backend). Measuring never imports this module.

python -m fastrnn.bench.plots bench/results/<dir>/results.json   # redraw the plots
"""

import collections
import json
import os
import sys

from .cases import CELL_NAMES


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fused(rows):
    return sorted({r["impl"] for r in rows if r["impl"] != "torch" and "error" not in r})


def _cell(row):
    return row.get("cell", "RNN")  # rows from before the GRU have no cell


def speedup_vs_hidden(results, path):
    """Training-step speedup against torch's module by hidden size, one line per batch size; a
    panel per cell (RNN, GRU, LSTM) and fused implementation. LSTM's proj_size rows are left out
    (another output width than H)."""
    plt = _pyplot()
    base = results["meta"]["base_dtype"]
    rows = [
        r
        for r in results["rows"]
        if r["mode"] == "train"
        and r["layers"] == 1
        and not r["bidirectional"]
        and not r["packed"]
        and not r.get("proj_size")
        and r["dtype"] == base
        and r.get("speedup")
        and r["impl"] != "torch"
    ]
    # One sequence length, so that a line shows H alone: the sweep's, or the commonest one.
    lengths = collections.Counter(r["T"] for r in rows)
    seq_len = 100 if 100 in lengths else (lengths.most_common(1)[0][0] if lengths else None)
    rows = [r for r in rows if r["T"] == seq_len]
    cells = [c for c in CELL_NAMES if any(_cell(r) == c for r in rows)]
    panels = [(cell, impl) for cell in cells for impl in _fused([r for r in rows if _cell(r) == cell])]
    if plt is None or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    for ax, (cell, impl) in zip(axes[0], panels):
        lines = collections.defaultdict(dict)
        for r in rows:
            if r["impl"] == impl and _cell(r) == cell:
                lines[r["B"]][r["H"]] = r["speedup"]
        for batch in sorted(lines):
            hidden = sorted(lines[batch])
            ax.plot(hidden, [lines[batch][h] for h in hidden], marker="o", label=f"B={batch}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size H")
        ax.set_ylabel(f"speedup vs torch.nn.{cell} (median, fwd+bwd)")
        ax.set_title(f"{cell}: {impl}, T={seq_len}, {base}, {results['meta']['device']}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_bars(results, path):
    """Bytes saved for backward (main cases) and peak memory of one step (memory cases)."""
    plt = _pyplot()
    saved = [
        r
        for r in results["rows"]
        if r["mode"] == "train" and r["section"] in ("main", "layers", "packed") and "saved_bytes" in r
    ]
    peaks = [m for m in results.get("memory", []) if "step_bytes" in m]
    if plt is None or not (saved or peaks):
        return None
    panels = [(t, data) for t, data in (("saved for backward", saved), ("peak above start of step", peaks)) if data]
    # Wide enough for every bar group's label (about 30 with three cells' main shapes).
    widths = [max(7.5, 0.3 * len({r["label"] for r in data})) for _, data in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(sum(widths), 4.4), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for ax, (title, data) in zip(axes[0], panels):
        key = "saved_bytes" if title == "saved for backward" else "step_bytes"
        labels = list(dict.fromkeys(r["label"] for r in data))
        impls = list(dict.fromkeys(r["impl"] for r in data))
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            by_label = {r["label"]: r[key] / 2**20 for r in data if r["impl"] == impl}
            xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(xs, [by_label.get(label, 0) for label in labels], width, label=impl)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        if key == "saved_bytes":
            ax.set_yscale("log")
        ax.set_ylabel("MiB")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results, out_dir):
    """Draw every plot that has data; returns the written file names (relative to out_dir)."""
    written = []
    for name, draw in (("speedup_vs_hidden.png", speedup_vs_hidden), ("memory.png", memory_bars)):
        if draw(results, os.path.join(out_dir, name)):
            written.append(name)
    return written


if __name__ == "__main__":
    for results_path in sys.argv[1:]:
        with open(results_path) as f:
            print(write_all(json.load(f), os.path.dirname(os.path.abspath(results_path))))
