"""The benchmark grid, written down once, and the FLOP model behind GFLOP/s.

Every grid is a list of :class:`Case`; the report CLI and the pytest-benchmark suite both read it.
A case names its cell (``RNN``, ``GRU`` or ``LSTM``): fastrnn's module of that cell is timed against
torch's.
"""

import dataclasses
import math

import torch

from ..cells import CELLS
from ..profile import packed_lengths

# The cells a case can name: torch's class names (nn.RNN, nn.GRU), the keys of fastrnn.convert.FUSED.
CELL_NAMES = tuple(dict.fromkeys(cell.torch_class.__name__ for cell in CELLS.values()))

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT_DTYPE = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}

# (T, B, H), one layer, input size H, tanh: the training-step grid. It holds PyTorch's fastrnns
# default (100, 64, 512), DeepSpeech2's plain RNN (300, 20, 800) and latency-bound B=1 shapes.
TRAIN_SHAPES = (
    (100, 1, 64),
    (100, 1, 256),
    (100, 16, 128),
    (512, 8, 128),
    (100, 32, 256),
    (100, 64, 512),
    (300, 20, 800),
    (100, 256, 1024),
)
# Torch takes ~2 s per fwd+bwd on 2 CPU cores: run it, but with few repeats.
SLOW_SHAPES = {(100, 256, 1024)}
# The GRU runs the same training grid; torch.nn.GRU is ~3x slower than nn.RNN on a CPU, so its
# two biggest shapes (~2 s and ~10 s per torch fwd+bwd on 2 cores) get few repeats.
GRU_SLOW_SHAPES = {(300, 20, 800), (100, 256, 1024)}
# torch.nn.LSTM (oneDNN on CPU) costs about what nn.GRU does: the same two get few repeats.
SLOW = {"RNN": SLOW_SHAPES, "GRU": GRU_SLOW_SHAPES, "LSTM": GRU_SLOW_SHAPES}
# LSTM's proj_size rows (T, B, H, P): torch then leaves oneDNN for its own per-step loop.
PROJ_SHAPES = ((100, 16, 256, 64), (100, 1, 128, 32))
# Speedup against hidden size, a line per batch size (T = 100); shapes already in TRAIN_SHAPES are reused.
SWEEP_T, SWEEP_B, SWEEP_H = 100, (1, 16, 64), (64, 128, 256, 512)
FULL_SWEEP_B, FULL_SWEEP_H = (1, 8, 16, 64, 256), (32, 64, 128, 256, 512, 1024)
LONG_SHAPES = ((1000, 8, 128), (2000, 1, 256))
# On CUDA: the sweep and long sequences of the GPU issue, against cuDNN's nn.RNN.
GPU_SWEEP_B, GPU_SWEEP_H = (1, 16, 64, 256), (64, 128, 256, 512, 768, 1024)
GPU_LONG_SHAPES = tuple((1000, B, H) for B in (1, 16, 64, 256) for H in (256, 1024))
# (layers, bidirectional) on one shape.
STACK_SHAPE, STACKS = (100, 32, 256), ((2, False), (1, True), (2, True))
PACKED_SHAPE = (200, 32, 256)
FLOAT64_SHAPES = ((100, 16, 128), (100, 64, 512))
HALF_SHAPES = ((100, 64, 512), (300, 20, 800), (100, 256, 1024))
# A big GEMM at the run's dtype measures the machine's attainable peak.
GEMM_N = {"tiny": 512, "quick": 1024, "default": 2048, "full": 2048}

GRIDS = ("tiny", "quick", "default", "full")
DTYPE_SECTIONS = ("float64", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark shape. ``section`` decides where it lands in the report."""

    section: str
    T: int
    B: int
    H: int
    I: int = 0  # 0: input size = H
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    packed: bool = False  # PackedSequence input whose lengths spread from T down to T/10
    nonlinearity: str = "tanh"
    inference: bool = True  # also time a forward under no_grad
    few_repeats: bool = False
    cell: str = "RNN"  # "RNN", "GRU" or "LSTM": torch.nn.<cell> against fastrnn.<cell>
    proj_size: int = 0  # LSTM's: the output width P (0: H)

    def __post_init__(self):
        if self.cell not in CELL_NAMES:
            raise ValueError(f"unknown cell {self.cell!r}; choose from {', '.join(CELL_NAMES)}")
        if self.cell != "RNN" and self.nonlinearity != "tanh":
            raise ValueError(f"nonlinearity={self.nonlinearity!r} is an RNN option, not one of {self.cell}")
        if self.proj_size and (self.cell != "LSTM" or self.proj_size >= self.H):
            raise ValueError(f"proj_size={self.proj_size} is an LSTM option below H={self.H}")

    @property
    def mode(self):
        """torch's ``RNNBase.mode`` of the case's module: the key of ``fastrnn.cells.CELLS``."""
        return f"RNN_{self.nonlinearity.upper()}" if self.cell == "RNN" else self.cell

    @property
    def gates(self):
        """G: the cell's W_ih is (G*H, I) and W_hh (G*H, H); 1 for RNN, 3 for GRU, 4 for LSTM."""
        return CELLS[self.mode].gates

    @property
    def input_size(self):
        return self.I or self.H

    @property
    def directions(self):
        return 2 if self.bidirectional else 1

    @property
    def shape(self):
        return f"T={self.T} B={self.B} H={self.H}" + (f" I={self.I}" if self.I and self.I != self.H else "")

    @property
    def label(self):
        parts = [self.cell, self.shape]
        if self.proj_size:
            parts.append(f"P={self.proj_size}")
        if self.layers > 1:
            parts.append(f"L={self.layers}")
        if self.bidirectional:
            parts.append("bi")
        parts.append("packed" if self.packed else "")
        if self.nonlinearity != "tanh":
            parts.append(self.nonlinearity)
        parts.append(SHORT_DTYPE[self.dtype])
        return " ".join(p for p in parts if p)

    def lengths(self):
        """Sequence lengths, longest first: spread evenly from T down to max(1, T // 10)."""
        return packed_lengths(self.T, self.B) if self.packed else [self.T] * self.B

    @property
    def tokens(self):
        """Time steps actually processed: T * B padded, the sum of lengths packed."""
        return sum(self.lengths())

    def forward_flops(self):
        """2 * tokens * (G*H * (I_layer + P) + P*H [LSTM's W_hr]) per layer and direction (G gates:
        1 RNN, 3 GRU, 4 LSTM; P = proj_size or H, no W_hr without it); pointwise work is ignored."""
        width = self.proj_size or self.H
        flops = 0
        for layer in range(self.layers):
            layer_in = self.input_size if layer == 0 else width * self.directions
            step = self.gates * self.H * (layer_in + width) + (width * self.H if self.proj_size else 0)
            flops += self.directions * 2 * self.tokens * step
        return flops

    def flops(self, mode):
        """FLOPs of one call: backward counts as twice the forward."""
        return {"forward": 1, "inference": 1, "backward": 2, "train": 3}[mode] * self.forward_flops()

    def to_json(self):
        return dataclasses.asdict(self)

    def key(self):
        """What makes two cases the same measurement (everything but the section)."""
        return dataclasses.replace(self, section="", inference=True, few_repeats=False)

    def smaller(self, T):
        """The same case at another sequence length (used to warm kernels up cheaply)."""
        return dataclasses.replace(self, T=T, packed=False)


def _train(shapes, section="main", cell="RNN", **kw):
    return [Case(section, T, B, H, few_repeats=(T, B, H) in SLOW[cell], cell=cell, **kw) for T, B, H in shapes]


def grid(name="default", device="cpu", dtypes=None):
    """The cases of one grid (``tiny``, ``quick``, ``default``, ``full``) on ``device``.

    ``dtypes`` (names) keeps only those dtypes; the main sections then run in the first one.
    """
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose from {', '.join(GRIDS)}")
    cuda = torch.device(device).type == "cuda"
    if name == "tiny":
        cases = [
            Case("main", 12, 3, 8),
            Case("layers", 12, 3, 8, layers=2, bidirectional=True),
            Case("packed", 12, 3, 8, packed=True),
            Case("float64", 12, 3, 8, dtype="float64"),
            Case("main", 12, 3, 8, cell="GRU"),
            Case("packed", 12, 3, 8, packed=True, cell="GRU"),
            Case("main", 12, 3, 8, cell="LSTM"),
            Case("proj", 12, 3, 8, cell="LSTM", proj_size=3),
        ]
    elif name == "quick":
        cases = _train(((100, 1, 64), (100, 16, 128), (100, 64, 512)))
        cases += [
            Case("sweep", 100, 16, 256),
            Case("layers", 100, 16, 128, layers=2, bidirectional=True),
            Case("packed", 100, 16, 128, packed=True),
            Case("padded", 100, 16, 128),
            Case("float64", 100, 16, 128, dtype="float64"),
            # The GRU: one training shape, and it packed (padded is the main case, measured once).
            Case("main", 100, 16, 128, cell="GRU"),
            Case("packed", 100, 16, 128, packed=True, cell="GRU"),
            Case("main", 100, 16, 128, cell="LSTM"),
            Case("packed", 100, 16, 128, packed=True, cell="LSTM"),
        ]
    else:
        full = name == "full"
        main = TRAIN_SHAPES + (((100, 512, 1024), (100, 64, 2048)) if cuda else ())
        cases = _train(main)
        if cuda:
            sweep_b, sweep_h = GPU_SWEEP_B, GPU_SWEEP_H
        else:
            sweep_b, sweep_h = (FULL_SWEEP_B, FULL_SWEEP_H) if full else (SWEEP_B, SWEEP_H)
        cases += [Case("sweep", SWEEP_T, B, H, inference=full or cuda) for B in sweep_b for H in sweep_h]
        cases += [Case("long", T, B, H) for T, B, H in (GPU_LONG_SHAPES if cuda else LONG_SHAPES)]
        T, B, H = STACK_SHAPE
        stacks = STACKS + (((3, True),) if full else ())
        cases += [Case("layers", T, B, H, layers=L, bidirectional=bi) for L, bi in stacks]
        T, B, H = PACKED_SHAPE
        cases += [Case("packed", T, B, H, packed=True), Case("padded", T, B, H)]
        if full:
            cases += [
                Case("packed", T, B, H, layers=2, bidirectional=True, packed=True),
                Case("padded", T, B, H, layers=2, bidirectional=True),
            ]
            cases += [Case("relu", 100, 64, 512, nonlinearity="relu")]
        if cuda:
            extra = HALF_SHAPES if full else HALF_SHAPES[:2]
            cases += [Case(d, T, B, H, dtype=d) for d in ("bfloat16", "float16") for T, B, H in extra]
        else:
            extra = tuple(TRAIN_SHAPES) if full else FLOAT64_SHAPES
            cases += [
                Case("float64", T, B, H, dtype="float64", few_repeats=(T, B, H) in SLOW_SHAPES) for T, B, H in extra
            ]
        # The gated cells, after every RNN case (those stay as they were): the training grid, and
        # packed against padded; LSTM adds its proj_size rows and float64; --full adds layers and
        # the dtype sections.
        for cell in ("GRU", "LSTM"):
            cases += _train(TRAIN_SHAPES, cell=cell)
            T, B, H = PACKED_SHAPE
            cases += [Case("packed", T, B, H, packed=True, cell=cell), Case("padded", T, B, H, cell=cell)]
            extra = [("float64", shape) for shape in FLOAT64_SHAPES[:1]] if cell == "LSTM" and not cuda else []
            if full:
                T, B, H = STACK_SHAPE
                cases += [Case("layers", T, B, H, layers=L, bidirectional=bi, cell=cell) for L, bi in STACKS]
                extra = [("float64", shape) for shape in FLOAT64_SHAPES]
                if cuda:
                    extra = [(d, shape) for d in ("bfloat16", "float16") for shape in HALF_SHAPES[:2]]
            cases += [Case(d, T, B, H, dtype=d, cell=cell) for d, (T, B, H) in extra]
        cases += [Case("proj", T, B, H, cell="LSTM", proj_size=P) for T, B, H, P in PROJ_SHAPES]
    if dtypes:
        cases = [
            case if case.section in DTYPE_SECTIONS else dataclasses.replace(case, dtype=dtypes[0])
            for case in cases
            if case.section not in DTYPE_SECTIONS or case.dtype in dtypes
        ]
    # One measurement per configuration; the report finds a shape whatever section it came from.
    kept, seen = [], set()
    for case in cases:
        key = case.key()
        if key not in seen:
            seen.add(key)
            kept.append(case)
    return kept


def memory_cases(name="default"):
    """The few cases whose peak resident memory is measured, each in its own subprocess: the RNN's,
    then one GRU and one LSTM shape (their torch steps are ~3x the RNN's, so one each)."""
    if name == "tiny":
        # Only checks the path (one subprocess): the GRU's, whose cell travels through the JSON.
        return [Case("memory", 12, 3, 8, cell="GRU")]
    gru = [Case("memory", 100, 64, 512, cell="GRU"), Case("memory", 100, 64, 512, cell="LSTM")]
    if name == "quick":
        return [Case("memory", 100, 64, 512)] + gru
    return [Case("memory", 100, 64, 512), Case("memory", 300, 20, 800), Case("memory", 1000, 8, 128)] + gru


def geomean(values):
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    if not values:
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))
