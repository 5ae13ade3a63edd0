"""Functional SLA2 attention: the op, its oracle, routing and soft routing for training."""

from sla2cli.ops.attention import sla2_attention, sla2_attention_bshd, sla2_attention_routed
from sla2cli.ops.geometry import effective_sparsity, k_selected, num_blocks
from sla2cli.ops.reference import sla2_reference
from sla2cli.ops.routing import Routing, route
from sla2cli.ops.soft import SoftRouting, dense_attention_rows, soft_routing, soft_sla2_attention

__all__ = [
    "Routing",
    "SoftRouting",
    "dense_attention_rows",
    "effective_sparsity",
    "k_selected",
    "num_blocks",
    "route",
    "sla2_attention",
    "sla2_attention_bshd",
    "sla2_attention_routed",
    "sla2_reference",
    "soft_routing",
    "soft_sla2_attention",
]
