"""Triton kernels of SLA2 attention: pure functions of tensors, no model knowledge.

Installed as `sla2_kernels` (not a bare `kernels`, which another common package owns).
"""

from sla2_kernels.backward import reverse_lut, sla2_backward_key, sla2_backward_query
from sla2_kernels.block_stats import block_means, key_block_states
from sla2_kernels.forward import sla2_forward

__all__ = [
    "block_means",
    "key_block_states",
    "reverse_lut",
    "sla2_backward_key",
    "sla2_backward_query",
    "sla2_forward",
]
