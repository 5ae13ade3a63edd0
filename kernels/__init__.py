"""Triton kernels of SLA2 attention: pure functions of tensors, no model knowledge.

Installed as `sla2_kernels` (not a bare `kernels`, which another common package owns).

The entry points load on first use. sla2cli imports `sla2_kernels.modes` (plain Python) at start-up,
and that must not import Triton: Triton is optional off Linux, and whether a kernel runs compiled
or through the CPU interpreter is fixed (TRITON_INTERPRET) when the kernel's module is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

# Entry point -> the module of this package that defines it.
_ENTRY_POINTS = {
    "block_means": "block_stats",
    "key_block_states": "block_stats",
    "last_dim_contiguous": "common",
    "reverse_lut": "backward",
    "route_blocks": "routing",
    "routes_in_kernel": "routing",
    "select_top_blocks": "routing",
    "sla2_backward_key": "backward",
    "sla2_backward_query": "backward",
    "sla2_forward": "forward",
}

__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str) -> Any:
    """Import an entry point's module when the entry point is first asked for."""
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
