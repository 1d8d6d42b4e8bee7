"""Options of the pytest-benchmark suite (``pytest bench/``)."""

import pytest

from fastrnn.bench.cases import GRIDS


def pytest_addoption(parser):
    group = parser.getgroup("fastrnn", "fastrnn benchmark suite")
    group.addoption(
        "--fastrnn-grid", default="quick", choices=GRIDS, help="grid from fastrnn/bench/cases.py (default: quick)"
    )
    group.addoption("--fastrnn-device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption("--fastrnn-dtype", default=None, help="comma list of dtypes, as in python -m fastrnn.bench")
    group.addoption(
        "--fastrnn-cells",
        default=None,
        help="comma list of cells (RNN, GRU, LSTM; default: all), as python -m fastrnn.bench",
    )
    group.addoption(
        "--fastrnn-compile",
        action="store_true",
        help="add torch.compile of torch's module where it works (slow: compiles every shape and mode)",
    )
    group.addoption("--fastrnn-rounds", type=int, default=10, help="rounds of the backward-only benchmarks")


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("benchmark"):
        skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install pytest-benchmark)")
        for item in items:
            item.add_marker(skip)
