"""`sla2cli.bench.checks` and ops.sampled_reference: the correctness gates run on sampled heads and query
blocks in memory that does not grow with L, match the full oracles there, and catch a wrong output in
the sample (an error outside it is, by design, not seen)."""

from __future__ import annotations

import pytest
import torch
from bench_support import CPU, measure_provider
from torch.utils._python_dispatch import TorchDispatchMode

from sla2cli.bench.cases import FORWARD, FORWARD_BACKWARD, AttentionShape
from sla2cli.bench.checks import CHECK_HEADS, KernelMismatch, check_sample, dense_rows_float32
from sla2cli.bench.inputs import make_inputs
from sla2cli.bench.providers.sparse import Sla2
from sla2cli.ops import route, sla2_attention
from sla2cli.ops.blockwise import blockwise_sla2
from sla2cli.ops.quantization import lowbit_sparse_branch, sla2_lowbit_reference
from sla2cli.ops.sampled_reference import KEY_CHUNK, sample_query_blocks, sla2_sampled

pytestmark = pytest.mark.usefixtures("one_thread")


class _LargestAllocation(TorchDispatchMode):
    """Bytes of the largest new storage any op creates (views of existing tensors do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _case(length: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, length, 64, generator=generator) for _ in range(3))
    alpha = 0.05 + 0.9 * torch.rand(1, 2, (length + 127) // 128, generator=generator)
    return q, k, v, alpha


def _references_largest_allocation(length: int) -> int:
    """Largest allocation of the three sampled references at this length, with 2 key blocks per row."""
    q, k, v, alpha = _case(length)
    key_blocks = length // 64
    lut = route(q, k, sparsity=1 - 2 / key_blocks).lut
    assert lut.shape[-1] == 2
    sample = sample_query_blocks(length, 128, 4, CPU)
    q_rows = q.index_select(2, sample.rows)
    with torch.no_grad(), _LargestAllocation() as probe:
        sla2_sampled(q_rows, k, v, lut, alpha, sample, 128, 64)
        lowbit = lowbit_sparse_branch(q, k, v, lut, 128, 64, "int8-fp8", sample)
        sla2_sampled(q_rows, k, v, lut, alpha, sample, 128, 64, sparse_rows=lowbit)
        dense_rows_float32(q_rows, k, v)
    return probe.largest


def test_sampled_references_allocate_the_same_at_any_length():
    short, long = 2 * KEY_CHUNK, 8 * KEY_CHUNK
    largest = _references_largest_allocation(short)
    assert largest == _references_largest_allocation(long)
    # the bound: one chunk of scores, 2 heads x 512 sampled rows x KEY_CHUNK keys in float32
    assert largest <= 2 * 512 * KEY_CHUNK * 4 < 2 * long * long * 4


@pytest.mark.parametrize("length", [1000, 640])
def test_sampled_references_match_the_full_oracles_on_their_rows(length):
    q, k, v, alpha = _case(length, seed=1)
    lut = route(q, k, sparsity=0.5).lut
    sample = sample_query_blocks(length, 128, 4, CPU)
    assert sample.blocks[0] == 0 and sample.blocks[-1] == (length + 127) // 128 - 1  # the partial block too
    rows = sample.rows
    q_rows = q.index_select(2, rows)
    for mix in (alpha, None):
        full = blockwise_sla2(q, k, v, lut, mix, 128, 64)[:, :, rows]
        torch.testing.assert_close(sla2_sampled(q_rows, k, v, lut, mix, sample, 128, 64), full, atol=1e-5, rtol=1e-5)
    for mode in ("int8", "int8-fp8"):
        full = sla2_lowbit_reference(q, k, v, lut, mode=mode, alpha=alpha)[:, :, rows]
        lowbit = lowbit_sparse_branch(q, k, v, lut, 128, 64, mode, sample)
        got = sla2_sampled(q_rows, k, v, lut, alpha, sample, 128, 64, sparse_rows=lowbit)
        torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    dense = torch.softmax(q_rows @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
    torch.testing.assert_close(dense_rows_float32(q_rows, k, v), dense, atol=1e-5, rtol=1e-5)


SHAPE = AttentionShape(1, 4, 1024, 64)  # 8 query blocks; blocks 0, 2, 5 and 7 of heads 0 and 1 are checked


class _ShiftedRows(Sla2):
    """The SLA2 op with one query block of one head shifted: a kernel bug confined to one tile."""

    def __init__(self, head: int, block: int) -> None:
        self.head, self.block = head, block

    def build(self, inputs, sparsity):
        exact = super().build(inputs, sparsity)
        shift = torch.zeros(SHAPE.dims)
        shift[:, self.head, self.block * 128:(self.block + 1) * 128] = 1.0
        return lambda: exact() + shift


@pytest.mark.parametrize("mode", [FORWARD, FORWARD_BACKWARD])
def test_a_wrong_tile_in_the_sample_is_caught(mode):
    sample = check_sample(make_inputs(SHAPE, mode, torch.float32, CPU, seed=0))
    assert sample.query.blocks.tolist() == [0, 2, 5, 7] and sample.heads == slice(0, CHECK_HEADS)
    with pytest.raises(KernelMismatch, match="sla2: output differs"):
        measure_provider(_ShiftedRows(head=1, block=5), mode=mode, sparsity=0.5, shape=SHAPE)


@pytest.mark.parametrize(("head", "block"), [(0, 1), (3, 0)])
def test_a_wrong_tile_outside_the_sample_is_not_seen(head, block):
    """The limitation the bounded memory costs: the check compares the sample only (block 1; head 3)."""
    row = measure_provider(_ShiftedRows(head=head, block=block), sparsity=0.5, shape=SHAPE)
    assert row.status == "ok" and row.extra["checked_on"] == "2/4 heads x 512/1024 query rows"


def test_wrong_gradients_in_the_sample_are_caught():
    class WrongKeyGradient(Sla2):
        def build(self, inputs, sparsity):
            def call():
                k = inputs.k * 1.0
                k = k + (k - k.detach()) * 0.5  # same forward, dk halved
                return sla2_attention(inputs.q, k, inputs.v, sparsity=sparsity, alpha=inputs.alpha)
            return call

    with pytest.raises(KernelMismatch, match="sla2: dk differs"):
        measure_provider(WrongKeyGradient(), mode=FORWARD_BACKWARD, sparsity=0.5, shape=SHAPE)
