"""Measured speed of the low-bit sparse branch against bf16: the data `auto` decides from.

Each entry is one side-by-side measurement of the SLA2 op at sparsity 0.97 with its sparse branch in a
low-bit mode and in bf16, on one GPU, at one head dim and shape class, for the forward alone or for
forward + backward (training), with the CSV under benchmarks/results/ it comes from. `auto` picks the
low-bit mode only where an entry says it was faster; a GPU, head dim or shape class without an entry
runs bf16 (ops.quantization.choose_auto_quant). A new GPU or shape gets an entry once `sla2 bench`
has timed `sla2` and `sla2-lowbit` side by side there.
"""

from __future__ import annotations

from typing import NamedTuple

from sla2_kernels.modes import QUANT_INT8

# Shape classes by query rows times heads (batch x heads x tokens): the measured shapes are
# 0.39M (1x12x32760, Wan2.1-1.3B at 480p) and 3.0M (1x40x75600, Wan2.1-14B at 720p); the boundary
# lies between them, so each measured shape decides for its neighbours.
LARGE_SHAPE_ROWS = 1_000_000
SMALL, LARGE = "below 1M rows x heads", "at least 1M rows x heads"

UNIT = "median ms"  # every entry's two numbers


class LowbitMeasurement(NamedTuple):
    """One side-by-side timing of a low-bit mode and bf16 (the same op, inputs and run)."""

    gpu: str  # matched as a substring of torch.cuda.get_device_name()
    head_dim: int
    training: bool  # False: forward only; True: forward + backward
    shape_class: str  # SMALL or LARGE
    shape: str  # the measured B x H x L x D
    mode: str  # the low-bit mode timed
    lowbit: float  # UNIT
    bf16: float  # UNIT
    source: str  # the CSV the two numbers come from

    @property
    def lowbit_faster(self) -> bool:
        return self.lowbit < self.bf16


_H100_OP = "benchmarks/results/h100_lowbit_operator.csv"  # CUDA graph replay rows (fwd-graph), fwd+bwd rows
_H100_OP_14B = "benchmarks/results/h100_lowbit_operator_14b.csv"
_H100_D64 = "benchmarks/results/h100_lowbit_parts_d64.csv"  # forward kernel call, default configurations
_H200_BENCH = "benchmarks/results/h200_lowbit_bench_18ea742.csv"  # re-timed after the kernel changes since 7acd646

MEASUREMENTS: tuple[LowbitMeasurement, ...] = (
    LowbitMeasurement("H100", 128, False, SMALL, "1x12x32760x128", QUANT_INT8, 1.3131, 1.2912, _H100_OP),
    LowbitMeasurement("H100", 128, False, LARGE, "1x40x75600x128", QUANT_INT8, 16.4930, 17.4601, _H100_OP_14B),
    LowbitMeasurement("H100", 128, True, SMALL, "1x12x32760x128", QUANT_INT8, 7.5732, 6.8666, _H100_OP),
    LowbitMeasurement("H100", 64, False, SMALL, "1x24x32760x64", QUANT_INT8, 0.8722, 0.6978, _H100_D64),
    LowbitMeasurement("H200", 128, False, SMALL, "1x12x32760x128", QUANT_INT8, 1.5054, 1.2059, _H200_BENCH),
    LowbitMeasurement("H200", 128, True, SMALL, "1x12x32760x128", QUANT_INT8, 6.1912, 5.5372, _H200_BENCH),
    LowbitMeasurement("H200", 128, False, LARGE, "1x40x75600x128", QUANT_INT8, 13.2046, 14.1939, _H200_BENCH),
    LowbitMeasurement("H200", 128, True, LARGE, "1x40x75600x128", QUANT_INT8, 78.2414, 69.3517, _H200_BENCH),
)


def shape_class(rows_times_heads: int) -> str:
    """SMALL or LARGE for batch x heads x tokens."""
    return LARGE if rows_times_heads >= LARGE_SHAPE_ROWS else SMALL


def find_measurement(gpu_name: str, head_dim: int, training: bool, rows_times_heads: int) -> LowbitMeasurement | None:
    """The entry for this GPU, head dim, pass and shape class, or None where nothing was measured."""
    wanted = shape_class(rows_times_heads)
    for entry in MEASUREMENTS:
        if (entry.gpu in gpu_name and entry.head_dim == head_dim and entry.training == training
                and entry.shape_class == wanted):
            return entry
    return None
