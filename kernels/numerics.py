"""Numbers the kernels and their PyTorch callers (sla2cli.ops) must agree on.

One owner, so that the fake-quant oracle rounds exactly as the kernels do. Plain Python, no Triton:
sla2cli imports it at start-up, where Triton may be missing; kernel modules wrap the values they read
inside `@triton.jit` code in `tl.constexpr`.
"""

from __future__ import annotations

# Largest magnitude of the symmetric INT8 grid: x is stored as round(x / (max|x| / INT8_MAX)).
INT8_MAX = 127.0
# Largest finite FP8 e4m3 value: a tensor is scaled so that its largest magnitude maps here.
FP8_E4M3_MAX = 448.0
# Floor of every max|x| a quantisation scale is built from, so that an all-zero row gets a finite scale.
TINY_SCALE = 1e-30
# log2(e): the kernels compute exp(x) as exp2(x * LOG2E), and the emulation follows them step by step.
LOG2E = 1.4426950408889634
# Key-block states are stored for a whole number of these blocks (the ones past the sequence are zero):
# cuBLAS runs its Hopper tensor-core GEMMs only on 16-byte aligned extents and rows. At 75600 tokens
# T_n = 1182 (2364 bytes of bf16) sent the complement products to Ampere kernels on an H200, a quarter
# of the rate (3.96 ms forward, 4.51 ms backward), and a padded row stride alone to a slower one still.
STATE_BLOCK_ALIGNMENT = 8


def stored_state_blocks(num_k_blocks: int) -> int:
    """How many key blocks of states are stored: T_n rounded up to STATE_BLOCK_ALIGNMENT."""
    return -(-num_k_blocks // STATE_BLOCK_ALIGNMENT) * STATE_BLOCK_ALIGNMENT
