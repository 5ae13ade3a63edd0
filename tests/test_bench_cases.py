"""`sla2cli.bench.cases`: reading --shape."""

from __future__ import annotations

import pytest

from sla2cli.bench.cases import AttentionShape, parse_shape


def test_parse_shape_reads_four_integers():
    assert parse_shape("1,12,32760,128") == AttentionShape(1, 12, 32760, 128)
    assert parse_shape(" 2, 4, 100, 64 ").label == "2x4x100x64"


@pytest.mark.parametrize(
    "text", ["1,2,512", "1,2,512,64,1", "a,2,512,64", "1,2,-5,64", "1,0,512,64", "1,2,512,96", ""]
)
def test_parse_shape_rejects_malformed(text):
    with pytest.raises(ValueError, match="--shape"):
        parse_shape(text)
