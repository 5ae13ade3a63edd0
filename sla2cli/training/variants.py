"""Attention variants of the quality ablation: turn a converted model's SLA2 layers into each method.

The quality suite fine-tunes the same converted model under each method with the same budget, so
the difference it measures is the attention, not the training. Every variant is an SLA2Attention
(subclass overriding `attend`, so the layer's input checks and autocast handling stay), swapped into the
layer's processor in place, so capture hooks, reports and the training
loop see the usual `sla2_layers`. Each runs forward and backward on CPU and GPU.

| method | router | output | SLA2 parameters that train | saveable |
|---|---|---|---|---|
| dense | none | full softmax attention | none | no: the dense model is the base model |
| sparse_only | the layer's | O_s (alpha = 1, linear branch not computed) | none | yes |
| heuristic | identity W_q, W_k (pooled scores) | alpha O_s + (1 - alpha) O_l | alpha predictor | yes |
| sla_proj | identity W_q, W_k | O_s + O_l P, P a D x D matrix, zero at start | P | no |
| sla2 | the layer's (calibrated) | alpha O_s + (1 - alpha) O_l | alpha predictor | yes |
| oracle_router | true top-k blocks of full attention | alpha O_s + (1 - alpha) O_l | alpha predictor | no |
| exact_rest | the layer's (calibrated) | alpha O_s + (1 - alpha) O_r, O_r softmax on the rest | alpha predictor | no |
| oracle_exact | true top-k blocks of full attention | alpha O_s + (1 - alpha) O_r | alpha predictor | no |

sparse_only, heuristic and sla2 are plain SLA2 layers with particular parameters (sparse_only: alpha
pinned to exactly 1), so `sla2cli.save` stores them and `sla2cli.load` gives the same outputs. The
others compute something a checkpoint cannot describe; `check_saveable` refuses them by name.

sla_proj follows the earlier SLA paper: O = O_s + Proj(O_l), one learned D x D projection per layer
shared by its heads. P starts at zero, so before training the layer is exactly sparse-only and any gain
is what training the projection earns. O_s and O_l come from two calls of the routed op (alpha = 1 and
alpha = 0), which costs one extra sparse pass.

oracle_router routes each query block to the k_sel key blocks that truly hold the most softmax mass
(computed a few query blocks at a time, never as an L x L matrix, without gradient), then runs the
same routed op; alpha is the layer's predictor applied to its own router's scores at those blocks, so
only the selection differs from sla2. It is an upper bound on what any router can do at this budget.

exact_rest keeps sla2's router, alpha and exact branch and replaces the linear branch by what it stands in
for: softmax attention over the same unselected key blocks (dense L x L masks, so only at the embedded
model's lengths). Beside sla2 it measures what the linear branch's approximation costs; it is an upper
bound on any cheap stand-in for the rest at this block budget.

oracle_exact takes both bounds at once: the oracle's blocks for O_s, exact softmax attention over all the
others, mixed by the layer's alpha. What it still loses against dense is the decomposition itself (one alpha
per query block instead of each query's true share of the mass) and the training budget: no router and no
linear branch can do better.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sla2cli.errors import UserError
from sla2cli.integration.conversion import sla2_processors
from sla2cli.module import SLA2Attention
from sla2cli.ops import Routing, route
from sla2cli.ops.reference import expand_block_values
from sla2cli.ops.routing import select_blocks
from sla2cli.report.metrics import DEFAULT_CHUNK_ELEMENTS, selection_mask, true_block_mass

DENSE = "dense"
SPARSE_ONLY = "sparse_only"
HEURISTIC = "heuristic"
SLA_PROJ = "sla_proj"
SLA2 = "sla2"
ORACLE_ROUTER = "oracle_router"
EXACT_REST = "exact_rest"
ORACLE_EXACT = "oracle_exact"
METHODS: tuple[str, ...] = (DENSE, SPARSE_ONLY, HEURISTIC, SLA_PROJ, SLA2, ORACLE_ROUTER, EXACT_REST, ORACLE_EXACT)
SAVEABLE_METHODS: tuple[str, ...] = (SPARSE_ONLY, HEURISTIC, SLA2)

ALPHA_PARAMETERS = ("alpha_weight", "alpha_bias", "alpha_log_temperature")
ALPHA_ONE_BIAS = 30.0  # sigmoid(30) = 1 - 9e-14: exactly 1.0 in float32, so O = O_s bit for bit
ORACLE_CHUNK_ELEMENTS = {"cpu": DEFAULT_CHUNK_ELEMENTS, "cuda": 1 << 27}  # as the report's dense scan


class DenseLayer(SLA2Attention):
    """Full softmax attention in an SLA2 slot: the dense reference trained by the same loop."""

    method = DENSE
    trainable: tuple[str, ...] = ()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class SparseOnlyLayer(SLA2Attention):
    """The exact branch alone on the layer's own routing. Its alpha parameters are pinned to alpha = 1,
    so a checkpoint of it, loaded as a plain SLA2 layer, gives the same output."""

    method = SPARSE_ONLY
    trainable: tuple[str, ...] = ()

    def pin_alpha_to_one(self) -> None:
        with torch.no_grad():
            self.alpha_weight.zero_()
            self.alpha_bias.fill_(ALPHA_ONE_BIAS)
            self.alpha_log_temperature.zero_()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.routed_attention(q, k, v, self.hard_routing(q, k).lut, None)


class SLAProjLayer(SLA2Attention):
    """O = O_s + O_l P on the heuristic router (the earlier SLA), P (D x D) zero at creation."""

    method = SLA_PROJ
    trainable: tuple[str, ...] = ("linear_projection",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.linear_projection = nn.Parameter(torch.zeros(self.head_dim, self.head_dim, dtype=torch.float32))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        routing = route(q, k, sparsity=self.sparsity, block_q=self.block_q, block_k=self.block_k)
        sparse = self.routed_attention(q, k, v, routing.lut, None)
        if routing.all_selected:
            return sparse
        zeros = torch.zeros(routing.lut.shape[:3], dtype=torch.float32, device=q.device)
        linear = self.routed_attention(q, k, v, routing.lut, zeros)
        return (sparse.float() + linear.float() @ self.linear_projection).to(q.dtype)


def oracle_routing(layer: SLA2Attention, q: torch.Tensor, k: torch.Tensor) -> Routing:
    """The layer's router scores (alpha's input) with the look-up table of the true top-k blocks."""
    learned = layer.hard_routing(q, k)
    if learned.all_selected:
        return learned
    chunk = ORACLE_CHUNK_ELEMENTS.get(q.device.type, ORACLE_CHUNK_ELEMENTS["cuda"])
    with torch.no_grad():
        mass = true_block_mass(
            q.detach(), k.detach(), block_q=layer.block_q, block_k=layer.block_k, max_chunk_elements=chunk
        )
    return Routing(scores=learned.scores, lut=select_blocks(mass, learned.k_sel), k_sel=learned.k_sel)


class OracleRouterLayer(SLA2Attention):
    """Routing by the true block masses of full attention (no gradient), alpha from the layer's predictor."""

    method = ORACLE_ROUTER
    trainable: tuple[str, ...] = ALPHA_PARAMETERS

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        routing = oracle_routing(self, q, k)
        alpha = None if routing.all_selected else self.predict_alpha(routing, q.shape[2])
        return self.routed_attention(q, k, v, routing.lut, alpha)


class ExactRestLayer(SLA2Attention):
    """sla2 with its linear branch replaced by softmax attention over the same unselected blocks."""

    method = EXACT_REST
    trainable: tuple[str, ...] = ALPHA_PARAMETERS

    def rest_routing(self, q: torch.Tensor, k: torch.Tensor) -> Routing:
        """The blocks O_s attends to; the rest is every other key block (here: the layer's own router)."""
        return self.hard_routing(q, k)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        routing = self.rest_routing(q, k)
        sparse = self.routed_attention(q, k, v, routing.lut, None)
        if routing.all_selected:
            return sparse
        length = q.shape[2]
        selected = expand_block_values(selection_mask(routing.lut, routing.scores.shape[-1]), length, self.block_q, -2)
        selected = expand_block_values(selected, length, self.block_k, -1)  # (B, H, L, L): True where O_s attends
        rest = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~selected)
        alpha = expand_block_values(self.predict_alpha(routing, length), length, self.block_q, -1)[..., None]
        return (alpha * sparse.float() + (1.0 - alpha) * rest.float()).to(q.dtype)


class OracleExactLayer(ExactRestLayer):
    """The true top-k blocks for O_s and exact attention over the rest: only alpha's form and training remain."""

    method = ORACLE_EXACT

    def rest_routing(self, q: torch.Tensor, k: torch.Tensor) -> Routing:
        return oracle_routing(self, q, k)


LAYER_CLASSES: dict[str, type[SLA2Attention]] = {
    DENSE: DenseLayer,
    SPARSE_ONLY: SparseOnlyLayer,
    HEURISTIC: SLA2Attention,
    SLA_PROJ: SLAProjLayer,
    SLA2: SLA2Attention,
    ORACLE_ROUTER: OracleRouterLayer,
    EXACT_REST: ExactRestLayer,
    ORACLE_EXACT: OracleExactLayer,
}


def check_method(method: str) -> str:
    """The method name, or a one-line error listing the known ones."""
    if method not in METHODS:
        raise UserError(f"unknown attention method {method!r}; use one of {', '.join(METHODS)}")
    return method


def variant_layer(layer: SLA2Attention, method: str) -> SLA2Attention:
    """A new layer of `method` with the configuration and shared parameters of `layer` (on its device)."""
    cls = LAYER_CLASSES[check_method(method)]
    new = cls(
        layer.num_heads, layer.head_dim, sparsity=layer.sparsity, block_q=layer.block_q, block_k=layer.block_k,
        quant=layer.quant,
    ).to(layer.proj_q.device)
    shared = {key: value for key, value in layer.state_dict().items() if key in new.state_dict()}
    new.load_state_dict(shared, strict=False)
    if method in (HEURISTIC, SLA_PROJ):
        with torch.no_grad():
            new.proj_q.copy_(torch.eye(new.head_dim))
            new.proj_k.copy_(torch.eye(new.head_dim))
    if isinstance(new, SparseOnlyLayer):
        new.pin_alpha_to_one()
    return new


def apply_variant(model: nn.Module, method: str) -> int:
    """Turn every converted layer of `model` into `method`, in place; returns how many layers changed.

    Applying sla2 to a model that holds another variant gives plain SLA2 layers back with the router and
    alpha parameters they carry (heuristic and sla_proj reset the router to identity, sparse_only pins
    alpha to 1: those are their definitions).
    """
    processors = sla2_processors(model)
    if not processors:
        raise UserError("the model has no SLA2 layers; convert it first (sla2cli.convert or sla2 convert)")
    for processor in processors.values():
        processor.sla2 = variant_layer(processor.sla2, method)
    return len(processors)


def layer_method(layer: SLA2Attention) -> str | None:
    """The variant a layer runs, or None for a plain SLA2 layer (sla2 or heuristic: same class)."""
    return getattr(type(layer), "method", None)


def trainable_sla2_parameters(layer: SLA2Attention) -> tuple[str, ...]:
    """Names of the layer's own parameters that fine-tuning trains (the router never trains in stage 2)."""
    return getattr(type(layer), "trainable", ALPHA_PARAMETERS)


def variant_train_choice(model: nn.Module) -> Callable[[str, nn.Parameter], bool]:
    """Predicate (parameter name, parameter) -> trains, for a model whose layers hold a variant: every base
    weight, and of each SLA2 layer only what its method trains (see the table in the module docstring)."""
    per_prefix = {
        f"{module}.processor.sla2.": trainable_sla2_parameters(processor.sla2)
        for module, processor in sla2_processors(model).items()
    }

    def chosen(name: str, _: nn.Parameter) -> bool:
        for prefix, trainable in per_prefix.items():
            if name.startswith(prefix):
                return name[len(prefix):] in trainable
        return True

    return chosen


def check_saveable(model: nn.Module) -> None:
    """Refuse, in one line, to save a model whose layers a checkpoint cannot describe."""
    for module, layer in ((name, p.sla2) for name, p in sla2_processors(model).items()):
        method = layer_method(layer)
        if method is not None and method not in SAVEABLE_METHODS:
            raise UserError(
                f"{module} runs the {method} variant, which an SLA2 checkpoint cannot hold; only "
                f"{', '.join(SAVEABLE_METHODS)} models can be saved (apply_variant(model, 'sla2') first)"
            )
