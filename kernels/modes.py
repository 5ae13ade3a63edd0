"""Precision modes of the sparse branch: their names and the codes the forward kernel compiles on.

The one table of mode name <-> kernel code. Names are what users, checkpoints and the CLI say
(sla2cli.ops.quantization imports them from here); codes are the forward kernel's compile-time
`QUANT` switch. Plain Python, no Triton: importing it must work where Triton is not installed.
"""

from __future__ import annotations

# The sparse branch in the input's precision.
QUANT_NONE = "none"
# INT8 Q.K^T (Q per token, K per key block), P.V in the input's precision.
QUANT_INT8 = "int8"
# INT8 Q.K^T, P.V in FP8 e4m3 (V per channel).
QUANT_INT8_FP8 = "int8-fp8"

KERNEL_CODES: dict[str, int] = {QUANT_NONE: 0, QUANT_INT8: 1, QUANT_INT8_FP8: 2}
QUANT_MODES: tuple[str, ...] = tuple(KERNEL_CODES)


def kernel_code(mode: str) -> int:
    """The forward kernel's QUANT code of a concrete mode (not `auto`: resolve that first)."""
    if mode not in KERNEL_CODES:
        raise ValueError(f"no kernel runs quant mode {mode!r}; concrete modes: {', '.join(QUANT_MODES)}")
    return KERNEL_CODES[mode]
