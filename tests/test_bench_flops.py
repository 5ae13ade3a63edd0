"""`sla2cli.bench.flops`: the FLOP counts a row's TFLOP/s come from."""

from __future__ import annotations

import pytest

from sla2cli.bench.cases import FORWARD, FORWARD_BACKWARD, AttentionShape
from sla2cli.bench.flops import selected_blocks, shape_flops, sparse_share


def test_flop_counts_follow_the_formulas():
    shape = AttentionShape(1, 12, 32760, 128)
    assert shape_flops(shape, FORWARD) == 4 * 12 * 32760**2 * 128
    assert shape_flops(shape, FORWARD_BACKWARD) == pytest.approx(3.5 * 4 * 12 * 32760**2 * 128)
    assert selected_blocks(shape, 0.97) == (15, 512)
    assert sparse_share(shape, 0.97) == pytest.approx(15 / 512)
    assert sparse_share(shape, None) == 1.0
