"""Benchmarks of fastrnn against torch.nn.RNN: ``python -m fastrnn.bench`` (see bench/README.md).

cases (the grid and FLOP model), impls (what is compared), timing (interleaved timers, GEMM
peak), memory (saved-for-backward bytes, peak memory), firstcall, keras_seed (the seed's Keras
model, stock against converted), report (results.json, report.md) and plots (PNGs, drawn only
after measuring). gpu_check holds the Python steps of bench/gpu_check.sh. The inputs come from
fastrnn.profile's workload builder, so a profile runs what the bench times.
"""
