"""Bad input to sla2_attention raises ValueError whose message names the argument at fault."""

import re

import pytest
import torch

from sla2cli.ops import sla2_attention, sla2_attention_bshd
from sla2cli.ops.validation import (
    check_block_size,
    check_head_dim,
    check_positive_int,
    check_sparsity,
    check_timestep,
)

B, H, L, D = 1, 2, 200, 64


def tensors(**changes):
    """Valid q, k, v, with some replaced by the test."""
    base = {name: torch.randn(B, H, L, D) for name in ("q", "k", "v")}
    base.update(changes)
    return base


def call(sparsity=0.9, **overrides):
    inputs = tensors(**{name: overrides.pop(name) for name in ("q", "k", "v") if name in overrides})
    return sla2_attention(inputs["q"], inputs["k"], inputs["v"], sparsity=sparsity, **overrides)


def raises_naming(name):
    """The message must contain the argument's name as a word (so 'q' does not match 'sequence')."""
    return pytest.raises(ValueError, match=rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])")


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_wrong_rank(name):
    with raises_naming(name):
        call(**{name: torch.randn(H, L, D)})


@pytest.mark.parametrize("name", ["k", "v"])
def test_mismatched_shapes(name):
    with raises_naming(name):
        call(**{name: torch.randn(B, H, L + 1, D)})


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_unsupported_dtype(name):
    with raises_naming(name):
        call(**{name: torch.randn(B, H, L, D, dtype=torch.float64)})
    with raises_naming(name):
        call(**{name: torch.ones(B, H, L, D, dtype=torch.int32)})


@pytest.mark.parametrize("name", ["k", "v"])
def test_mismatched_dtypes(name):
    with raises_naming(name):
        call(**{name: torch.randn(B, H, L, D, dtype=torch.float16)})


@pytest.mark.parametrize("name", ["k", "v"])
def test_mismatched_devices(name):
    with raises_naming(name):
        call(**{name: torch.empty(B, H, L, D, device="meta")})


def test_not_a_tensor():
    with raises_naming("q"):
        call(q=[[1.0]])


def test_unsupported_head_dim():
    with raises_naming("q") as error:
        call(**tensors(**{name: torch.randn(B, H, L, 96) for name in ("q", "k", "v")}))
    assert "96" in str(error.value) and "head dim" in str(error.value)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.9", None, True])
def test_sparsity_out_of_range(sparsity):
    with raises_naming("sparsity"):
        call(sparsity=sparsity)


@pytest.mark.parametrize("shape", [(4,), (B, H, 3), (2, H, 2), (B, H + 1, 1)])
def test_bad_alpha_shape(shape):
    with raises_naming("alpha"):
        call(alpha=torch.rand(*shape))  # T_m = 2 for L = 200


def test_alpha_on_another_device():
    with raises_naming("alpha"):
        call(alpha=torch.empty(B, H, 2, device="meta"))


@pytest.mark.parametrize("name", ["proj_q", "proj_k"])
@pytest.mark.parametrize("shape", [(D, D + 1), (D,), (2 * D, 2 * D), (H, D, D)])
def test_bad_proj_shape(name, shape):
    with raises_naming(name):
        call(**{name: torch.randn(*shape)})


@pytest.mark.parametrize("name", ["proj_q", "proj_k"])
def test_proj_not_a_tensor(name):
    with raises_naming(name):
        call(**{name: [[1.0]]})


@pytest.mark.parametrize("name, value", [("block_q", 100), ("block_k", 8), ("block_q", 128.0)])
def test_bad_block_sizes(name, value):
    with raises_naming(name):
        call(**{name: value})


def test_bshd_layout_checks_rank():
    q = torch.randn(B, L, H, D)
    with raises_naming("k"):
        sla2_attention_bshd(q, q[0], q, sparsity=0.9)


def test_valid_inputs_pass():
    out = call(alpha=torch.rand(B, H, 2), proj_q=torch.eye(D), proj_k=torch.eye(D))
    assert out.shape == (B, H, L, D)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "0.9", None, True])
def test_check_sparsity_names_the_option(value):
    with pytest.raises(ValueError, match=r"^--sparsity must be a number in \[0, 1\)"):
        check_sparsity(value, "--sparsity")


def test_parameter_checks_accept_and_return_valid_values():
    assert check_sparsity(0) == 0.0 and check_sparsity(0.97) == 0.97
    assert check_head_dim(64) == 64 and check_head_dim(128) == 128
    assert check_block_size(16, "block_k") == 16 and check_block_size(128, "block_q") == 128
    assert check_timestep(0) == 0.0 and check_timestep(1.0) == 1.0
    assert check_positive_int(3, "--clips") == 3


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (lambda v: check_head_dim(v, "--head-dim"), 96, "--head-dim must be 64 or 128"),
        (lambda v: check_head_dim(v), True, "head dim must be 64 or 128"),
        (lambda v: check_block_size(v, "block_q"), 48, "block_q must be a power of two >= 16"),
        (lambda v: check_block_size(v, "block_q"), 8, "block_q must be a power of two >= 16"),
        (lambda v: check_timestep(v, "--timesteps values"), 1.5, r"--timesteps values must lie in \[0, 1\]"),
        (lambda v: check_positive_int(v, "num_heads"), 0, "num_heads must be a positive integer"),
    ],
)
def test_parameter_checks_name_what_is_wrong(check, value, message):
    with pytest.raises(ValueError, match=message):
        check(value)
