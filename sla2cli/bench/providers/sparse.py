"""SLA2 itself (also with its low-bit sparse branch), its router alone, and FlexAttention over the same blocks.

The SLA2 rows time the whole op a converted model calls (routing, sparse branch, linear branch, mix),
checked against the PyTorch block-gather implementation with the same look-up table. The low-bit row's
forward is checked against the fake-quant oracle instead (same rounding, step by step), its gradients
against the unquantised op's (the backward is straight-through). FlexAttention
gets that very table as a block mask, so its row is the cost of the sparse branch alone, done by a
general-purpose block-sparse kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sla2cli.bench.cases import FORWARD_BACKWARD
from sla2cli.bench.checks import (
    BACKWARD_FACTOR,
    KernelMismatch,
    check_sample,
    describe_sample,
    fresh_leaves,
    head_slice,
    output_and_grads,
    relative_error,
    require_close,
    sampled_grad_out,
    training,
)
from sla2cli.bench.inputs import AttentionInputs
from sla2cli.bench.providers.base import ROUTING, SPARSE, Provider
from sla2cli.ops import route, sla2_attention
from sla2cli.ops.geometry import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from sla2cli.ops.quantization import (
    QUANT_NONE,
    choose_auto_quant,
    lowbit_sparse_branch,
    runnable_lowbit_mode,
)
from sla2cli.ops.reference import router_scores
from sla2cli.ops.sampled_reference import QueryBlockSample, sla2_sampled

GRADIENT_NAMES = ("dq", "dk", "dv", "dalpha")


def _require_sparsity(sparsity: float | None) -> float:
    if sparsity is None:
        raise ValueError("a sparse provider needs a sparsity")
    return sparsity


class BlockSparseProvider(Provider):
    """A provider whose output equals SLA2's (or its sparse branch's) with the router's look-up table."""

    kind = SPARSE
    mixes_linear_branch: bool  # True: SLA2 output (both branches, alpha); False: sparse branch only

    def verify(
        self, inputs: AttentionInputs, sparsity: float | None, call: Callable[[], torch.Tensor]
    ) -> None:
        """Output and gradients on the sampled heads and query blocks (checks.check_sample) against
        ops.sampled_reference with the router's look-up table; the upstream gradient is zero elsewhere."""
        sample = check_sample(inputs)
        heads, rows = sample.heads, sample.query.rows
        grad_out = sampled_grad_out(inputs, sample)
        out, grads = output_and_grads(call, inputs.leaves, grad_out)
        lut = route(inputs.q, inputs.k, sparsity=_require_sparsity(sparsity)).lut[:, heads]
        q_rows = inputs.q[:, heads].index_select(2, rows)
        leaves = fresh_leaves(
            [q_rows.float(), inputs.k[:, heads].float(), inputs.v[:, heads].float(), inputs.alpha[:, heads].float()],
            requires_grad=training(inputs),
        )
        q, k, v, alpha = leaves
        mix = alpha if self.mixes_linear_branch else None
        grad_rows = None if grad_out is None else grad_out[:, heads].index_select(2, rows).float()
        # One pass of the exact reference gives its output and, in training, its gradients, which a low-bit
        # forward keeps too (its backward is straight-through); only a low-bit output needs a second forward.
        expected_out, expected = output_and_grads(
            lambda: sla2_sampled(q, k, v, lut, mix, sample.query, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K), leaves, grad_rows
        )
        with torch.no_grad():
            sparse_rows = self.sparse_rows(inputs.q[:, heads], inputs.k[:, heads], inputs.v[:, heads], lut,
                                           sample.query)
            if sparse_rows is not None:
                expected_out = sla2_sampled(
                    q, k, v, lut, mix, sample.query, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K, sparse_rows=sparse_rows
                )
        tolerance = self.tolerance(inputs.dtype)
        require_close(self.name, "output", out[:, heads].index_select(2, rows), expected_out, tolerance)
        if grad_rows is None:
            return
        dq, *others = grads
        if dq is None:
            raise KernelMismatch(f"{self.name}: returned no gradient for q")
        grads = [dq[:, heads].index_select(2, rows), *(None if g is None else g[:, heads] for g in others)]
        for name, grad, reference in zip(GRADIENT_NAMES, grads, expected, strict=False):
            if reference is None:
                continue
            if grad is None:
                raise KernelMismatch(f"{self.name}: returned no gradient for {name[1:]}")
            require_close(self.name, name, grad, reference, tolerance * BACKWARD_FACTOR)

    def sparse_rows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, sample: QueryBlockSample
    ) -> torch.Tensor | None:
        """The sparse branch's output on the sampled rows when it is not the exact one (low-bit), else None."""
        return None


class Sla2(BlockSparseProvider):
    name = "sla2"
    summary = "SLA2 op: routing + sparse branch + linear branch + mix"
    mixes_linear_branch = True

    def quant_mode(self, device: torch.device) -> str:
        return QUANT_NONE

    def build(self, inputs: AttentionInputs, sparsity: float | None) -> Callable[[], torch.Tensor]:
        level = _require_sparsity(sparsity)
        return lambda: sla2_attention(inputs.q, inputs.k, inputs.v, sparsity=level, alpha=inputs.alpha)


class Sla2Lowbit(BlockSparseProvider):
    """The SLA2 op with the low-bit sparse branch this GPU runs (int8: INT8 Q K^T, P V in the input's
    precision), whatever its speed, so that its row is the measurement `auto` decides from (ops.lowbit_speed);
    the row's note says what `auto` runs at that shape. Skipped where the GPU has no low-bit mode."""

    name = "sla2-lowbit"
    summary = "SLA2 op, low-bit sparse branch: routing + INT8 sparse branch + linear branch + mix"
    mixes_linear_branch = True

    def quant_mode(self, device: torch.device) -> str:
        return runnable_lowbit_mode(device)

    def unsupported(self, device: torch.device, dtype: torch.dtype, mode: str) -> str | None:
        if self.quant_mode(device) == QUANT_NONE:
            return "this GPU runs no low-bit mode (INT8 tensor cores need compute capability 8.0+)"
        return super().unsupported(device, dtype, mode)

    def decision_note(self, inputs: AttentionInputs) -> str | None:
        return choose_auto_quant(inputs.q.device, inputs.shape.dims, training=training(inputs)).reason

    def build(self, inputs: AttentionInputs, sparsity: float | None) -> Callable[[], torch.Tensor]:
        level = _require_sparsity(sparsity)
        mode = self.quant_mode(inputs.q.device)
        return lambda: sla2_attention(inputs.q, inputs.k, inputs.v, sparsity=level, alpha=inputs.alpha, quant=mode)

    def sparse_rows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, sample: QueryBlockSample
    ) -> torch.Tensor:
        """The fake-quant oracle's sparse branch on the sampled rows (same rounding, step by step)."""
        mode = self.quant_mode(q.device)
        return lowbit_sparse_branch(q, k, v, lut, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K, mode, sample)

    def accuracy(
        self, inputs: AttentionInputs, sparsity: float | None, call: Callable[[], torch.Tensor]
    ) -> dict[str, float]:
        """rel_l2_vs_sla2: what the low-bit forward costs against the unquantised op, same inputs."""
        level = _require_sparsity(sparsity)
        with torch.no_grad():
            exact = sla2_attention(inputs.q, inputs.k, inputs.v, sparsity=level, alpha=inputs.alpha)
            return {"rel_l2_vs_sla2": relative_error(call(), exact)}


def block_mask_from_lut(lut: torch.Tensor, length: int, num_key_blocks: int):
    """A FlexAttention BlockMask that keeps exactly the key blocks of `lut` (B, H, T_m, k_sel).

    The selected blocks are marked full (no per-element mask function), which is FlexAttention's fast
    path; its kernels bound-check the partial last block against the sequence length themselves.
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, heads, num_q_blocks, k_sel = lut.shape
    indices = torch.zeros(batch, heads, num_q_blocks, num_key_blocks, dtype=torch.int32, device=lut.device)
    indices[..., :k_sel] = lut.to(torch.int32)
    counts = torch.full((batch, heads, num_q_blocks), k_sel, dtype=torch.int32, device=lut.device)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(counts),
        indices,
        counts,
        indices,
        BLOCK_SIZE=(DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K),
        seq_lengths=(length, length),
    )


_COMPILED_FLEX: dict[str, Callable] = {}
FLEX_RECOMPILE_LIMIT = 64


def compiled_flex_attention() -> Callable:
    """torch.compile(flex_attention), built once per process.

    Eager flex_attention ignores block sparsity, so falling back to it would time dense attention:
    each shape and mode compiles anew, and the recompile limit is raised so many --shape values
    never push dynamo into that fallback.
    """
    if "flex" not in _COMPILED_FLEX:
        import torch._dynamo.config
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
        _COMPILED_FLEX["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX["flex"]


class Flex(BlockSparseProvider):
    name = "flex"
    summary = "FlexAttention on SLA2's selected blocks: sparse part only (no router, no linear branch)"
    partial = "sparse part only"
    mixes_linear_branch = False
    needs_cuda = True

    def build(self, inputs: AttentionInputs, sparsity: float | None) -> Callable[[], torch.Tensor]:
        routing = route(inputs.q, inputs.k, sparsity=_require_sparsity(sparsity))
        mask = block_mask_from_lut(routing.lut, inputs.shape.length, routing.scores.shape[-1])
        flex = compiled_flex_attention()
        return lambda: flex(inputs.q, inputs.k, inputs.v, block_mask=mask)


class Sla2Routing(Provider):
    """The router alone (pooling, scores, top-k): the part of SLA2 that no dense kernel pays."""

    name = "sla2-routing"
    kind = ROUTING
    summary = "SLA2 routing alone: pooling + block scores + top-k"
    partial = "routing only"

    def unsupported(self, device: torch.device, dtype: torch.dtype, mode: str) -> str | None:
        if mode == FORWARD_BACKWARD:
            return "routing has no backward pass (top-k has no gradient); see its fwd row"
        return super().unsupported(device, dtype, mode)

    def build(self, inputs: AttentionInputs, sparsity: float | None) -> Callable[[], torch.Tensor]:
        level = _require_sparsity(sparsity)
        return lambda: route(inputs.q, inputs.k, sparsity=level).lut

    def checked_on(self, inputs: AttentionInputs) -> str:
        return describe_sample(inputs, None)  # block scores are T_m x T_n per head: every query block

    def verify(
        self, inputs: AttentionInputs, sparsity: float | None, call: Callable[[], torch.Tensor]
    ) -> None:
        """Every selected block must be among the top k_sel of float32 reference scores (ties allowed)."""
        heads = head_slice(inputs)
        lut = call()[:, heads].long()
        q, k = inputs.q[:, heads].float(), inputs.k[:, heads].float()
        scores = router_scores(q, k, None, None, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)
        k_sel = lut.shape[-1]
        kth_best = scores.topk(k_sel, dim=-1).values[..., -1:]
        slack = 1e-3 * scores.abs().amax(dim=-1, keepdim=True)
        chosen = scores.gather(-1, lut)
        distinct = (lut.diff(dim=-1) > 0).all() if k_sel > 1 else True
        if not (bool(distinct) and bool((chosen >= kth_best - slack).all())):
            raise KernelMismatch(
                f"{self.name}: selected key blocks are not the top {k_sel} of the reference scores"
            )
