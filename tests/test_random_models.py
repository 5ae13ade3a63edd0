"""Random-weight models are built where and in the precision they run: parameters and buffers are created
on the target device in the model dtype (the modules diffusers keeps in float32 stay float32), seeded."""

from __future__ import annotations

import pytest
import torch

from sla2cli.bench.model_setup import ModelRequest, prepare_model, run_forward
from sla2cli.integration.conversion import sla2_layers
from sla2cli.sources.random_models import build_random_model, example_inputs, scaled_down_config

WAN = "wan2.1-t2v-1.3b"


def _kept_fp32(model: torch.nn.Module, name: str) -> bool:
    keep = tuple(model._keep_in_fp32_modules or ())
    return any(part in keep for part in name.split("."))


@pytest.mark.parametrize("full_size", [False, True])
def test_every_tensor_is_created_on_the_target_device(full_size):
    """On the meta device nothing is allocated: a tensor found anywhere else was made on the CPU first."""
    model = build_random_model(WAN, torch.bfloat16, "meta", full_size=full_size)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors.values())


def test_parameters_have_the_model_dtype_and_fp32_modules_stay_fp32():
    model = build_random_model(WAN, torch.bfloat16, "cpu", full_size=False)
    kept = {name for name, _ in model.named_parameters() if _kept_fp32(model, name)}
    assert kept and len(kept) < len(list(model.parameters()))
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (torch.float32 if name in kept else torch.bfloat16), name
        assert parameter.device.type == "cpu" and not parameter.requires_grad
    assert all(p.dtype == torch.float32 for p in build_random_model(WAN, full_size=False).parameters())


def test_same_seed_same_weights_other_seed_other_weights():
    first, again, other = (build_random_model(WAN, torch.bfloat16, "cpu", full_size=False, seed=seed)
                           for seed in (3, 3, 4))
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    weights = [name for name, p in first.named_parameters() if p.dim() >= 2 and p.std() > 0]
    assert not torch.equal(first.state_dict()[weights[0]], other.state_dict()[weights[0]])


def test_bf16_model_runs_and_its_output_is_finite():
    model = build_random_model(WAN, torch.bfloat16, "cpu", full_size=False)
    inputs = example_inputs(WAN, (64, 64), 5, config=scaled_down_config(WAN), dtype=torch.bfloat16)
    with torch.no_grad():
        out = run_forward(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and out.abs().max() > 0


def test_bench_random_model_is_built_in_the_requested_dtype():
    request = ModelRequest(model=WAN, resolution="64x64", frames=5, random_weights=True, scaled_down=True,
                           sparsity=0.5, dtype=torch.bfloat16, device=torch.device("cpu"), seed=1)
    bench = prepare_model(request)
    layers = sla2_layers(bench.model)
    sla2_parameters = {id(p) for layer in layers.values() for p in layer.parameters()}
    for name, parameter in bench.model.named_parameters():
        if id(parameter) in sla2_parameters or _kept_fp32(bench.model, name):
            assert parameter.dtype == torch.float32, name  # SLA2's own and diffusers' fp32 modules
        else:
            assert parameter.dtype == torch.bfloat16, name
    again = prepare_model(request)
    assert all(torch.equal(a, b) for a, b in zip(bench.model.state_dict().values(),
                                                 again.model.state_dict().values(), strict=True))
    with torch.no_grad():
        assert torch.isfinite(run_forward(bench.model, bench.inputs)).all()
