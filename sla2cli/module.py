"""SLA2Attention: the per-layer parameters of SLA2 (router projections, alpha predictor) around the op.

A converted attention layer holds one of these. It owns no Q/K/V projections: the model computes
Q, K, V as before and hands them here, so conversion swaps only the attention kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from sla2cli.ops import Routing, route, sla2_attention_routed
from sla2cli.ops.geometry import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from sla2cli.ops.quantization import QUANT_NONE, check_quant, needs_backward, resolve_quant_mode
from sla2cli.ops.reference import block_token_counts
from sla2cli.ops.soft import DEFAULT_TAU, SoftRouting, soft_routing, soft_sla2_routed
from sla2cli.ops.validation import (
    check_attention_inputs,
    check_block_size,
    check_head_dim,
    check_positive_int,
    check_sparsity,
)

MASS_CLAMP = 1e-4  # keeps logit(mass) finite; alpha can still reach any value through w_h and b_h


ALPHA_BIAS_AT_CREATION = 4.0


def _autocast_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under autocast, attention runs in the autocast dtype, as torch's SDPA does: in mixed-precision
    training the q/k norms may hand over float32 (autocast runs norms in float32) while v is bf16."""
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


class SLA2Attention(nn.Module):
    """SLA2 sparse-linear attention with a learnable router and a length-free alpha predictor.

    Parameters (float32 whatever dtype the model is cast to; they are tiny and precision-sensitive):

    - ``proj_q``, ``proj_k``: the router's D x D matrices W_q, W_k, shared across heads, identity at
      creation (then the router is the plain pooled-score heuristic).
    - ``alpha_weight``, ``alpha_bias``, ``alpha_log_temperature``: per-head parameters of the alpha
      predictor, at creation 1, ALPHA_BIAS_AT_CREATION, 0.

    ``quant`` (one of REQUESTABLE_QUANT_MODES) is configuration, not a parameter: the sparse branch's
    forward in INT8/FP8 (or INT8/fp16), backward unquantised (straight through), so fine-tuning with
    it on is quantisation-aware training.

    Why alpha is predicted this way: O = alpha * O_s + (1 - alpha) * O_l is exact when alpha is the share
    of the row's attention probability that the selected key blocks hold. The router already holds a
    block-level estimate of that probability: the mean logit of block j is about S_c[i, j] and the block
    has n_j real tokens, so p_ij = softmax_j(S_c[i, j] * t_h + log n_j) approximates the block's mass and
    mass_i = sum over selected j of p_ij approximates the ideal alpha. Each quantity exists at any
    sequence length, so a model calibrated at one resolution runs at another (docs/method.md, section 5); a
    per-position alpha, as in the paper, could not. Calibration then corrects the estimate per head:
    alpha = sigmoid(w_h * logit(clamp(mass)) + b_h), with t_h = exp(log_temperature_h) sharpening or
    flattening the block distribution.

    At creation b_h = ALPHA_BIAS_AT_CREATION (4), so alpha starts near 1 (0.97 for a mass estimate of
    0.2): pooling averages the scores, so the uncalibrated estimate undershoots the real mass (on the
    demo's video-like pattern it read 0.21 where the kept blocks held 0.81), and a model that has not
    been calibrated must not do worse than its exact branch alone. Relative error against dense
    attention there, at 0.9 / 0.95 / 0.97: b = 0 gave 0.56 / 0.67 / 0.76, b = 4 gives 0.05 / 0.07 / 0.12
    (alpha = 1: 0.07 / 0.08 / 0.13). Calibration then learns w_h, b_h, t_h per head.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        sparsity: float = 0.97,
        block_q: int = DEFAULT_BLOCK_Q,
        block_k: int = DEFAULT_BLOCK_K,
        quant: str = QUANT_NONE,
    ) -> None:
        super().__init__()
        self.num_heads = check_positive_int(num_heads, "num_heads")
        self.head_dim = check_head_dim(head_dim, "head_dim")
        self.block_q = check_block_size(block_q, "block_q")
        self.block_k = check_block_size(block_k, "block_k")
        self.sparsity = sparsity
        self.quant = quant
        self.proj_q = nn.Parameter(torch.eye(head_dim, dtype=torch.float32))
        self.proj_k = nn.Parameter(torch.eye(head_dim, dtype=torch.float32))
        self.alpha_weight = nn.Parameter(torch.ones(num_heads, dtype=torch.float32))
        self.alpha_bias = nn.Parameter(torch.full((num_heads,), ALPHA_BIAS_AT_CREATION, dtype=torch.float32))
        self.alpha_log_temperature = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32))

    @property
    def sparsity(self) -> float:
        """Share of key blocks per query-block row sent to the linear branch; settable between runs."""
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        self._sparsity = check_sparsity(value)

    @property
    def quant(self) -> str:
        """Low-bit mode of the sparse branch's forward (configuration, not state: a checkpoint records it
        once in its config). `auto` is resolved per call, on the device the inputs live on."""
        return self._quant

    @quant.setter
    def quant(self, value: str) -> None:
        self._quant = check_quant(value)

    def resolved_quant(self, q: torch.Tensor) -> str:
        """The concrete mode a call with these queries runs (`auto`: what was measured fastest on this GPU
        at this shape, for training when the call records a graph through q or this layer)."""
        training = needs_backward(q, *self.parameters())
        return resolve_quant_mode(self.quant, q.device, q.shape, training=training)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, sparsity={self.sparsity}, "
            f"block_q={self.block_q}, block_k={self.block_k}, quant={self.quant}"
        )

    def _apply(self, fn, recurse=True):
        """Follow device moves but keep parameters float32 when the model is cast to bf16/fp16.

        Casting first and converting back would lose the trained digits, so the cast result only tells
        where the tensor should live.
        """

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            if t.is_floating_point() and moved.dtype != t.dtype:
                return t.to(device=moved.device)
            return moved

        return super()._apply(keep_float32, recurse)

    def _check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        check_attention_inputs(
            q, k, v, sparsity=self.sparsity, alpha=None, proj_q=None, proj_k=None,
            block_q=self.block_q, block_k=self.block_k,
        )
        if q.shape[1] != self.num_heads:
            raise ValueError(f"q has {q.shape[1]} heads but this layer was built for {self.num_heads}")
        if self.proj_q.device != q.device:
            raise ValueError(f"q is on {q.device} but this layer's parameters are on {self.proj_q.device}")
        if q.shape[3] != self.head_dim:
            raise ValueError(f"q head dim {q.shape[3]} does not match this layer's head_dim {self.head_dim}")

    def block_mass(self, scores: torch.Tensor, length: int) -> torch.Tensor:
        """p_ij = softmax_j(S_c[i, j] * t_h + log n_j): the router's estimate of each key block's share."""
        temperature = self.alpha_log_temperature.exp()[:, None, None]
        counts = block_token_counts(length, self.block_k, scores.device).to(scores.dtype)
        return torch.softmax(scores * temperature.to(scores.dtype) + counts.log(), dim=-1)

    def alpha_from_mass(self, mass: torch.Tensor) -> torch.Tensor:
        """alpha = sigmoid(w_h * logit(clamp(mass)) + b_h) for mass of shape (B, H, n)."""
        clamped = mass.clamp(MASS_CLAMP, 1.0 - MASS_CLAMP)
        logit = torch.log(clamped) - torch.log1p(-clamped)
        return torch.sigmoid(self.alpha_weight[:, None] * logit + self.alpha_bias[:, None])

    def predict_alpha(self, routing: Routing, length: int) -> torch.Tensor:
        """alpha (B, H, T_m) float32 from hard routing: mass of the selected blocks, corrected per head."""
        mass = self.block_mass(routing.scores.float(), length).gather(-1, routing.lut.long()).sum(dim=-1)
        return self.alpha_from_mass(mass)

    def predict_soft_alpha(self, routing: SoftRouting, length: int) -> torch.Tensor:
        """alpha (B, H, n) from soft routing: the m-weighted mass; differentiable in the router too."""
        mass = (self.block_mass(routing.scores, length) * routing.weights).sum(dim=-1)
        return self.alpha_from_mass(mass)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SLA2 attention with hard routing on (B, H, L, D) tensors -> (B, H, L, D) in the input dtype
        (under autocast: in the autocast dtype)."""
        q, k, v = _autocast_inputs(q, k, v)
        self._check_inputs(q, k, v)
        return self.attend(q, k, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention itself, on inputs `forward` has checked (variants of the ablation override this)."""
        routing = self.hard_routing(q, k)
        alpha = None if routing.all_selected else self.predict_alpha(routing, q.shape[2])
        return self.routed_attention(q, k, v, routing.lut, alpha)

    def hard_routing(self, q: torch.Tensor, k: torch.Tensor) -> Routing:
        """Hard top-k routing with this layer's router projections, sparsity and blocks."""
        return route(
            q, k, sparsity=self.sparsity, proj_q=self.proj_q, proj_k=self.proj_k,
            block_q=self.block_q, block_k=self.block_k,
        )

    def routed_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, alpha: torch.Tensor | None
    ) -> torch.Tensor:
        """The op on a look-up table with this layer's blocks and low-bit mode (alpha None: O_s alone)."""
        return sla2_attention_routed(
            q, k, v, lut, alpha=alpha, block_q=self.block_q, block_k=self.block_k, quant=self.resolved_quant(q)
        )

    def forward_bshd(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same on diffusers' (B, L, H, D) layout, through transposed views."""
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a rank-4 tensor (B, L, H, D)")
        return self.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def soft_forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        query_blocks: torch.Tensor | None = None,
        tau: float = DEFAULT_TAU,
    ) -> torch.Tensor:
        """Calibration forward: soft routing, rows of `query_blocks` only (B, H, R, D), all keys.

        Compare with `sla2cli.ops.soft.dense_attention_rows` for the same blocks. Gradients reach
        proj_q, proj_k and the alpha parameters.
        """
        self._check_inputs(q, k, v)
        routing = soft_routing(
            q, k, sparsity=self.sparsity, proj_q=self.proj_q, proj_k=self.proj_k,
            query_blocks=query_blocks, tau=tau, block_q=self.block_q, block_k=self.block_k,
        )
        alpha = None if routing.all_selected else self.predict_soft_alpha(routing, q.shape[2])
        return soft_sla2_routed(q, k, v, routing, alpha, block_q=self.block_q, block_k=self.block_k)
