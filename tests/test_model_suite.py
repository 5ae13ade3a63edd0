"""benchmarks/model_suite.py: the steps it times and the attention-free bound, on a scaled-down model (CPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import sla2cli
from sla2cli.module import SLA2Attention
from sla2cli.sources.random_models import build_random_model, example_inputs

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("model_suite", ROOT / "benchmarks" / "model_suite.py")
suite = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(suite)


def _model_and_inputs():
    torch.manual_seed(0)
    model = build_random_model("wan2.1-t2v-1.3b", full_size=False)
    inputs = example_inputs("wan2.1-t2v-1.3b", (64, 64), frames=5, config=model.config)
    return model, inputs


def test_skipping_self_attention_keeps_the_rest_of_the_model_running(monkeypatch):
    """Every SLA2 layer returns v instead of attending (the output changes; each layer is called once per
    forward with its values); both steps run around it and gradients still reach the value and output projections."""
    monkeypatch.setenv("SLA2_BACKEND", "torch")
    model, inputs = _model_and_inputs()
    model.requires_grad_(True)
    grad_out = torch.randn_like(inputs["hidden_states"])
    sla2cli.convert(model, sparsity=0.5)
    attended = suite.step(model, inputs, suite.FORWARD, grad_out)()
    assert suite.skip_self_attention(model) == 2
    skipped = suite.step(model, inputs, suite.FORWARD, grad_out)()
    assert not torch.allclose(attended, skipped)
    calls = []
    for layer in (m for m in model.modules() if isinstance(m, SLA2Attention)):
        layer.attend = lambda q, k, v: calls.append(v.shape) or v
    assert torch.equal(suite.step(model, inputs, suite.FORWARD, grad_out)(), skipped) and len(calls) == 2
    suite.step(model, inputs, suite.FORWARD_BACKWARD, grad_out)()
    around = [p for name, p in model.named_parameters() if "attn1.to_v" in name or "attn1.to_out" in name]
    assert around and all(p.grad is not None for p in around)


def test_forward_step_keeps_no_graph():
    model, inputs = _model_and_inputs()
    model.requires_grad_(True)
    out = suite.step(model, inputs, suite.FORWARD, torch.zeros(()))()
    assert not out.requires_grad
