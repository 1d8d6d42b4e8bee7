# `make test` and `make bench` set everything up on a fresh machine (CPU torch wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The pinned torch resolves to the local CPU wheel here; to use an existing CUDA torch instead,
# run `make TORCH_SPEC= test` in an environment that already has it (see README).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: lint format test bench bench-quick gpu-check profile clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) -e '.[dev]'
	# Compile the Numba kernels into their on-disk cache now, not on a user's first call.
	$(PY) -m fastrnn.kernels.numba
	touch $(STAMP)

# ruff's settings live in pyproject.toml; `make format` rewrites the tree the way lint checks it.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m fastrnn.bench

bench-quick: $(STAMP)
	$(PY) -m fastrnn.bench --quick

profile: $(STAMP)
	$(PY) -m fastrnn.profile --out bench/results/profile

# On a lent GPU machine (no network): installs offline, runs CUDA tests, GPU bench, profile.
gpu-check:
	OUT=$${OUT:-bench/results/gpu-check} bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
