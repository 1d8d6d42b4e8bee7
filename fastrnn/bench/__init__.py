"""Benchmarks of fastrnn against torch.nn.RNN: ``python -m fastrnn.bench`` (see bench/README.md).

cases (the grid and FLOP model), impls (what is compared), timing (interleaved timers, GEMM
peak), memory (saved-for-backward bytes, peak memory), firstcall, report (results.json,
report.md) and plots (PNGs, drawn only after measuring).
"""
