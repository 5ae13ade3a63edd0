"""Correctness gates: every provider's output is compared with a float32 reference before it is timed.

A fast wrong kernel is worse than a slow right one, so a mismatch stops the benchmark (KernelMismatch)
instead of producing a row. The references run on a sample, CHECK_HEADS heads x CHECK_QUERY_BLOCKS query
blocks (the first, the last and evenly between), with the keys in chunks (ops.sampled_reference), so
their memory does not grow with L and every provider is checked wherever the op itself fits; the row's
`checked_on` column states the sample. The price: an error confined to rows or heads outside the
sample goes unnoticed by the check (the unit and GPU tests compare whole outputs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from sla2cli.bench.inputs import AttentionInputs
from sla2cli.ops.geometry import DEFAULT_BLOCK_Q
from sla2cli.ops.sampled_reference import KEY_CHUNK, QueryBlockSample, chunk_starts, sample_query_blocks

CHECK_HEADS = 2  # heads compared
CHECK_QUERY_BLOCKS = 4  # query blocks (of DEFAULT_BLOCK_Q rows) compared per head
GRAD_CHECK_LENGTH = 2048  # sequence length of the small problem that checks dense backward passes

# Relative L2 error allowed against a float32 reference, by input dtype: bf16 keeps 8 mantissa bits.
FORWARD_TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 2.5e-2}
BACKWARD_FACTOR = 2.0  # gradients go through more low-precision steps than the output


class KernelMismatch(RuntimeError):
    """A provider's output or gradient disagrees with its reference: the kernel is wrong, not slow."""


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float32 (inf when value is not finite)."""
    value, reference = value.float(), reference.float()
    if not torch.isfinite(value).all():
        return float("inf")
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def require_close(
    provider: str, what: str, value: torch.Tensor, reference: torch.Tensor, tolerance: float
) -> None:
    error = relative_error(value, reference)
    if not error <= tolerance:
        raise KernelMismatch(
            f"{provider}: {what} differs from the reference by {error:.3g} (relative L2; allowed "
            f"{tolerance:.3g}); this kernel is wrong here, so it is not timed"
        )


def dense_attention_float32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D)) V in float32, written out (the math every dense kernel must match)."""
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = qf @ kf.transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ vf


def dense_rows_float32(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """dense_attention_float32 for a few query rows over every key, the keys in chunks of KEY_CHUNK with
    an online softmax (running max m, sum l): memory rows x KEY_CHUNK whatever L is."""
    qf = q_rows.float() * q_rows.shape[-1] ** -0.5
    row_max = torch.full(qf.shape[:-1], float("-inf"), device=qf.device)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros(*qf.shape[:-1], v.shape[-1], device=qf.device)
    for start in chunk_starts(k.shape[2]):
        scores = qf @ k[:, :, start:start + KEY_CHUNK].float().transpose(-1, -2)
        new_max = torch.maximum(row_max, scores.amax(dim=-1))
        probs = torch.exp(scores - new_max[..., None])
        rescale = torch.exp(row_max - new_max)
        row_sum = row_sum * rescale + probs.sum(dim=-1)
        acc = acc * rescale[..., None] + probs @ v[:, :, start:start + KEY_CHUNK].float()
        row_max = new_max
    return acc / row_sum[..., None]


def output_and_grads(
    call: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], grad_out: torch.Tensor | None
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Run call(); with grad_out, also back-propagate it and return the leaves' gradients."""
    for leaf in leaves:
        leaf.grad = None
    out = call()
    if grad_out is None:
        return out.detach(), []
    out.backward(grad_out)
    grads = [None if leaf.grad is None else leaf.grad.detach().clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    return out.detach(), grads


def fresh_leaves(tensors: Sequence[torch.Tensor], requires_grad: bool) -> list[torch.Tensor]:
    """Detached contiguous copies, so that a reference builds its own autograd graph."""
    return [t.detach().clone().contiguous().requires_grad_(requires_grad) for t in tensors]


def head_slice(inputs: AttentionInputs) -> slice:
    return slice(0, min(CHECK_HEADS, inputs.shape.heads))


class CheckSample(NamedTuple):
    """The heads and query blocks (with their rows) a check compares."""

    heads: slice
    query: QueryBlockSample


def check_sample(inputs: AttentionInputs) -> CheckSample:
    query = sample_query_blocks(inputs.shape.length, DEFAULT_BLOCK_Q, CHECK_QUERY_BLOCKS, inputs.device)
    return CheckSample(head_slice(inputs), query)


def describe_sample(inputs: AttentionInputs, rows: int | None) -> str:
    """The `checked_on` cell: heads and query rows compared (rows None: all of them)."""
    heads = head_slice(inputs).stop
    length = inputs.shape.length
    covered = f"{length}/{length}" if rows is None else f"{rows}/{length}"
    return f"{heads}/{inputs.shape.heads} heads x {covered} query rows"


def sampled_grad_out(inputs: AttentionInputs, sample: CheckSample) -> torch.Tensor | None:
    """The upstream gradient on the sampled heads and rows, zero elsewhere (None in forward mode): then
    dq lives on those rows only and dk, dv, dalpha come from them, which the sampled reference reproduces."""
    if inputs.grad_out is None:
        return None
    grad_out = torch.zeros_like(inputs.grad_out)
    rows = sample.query.rows
    grad_out[:, sample.heads, rows] = inputs.grad_out[:, sample.heads, rows]
    return grad_out


def training(inputs: AttentionInputs) -> bool:
    return inputs.grad_out is not None
