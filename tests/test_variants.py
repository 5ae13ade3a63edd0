"""Attention variants of the ablation: each against a plain-PyTorch reference with dense L x L masks,
forward and gradients, on the PyTorch path and through the Triton interpreter; in a model; saving."""

from __future__ import annotations

import pytest
import torch
from fixtures_hub import run_cli

from sla2cli import api
from sla2cli.errors import UserError
from sla2cli.integration.conversion import sla2_layers
from sla2cli.module import MASS_CLAMP, SLA2Attention
from sla2cli.ops.reference import attention_from_block_weights, block_token_counts, hard_block_mask, router_scores
from sla2cli.training.variants import (
    METHODS,
    SAVEABLE_METHODS,
    SLAProjLayer,
    apply_variant,
    check_saveable,
    trainable_sla2_parameters,
    variant_layer,
    variant_train_choice,
)

LENGTH, HEADS, HEAD_DIM, SPARSITY = 300, 2, 64, 0.6  # 3 query blocks (last partial), 5 key blocks, k_sel 2
BLOCK_Q, BLOCK_K = 128, 64


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, HEADS, LENGTH, HEAD_DIM, generator=generator) for _ in range(3))
    return q * 2.0, k * 2.0, v  # sharper attention, so the block choice matters


def trained_looking_layer(method: str) -> SLA2Attention:
    """A plain layer with non-trivial router and alpha parameters, turned into `method`."""
    generator = torch.Generator().manual_seed(1)
    layer = SLA2Attention(HEADS, HEAD_DIM, sparsity=SPARSITY)
    with torch.no_grad():
        layer.proj_q.add_(0.3 * torch.randn(HEAD_DIM, HEAD_DIM, generator=generator))
        layer.proj_k.add_(0.3 * torch.randn(HEAD_DIM, HEAD_DIM, generator=generator))
        layer.alpha_weight.copy_(torch.tensor([0.7, 1.3]))
        layer.alpha_bias.copy_(torch.tensor([0.5, -0.2]))
        layer.alpha_log_temperature.copy_(torch.tensor([0.2, -0.1]))
    variant = variant_layer(layer, method)
    if isinstance(variant, SLAProjLayer):
        with torch.no_grad():
            variant.linear_projection.copy_(0.2 * torch.randn(HEAD_DIM, HEAD_DIM, generator=generator))
    return variant


def reference_alpha(layer: SLA2Attention, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """alpha = sigmoid(w logit(mass) + b), mass = sum over kept blocks of softmax_j(S t + log n_j)."""
    counts = block_token_counts(LENGTH, BLOCK_K, scores.device)
    temperature = layer.alpha_log_temperature.exp()[:, None, None]
    share = torch.softmax(scores * temperature + counts.log(), dim=-1)
    mass = (share * mask).sum(dim=-1).clamp(MASS_CLAMP, 1 - MASS_CLAMP)
    logit = torch.log(mass / (1 - mass))
    return torch.sigmoid(layer.alpha_weight[:, None] * logit + layer.alpha_bias[:, None])


def reference_block_mass(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """True block masses straight from the L x L probabilities."""
    probs = torch.softmax(q @ k.transpose(-1, -2) * HEAD_DIM**-0.5, dim=-1)
    rows = torch.arange(LENGTH) // BLOCK_Q
    keys = torch.arange(LENGTH) // BLOCK_K
    row_map = torch.nn.functional.one_hot(rows).to(probs.dtype)  # (L, T_m)
    key_map = torch.nn.functional.one_hot(keys).to(probs.dtype)  # (L, T_n)
    summed = row_map.T @ probs @ key_map
    return summed / row_map.sum(dim=0)[:, None]


def reference_output(layer: SLA2Attention, method: str, q, k, v) -> torch.Tensor:
    """Each method written out with dense masks (`attention_from_block_weights` is the oracle's formula)."""
    if method == "dense":
        return torch.softmax(q @ k.transpose(-1, -2) * HEAD_DIM**-0.5, dim=-1) @ v
    identity_router = method in ("heuristic", "sla_proj")
    with torch.no_grad():
        scores = router_scores(
            q, k, None if identity_router else layer.proj_q, None if identity_router else layer.proj_k,
            BLOCK_Q, BLOCK_K,
        )
        k_sel = 2
        chosen = reference_block_mass(q, k) if method in ("oracle_router", "oracle_exact") else scores
        mask = hard_block_mask(chosen, k_sel).to(q.dtype)

    def mix(alpha):
        return attention_from_block_weights(q, k, v, mask, alpha, BLOCK_Q, BLOCK_K, all_selected=False)

    if method == "sparse_only":
        return mix(None)
    if method in ("exact_rest", "oracle_exact"):
        selected = mask.repeat_interleave(BLOCK_Q, -2)[..., :LENGTH, :].repeat_interleave(BLOCK_K, -1)[..., :LENGTH]
        logits = q @ k.transpose(-1, -2) * HEAD_DIM**-0.5
        sparse = torch.softmax(logits.masked_fill(selected == 0, float("-inf")), dim=-1) @ v
        rest = torch.softmax(logits.masked_fill(selected == 1, float("-inf")), dim=-1) @ v
        alpha = reference_alpha(layer, scores, mask).repeat_interleave(BLOCK_Q, -1)[..., :LENGTH, None]
        return alpha * sparse + (1 - alpha) * rest
    if method == "sla_proj":
        return mix(None) + mix(torch.zeros(1, HEADS, 3)) @ layer.linear_projection
    return mix(reference_alpha(layer, scores, mask))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("method", METHODS)
def test_variant_matches_reference_forward_and_gradients(method, backend, monkeypatch):
    monkeypatch.setenv("SLA2_BACKEND", backend)
    layer = trained_looking_layer(method)
    q, k, v = (t.requires_grad_(True) for t in make_inputs())
    trainable = [p for name, p in layer.named_parameters() if name in trainable_sla2_parameters(layer)]
    for p in trainable:
        p.requires_grad_(True)
    grad_out = torch.randn(1, HEADS, LENGTH, HEAD_DIM, generator=torch.Generator().manual_seed(5))

    out = layer(q, k, v)
    actual = torch.autograd.grad(out, (q, k, v, *trainable), grad_out)
    expected_out = reference_output(layer, method, q, k, v)
    expected = torch.autograd.grad(expected_out, (q, k, v, *trainable), grad_out)

    torch.testing.assert_close(out, expected_out, atol=2e-5, rtol=1e-4)
    for got, want in zip(actual, expected, strict=True):
        scale = want.norm().clamp_min(1e-3)
        assert ((got - want).norm() / scale).item() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_variant_runs_in_the_autocast_dtype(method):
    """Under autocast the model's q/k norms may hand over float32 beside a bfloat16 v; every variant
    attends in the autocast dtype, as the plain layer does."""
    layer = trained_looking_layer(method)
    q, k, v = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(q.float(), k.float(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = layer(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()  # autocast also lowers inner products
    assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-2


def test_what_each_variant_trains():
    layers = {method: trained_looking_layer(method) for method in METHODS}
    trains = {method: {name for name, _ in layer.named_parameters() if name in trainable_sla2_parameters(layer)}
              for method, layer in layers.items()}
    alpha = {"alpha_weight", "alpha_bias", "alpha_log_temperature"}
    assert trains == {
        "dense": set(), "sparse_only": set(), "heuristic": alpha, "sla_proj": {"linear_projection"},
        "sla2": alpha, "oracle_router": alpha, "exact_rest": alpha,
        "oracle_exact": alpha,
    }


def test_variants_keep_or_reset_what_their_definition_says():
    base = trained_looking_layer("sla2")
    eye = torch.eye(HEAD_DIM)
    for method in ("heuristic", "sla_proj"):
        layer = variant_layer(base, method)
        assert torch.equal(layer.proj_q, eye) and torch.equal(layer.proj_k, eye)
    for method in ("sla2", "oracle_router", "exact_rest", "oracle_exact", "sparse_only"):
        assert torch.equal(variant_layer(base, method).proj_q, base.proj_q)
    assert torch.equal(variant_layer(base, "heuristic").alpha_bias, base.alpha_bias)
    sparse = variant_layer(base, "sparse_only")
    assert bool((sparse.predict_alpha(_routing(sparse), LENGTH) == 1.0).all())  # alpha is exactly one
    proj = variant_layer(base, "sla_proj")
    assert not proj.linear_projection.any()  # starts as sparse-only
    q, k, v = make_inputs(3)
    torch.testing.assert_close(proj(q, k, v), variant_layer(variant_layer(base, "heuristic"), "sparse_only")(q, k, v))


def _routing(layer: SLA2Attention):
    from sla2cli.ops import route

    q, k, _ = make_inputs(2)
    return route(q, k, sparsity=SPARSITY, proj_q=layer.proj_q, proj_k=layer.proj_k)


@pytest.fixture()
def small_model(embedded_model, tmp_path, capsys):
    folder = tmp_path / "embedded-sla2"
    code, _, err = run_cli(["convert", "--out", str(folder)], capsys)
    assert code == 0, err
    return api.load(folder), folder


def _model_inputs(model):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, model.config.in_channels, 2, 32, 32, generator=generator)  # 512 tokens
    text = torch.randn(1, 8, model.config.text_dim, generator=generator)
    return dict(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text)


@pytest.mark.parametrize("method", METHODS)
def test_every_variant_trains_in_a_model(small_model, method):
    model, _ = small_model
    assert apply_variant(model, method) == 4
    chosen = variant_train_choice(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(chosen(name, parameter))
    out = model(**_model_inputs(model), return_dict=False)[0]
    out.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    sla2_names = {name for name in grads if ".processor.sla2." in name}
    base_names = set(grads) - sla2_names
    assert all(grads[name] is not None for name in base_names)
    assert any(grads[name].abs().sum() > 0 for name in base_names if "attn1.to_q" in name)
    expected = {"dense": 0, "sparse_only": 0, "heuristic": 12, "sla_proj": 4, "sla2": 12, "oracle_router": 12,
                "exact_rest": 12, "oracle_exact": 12}
    assert len(sla2_names) == expected[method]
    assert all(grads[name] is not None for name in sla2_names)
    assert not any(name.endswith(("proj_q", "proj_k")) for name in sla2_names)  # routers never train here


def test_saveable_variants_round_trip_and_the_others_are_refused(small_model, tmp_path, capsys):
    model, _ = small_model
    inputs = _model_inputs(model)
    for method in METHODS:
        apply_variant(model, method)
        if method not in SAVEABLE_METHODS:
            with pytest.raises(UserError, match=method):
                check_saveable(model)
            with pytest.raises(UserError, match=method):
                api.save(model, tmp_path / f"never-{method}")
            assert not (tmp_path / f"never-{method}").exists()
            continue
        with torch.no_grad():
            before = model(**inputs, return_dict=False)[0]
        api.save(model, tmp_path / method)
        loaded = api.load(tmp_path / method)
        assert all(type(layer) is SLA2Attention for layer in sla2_layers(loaded).values())
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs, return_dict=False)[0], before, atol=1e-5, rtol=1e-5)


def test_unknown_method_is_a_user_error(small_model):
    model, _ = small_model
    with pytest.raises(UserError, match="sla2, oracle_router"):
        apply_variant(model, "topk")
    with pytest.raises(UserError, match="convert it first"):
        apply_variant(torch.nn.Linear(2, 2), "sla2")


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_variant_on_gpu_matches_its_pytorch_path(method, monkeypatch):
    """On CUDA the variants run the Triton kernels; forward and gradients against the PyTorch path (bf16)."""
    layer = trained_looking_layer(method).cuda()
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, HEADS, 4100, HEAD_DIM, generator=generator).cuda().bfloat16() for _ in range(3))
    grad_out = torch.randn(1, HEADS, 4100, HEAD_DIM, generator=generator).cuda().bfloat16()
    trainable = [p for name, p in layer.named_parameters() if name in trainable_sla2_parameters(layer)]
    for p in trainable:
        p.requires_grad_(True)

    def run() -> tuple[torch.Tensor, ...]:
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = layer(*inputs)
        return (out, *torch.autograd.grad(out, (*inputs, *trainable), grad_out))

    kernels = run()
    monkeypatch.setenv("SLA2_BACKEND", "torch")
    pytorch = run()
    for got, want in zip(kernels, pytorch, strict=True):
        assert ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)).item() < 2e-2
