"""SLA2Attention: parameters, alpha predictor, agreement with the oracle, gradients, layouts."""

import pytest
import torch
import torch.nn.functional as F

from sla2cli.module import ALPHA_BIAS_AT_CREATION, SLA2Attention
from sla2cli.ops import route, sla2_reference
from sla2cli.ops.soft import query_block_rows

STATE_KEYS = ["proj_q", "proj_k", "alpha_weight", "alpha_bias", "alpha_log_temperature"]


def make_qkv(length, heads=2, head_dim=64, batch=1, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype) for _ in range(3))


def perturb(layer: SLA2Attention, seed: int = 0) -> SLA2Attention:
    """Move every parameter off its initial value, as calibration would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return layer


def test_sparsity_zero_is_dense_attention():
    layer = SLA2Attention(2, 64, sparsity=0.0)
    q, k, v = make_qkv(300)
    torch.testing.assert_close(layer(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("length", [2100, 1000])
def test_matches_the_reference_with_its_own_alpha(length):
    layer = perturb(SLA2Attention(2, 64, sparsity=0.97))
    q, k, v = make_qkv(length, batch=2, seed=1)
    routing = route(q, k, sparsity=0.97, proj_q=layer.proj_q, proj_k=layer.proj_k)
    alpha = layer.predict_alpha(routing, length)
    assert alpha.shape == (2, 2, (length + 127) // 128)
    expected = sla2_reference(q, k, v, sparsity=0.97, alpha=alpha, proj_q=layer.proj_q, proj_k=layer.proj_k)
    torch.testing.assert_close(layer(q, k, v).detach(), expected, atol=1e-4, rtol=1e-4)


def test_same_parameters_run_at_two_lengths():
    layer = perturb(SLA2Attention(2, 64, sparsity=0.9), seed=2)
    for length in (640, 1500):
        q, k, v = make_qkv(length, seed=length)
        out = layer(q, k, v)
        assert out.shape == q.shape and bool(torch.isfinite(out).all())
        routing = route(q, k, sparsity=0.9, proj_q=layer.proj_q, proj_k=layer.proj_k)
        assert layer.predict_alpha(routing, length).shape[-1] == (length + 127) // 128


def test_alpha_lies_in_unit_interval_and_starts_from_the_mass_estimate():
    layer = SLA2Attention(2, 64, sparsity=0.8)
    q, k, v = make_qkv(1000, seed=3)
    routing = route(q, k, sparsity=0.8)
    alpha = layer.predict_alpha(routing, 1000)
    assert bool(((alpha >= 0) & (alpha <= 1)).all())
    # At creation alpha = the share of the block-level softmax over S_c + log(real tokens) held by the kept
    # blocks. The last key block has 1000 - 15 * 64 = 40 real tokens.
    counts = torch.full((16,), 64.0)
    counts[-1] = 40.0
    probs = torch.softmax(routing.scores + counts.log(), dim=-1)
    mass = probs.gather(-1, routing.lut.long()).sum(-1)
    logit = torch.logit(mass.clamp(1e-4, 1 - 1e-4))
    expected = torch.sigmoid(logit + ALPHA_BIAS_AT_CREATION)
    torch.testing.assert_close(alpha, expected, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        layer.alpha_bias.fill_(30.0)
    assert bool((layer.predict_alpha(routing, 1000) > 0.999).all())
    with torch.no_grad():
        layer.alpha_bias.fill_(-30.0)
    assert bool((layer.predict_alpha(routing, 1000) < 1e-3).all())


def test_gradients_reach_alpha_parameters_and_inputs():
    layer = SLA2Attention(2, 64, sparsity=0.75)
    q, k, v = (t.requires_grad_() for t in make_qkv(600, seed=4))
    layer(q, k, v).square().mean().backward()
    for name in ("alpha_weight", "alpha_bias", "alpha_log_temperature"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    assert layer.proj_q.grad is None  # hard routing: the router has no gradient


def test_soft_forward_trains_router_and_alpha():
    layer = SLA2Attention(2, 64, sparsity=0.75)
    q, k, v = make_qkv(640, seed=5)
    blocks = torch.tensor([3, 1])
    out = layer.soft_forward(q, k, v, query_blocks=blocks, tau=0.5)
    assert out.shape == (1, 2, 256, 64)
    target = F.scaled_dot_product_attention(q, k, v)[:, :, query_block_rows(640, 128, blocks)]
    F.mse_loss(out, target).backward()
    for name in ("proj_q", "proj_k", "alpha_weight", "alpha_bias", "alpha_log_temperature"):
        grad = getattr(layer, name).grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0, name


def test_soft_forward_approaches_forward_as_tau_shrinks():
    layer = perturb(SLA2Attention(2, 64, sparsity=0.8), seed=6)
    q, k, v = make_qkv(700, seed=6)
    blocks = torch.tensor([5, 2])
    with torch.no_grad():
        hard = layer(q, k, v)[:, :, query_block_rows(700, 128, blocks)]
        soft = layer.soft_forward(q, k, v, query_blocks=blocks, tau=1e-6)
    torch.testing.assert_close(soft, hard, atol=1e-4, rtol=1e-4)


def test_state_dict_names_are_stable():
    layer = SLA2Attention(12, 128)
    state = layer.state_dict()
    assert list(state) == STATE_KEYS
    assert state["proj_q"].shape == (128, 128) and state["alpha_bias"].shape == (12,)
    assert torch.equal(state["proj_k"], torch.eye(128))
    other = SLA2Attention(12, 128)
    other.load_state_dict(perturb(layer).state_dict())
    for name, value in layer.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name


def test_parameters_stay_float32_when_the_model_is_cast():
    layer = perturb(SLA2Attention(2, 64, sparsity=0.9), seed=7)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    layer.to(torch.bfloat16)
    layer.half()
    for name, param in layer.named_parameters():
        assert param.dtype == torch.float32, name
        assert torch.equal(param.detach(), before[name]), name
    q, k, v = make_qkv(600, seed=7, dtype=torch.bfloat16)
    out = layer(q, k, v)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_forward_bshd_is_forward_on_transposed_views():
    layer = perturb(SLA2Attention(3, 64, sparsity=0.9), seed=8)
    q, k, v = make_qkv(500, heads=3, seed=8)
    out = layer.forward_bshd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(out, layer(q, k, v).transpose(1, 2))


def test_sparsity_is_settable_and_checked():
    layer = SLA2Attention(2, 64)
    assert layer.sparsity == 0.97 and "sparsity=0.97" in repr(layer)
    layer.sparsity = 0.5
    assert "sparsity=0.5" in layer.extra_repr()
    for bad in (1.0, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="sparsity"):
            layer.sparsity = bad


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        ((0, 64), {}, "num_heads"),
        ((2.0, 64), {}, "num_heads"),
        ((2, 96), {}, "head_dim"),
        ((2, 64), {"sparsity": 1.0}, "sparsity"),
        ((2, 64), {"block_q": 100}, "block_q"),
        ((2, 64), {"block_k": 8}, "block_k"),
    ],
)
def test_constructor_names_the_bad_argument(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        SLA2Attention(*args, **kwargs)


def test_forward_rejects_inputs_that_do_not_fit_the_layer():
    layer = SLA2Attention(2, 64)
    q, k, v = make_qkv(300, heads=3)
    with pytest.raises(ValueError, match="heads"):
        layer(q, k, v)
    q, k, v = make_qkv(300, head_dim=128)
    with pytest.raises(ValueError, match="head_dim"):
        layer(q, k, v)
    with pytest.raises(ValueError, match="q"):
        layer.forward_bshd(q[0], k, v)


def test_quant_is_configuration_checked_and_shown():
    layer = SLA2Attention(2, 64)
    assert layer.quant == "none"
    layer.quant = "INT8-FP8"
    assert layer.quant == "int8-fp8"
    assert "quant=int8-fp8" in repr(layer)
    assert sorted(layer.state_dict()) == sorted(STATE_KEYS)
    with pytest.raises(ValueError, match="quant must be one of none, int8, int8-fp8, auto"):
        SLA2Attention(2, 64, quant="int4")
    with pytest.raises(ValueError, match="quant must be one of"):
        layer.quant = "fp8"
    assert layer.quant == "int8-fp8"


@pytest.mark.parametrize("quant", ["int8-fp8", "int8"])
def test_lowbit_forward_is_the_oracle_and_backward_is_straight_through(quant):
    from sla2cli.ops.quantization import resolve_quant_mode, sla2_lowbit_reference

    length = 700
    exact = perturb(SLA2Attention(2, 64, sparsity=0.8), seed=4)
    lowbit = SLA2Attention(2, 64, sparsity=0.8, quant=quant)
    lowbit.load_state_dict(exact.state_dict())
    q, k, v = (t.requires_grad_(True) for t in make_qkv(length, seed=5))
    routing = route(q, k, sparsity=0.8, proj_q=exact.proj_q, proj_k=exact.proj_k)
    alpha = exact.predict_alpha(routing, length).detach()
    mode = resolve_quant_mode(quant, "cpu", q.shape)
    expected = sla2_lowbit_reference(q.detach(), k.detach(), v.detach(), routing.lut, mode=mode, alpha=alpha)

    out_lowbit, out_exact = lowbit(q, k, v), exact(q, k, v)
    torch.testing.assert_close(out_lowbit.detach(), expected, atol=1e-4, rtol=1e-4)
    assert (out_lowbit - out_exact).norm() > 1e-4 * out_exact.norm()  # the mode reached the op
    grad_out = torch.randn_like(out_exact)
    grads_lowbit = torch.autograd.grad(out_lowbit, (q, k, v), grad_out)
    grads_exact = torch.autograd.grad(out_exact, (q, k, v), grad_out)
    for got, want in zip(grads_lowbit, grads_exact, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_auto_runs_unquantised_on_a_cpu():
    """The low-bit modes are emulated on a CPU (slower than the exact path), so auto runs the exact op there."""
    exact = perturb(SLA2Attention(2, 64, sparsity=0.8), seed=4)
    auto = SLA2Attention(2, 64, sparsity=0.8, quant="auto")
    auto.load_state_dict(exact.state_dict())
    q, k, v = make_qkv(700, seed=5)
    assert auto.resolved_quant(q) == "none"
    torch.testing.assert_close(auto(q, k, v), exact(q, k, v), atol=0, rtol=0)
