"""Report metrics against brute-force computations with a full L x L probability matrix."""

from __future__ import annotations

import math

import pytest
import torch

from sla2cli.flops import dense_attention_flops, sla2_head_flops
from sla2cli.ops import k_selected, route, sla2_reference
from sla2cli.ops.geometry import num_blocks
from sla2cli.report import metrics

BLOCK_Q, BLOCK_K = 128, 64


def _qkv(length: int, heads: int = 2, batch: int = 1, head_dim: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, length, head_dim)
    q = torch.randn(shape, generator=generator) * 1.5
    k = torch.randn(shape, generator=generator) * 1.5 + 0.3
    v = torch.randn(shape, generator=generator)
    return q, k, v


def _full_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    qd, kd = q.double(), k.double()
    return torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def _brute_block_mass(probs: torch.Tensor, length: int) -> torch.Tensor:
    batch, heads = probs.shape[:2]
    t_m, t_n = num_blocks(length, BLOCK_Q), num_blocks(length, BLOCK_K)
    out = torch.zeros(batch, heads, t_m, t_n, dtype=torch.float64)
    for i in range(t_m):
        rows = probs[:, :, i * BLOCK_Q : min(length, (i + 1) * BLOCK_Q)]
        for j in range(t_n):
            out[:, :, i, j] = rows[..., j * BLOCK_K : min(length, (j + 1) * BLOCK_K)].sum(-1).mean(-1)
    return out


def _selected_sets(lut: torch.Tensor) -> list:
    return [[[set(row.tolist()) for row in head] for head in batch] for batch in lut]


@pytest.mark.parametrize("length", [64, 300, 517])
@pytest.mark.parametrize("chunk_elements", [1, 1 << 12, 1 << 30])
def test_dense_attention_and_block_mass_match_brute_force(length, chunk_elements):
    q, k, v = _qkv(length, heads=3, batch=2)
    dense = metrics.dense_attention_with_block_mass(
        q, k, v, block_q=BLOCK_Q, block_k=BLOCK_K, max_chunk_elements=chunk_elements
    )
    probs = _full_probs(q, k)
    torch.testing.assert_close(dense.output.double(), probs @ v.double(), atol=1e-5, rtol=1e-4)
    expected_mass = _brute_block_mass(probs, length)
    torch.testing.assert_close(dense.block_mass.double(), expected_mass, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dense.block_mass.sum(-1), torch.ones_like(dense.block_mass.sum(-1)))


def test_dense_scan_never_builds_the_full_matrix(monkeypatch):
    length, budget = 1000, 1 << 15
    q, k, v = _qkv(length, heads=2)
    pairs = []
    real_attention = torch.nn.functional.scaled_dot_product_attention

    def recording_attention(query, key, value):
        pairs.append(query.shape[:-1].numel() * key.shape[-2])
        return real_attention(query, key, value)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_attention)
    monkeypatch.setattr(torch, "softmax", None)  # no other route to full probabilities
    dense = metrics.dense_attention_with_block_mass(
        q, k, v, block_q=BLOCK_Q, block_k=BLOCK_K, max_chunk_elements=budget
    )
    assert pairs and max(pairs) <= max(budget, BLOCK_Q * length)
    assert max(pairs) < length * length
    monkeypatch.undo()
    torch.testing.assert_close(dense.output.double(), _full_probs(q, k) @ v.double(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_captured_mass_and_recall_match_brute_force(sparsity):
    length = 700
    q, k, v = _qkv(length, heads=2, batch=2, seed=3)
    routing = route(q, k, sparsity=sparsity)
    mass = _brute_block_mass(_full_probs(q, k), length)
    captured = metrics.captured_mass(mass, routing.lut)
    recall = metrics.router_recall(mass, routing.lut)
    selected = _selected_sets(routing.lut)
    for b in range(2):
        for h in range(2):
            for i in range(mass.shape[2]):
                row = mass[b, h, i].tolist()
                chosen = selected[b][h][i]
                assert captured[b, h, i].item() == pytest.approx(sum(row[j] for j in chosen), abs=1e-9)
                oracle = sorted(range(len(row)), key=lambda j: -row[j])[: routing.k_sel]
                expected = len(chosen.intersection(oracle)) / routing.k_sel
                assert recall[b, h, i].item() == pytest.approx(expected)


def test_recall_is_one_for_the_oracle_and_zero_for_its_complement():
    mass = torch.softmax(torch.randn(1, 1, 3, 10, dtype=torch.float64), dim=-1)
    best = mass.topk(4, dim=-1).indices.sort(-1).values.int()
    worst = mass.topk(4, dim=-1, largest=False).indices.sort(-1).values.int()
    assert torch.all(metrics.router_recall(mass, best) == 1)
    assert torch.all(metrics.router_recall(mass, worst) == 0)


@pytest.mark.parametrize("length", [256, 333])
def test_achieved_sparsity_counts_real_token_pairs(length):
    q, k, _ = _qkv(length, heads=2, seed=5)
    routing = route(q, k, sparsity=0.6)
    dense_mask = torch.zeros(1, 2, length, length, dtype=torch.bool)
    for h in range(2):
        for i, row in enumerate(routing.lut[0, h].tolist()):
            for j in row:
                dense_mask[0, h, i * BLOCK_Q : (i + 1) * BLOCK_Q, j * BLOCK_K : (j + 1) * BLOCK_K] = True
    expected = 1.0 - dense_mask.flatten(2).double().mean(-1)
    got = metrics.achieved_sparsity(routing.lut, length, BLOCK_Q, BLOCK_K)
    torch.testing.assert_close(got, expected)


def test_flop_count_exact_branch_and_ordering():
    length, head_dim = 4096, 128
    pairs_full = torch.tensor(float(length * length), dtype=torch.float64)
    num_k = num_blocks(length, BLOCK_K)
    dense = dense_attention_flops(length, head_dim)
    all_selected = sla2_head_flops(pairs_full, length, head_dim, num_k, BLOCK_Q, BLOCK_K)
    assert all_selected.item() > dense  # the router costs something, and nothing is skipped
    reductions = []
    for sparsity in (0.5, 0.9, 0.97):
        k_sel = k_selected(num_k, sparsity)
        pairs = torch.tensor(float(k_sel * BLOCK_K * length), dtype=torch.float64)
        flops = sla2_head_flops(pairs, length, head_dim, k_sel, BLOCK_Q, BLOCK_K)
        assert flops.item() > 4.0 * pairs.item() * head_dim  # exact branch plus router plus linear branch
        reductions.append(dense / flops.item())
    assert reductions == sorted(reductions)
    assert reductions[-1] < 1.0 / (1.0 - 0.97)  # overheads keep it below the FLOP share of the exact branch


def test_error_and_cosine_match_definitions():
    generator = torch.Generator().manual_seed(1)
    exact = torch.randn(2, 3, 50, 64, generator=generator, dtype=torch.float64)
    approx = exact + 0.1 * torch.randn(2, 3, 50, 64, generator=generator, dtype=torch.float64)
    rel = metrics.relative_l2_error(approx, exact)
    cos = metrics.cosine_similarity(approx, exact)
    for b in range(2):
        for h in range(3):
            a, e = approx[b, h].flatten(), exact[b, h].flatten()
            assert rel[b, h].item() == pytest.approx(((a - e) ** 2).sum().sqrt().item() / e.norm().item())
            assert cos[b, h].item() == pytest.approx((a @ e).item() / (a.norm() * e.norm()).item())


def test_pearson_matches_numpy_and_flags_constant_inputs():
    np = pytest.importorskip("numpy")
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(4, 9, generator=generator, dtype=torch.float64)
    y = 0.5 * x + 0.2 * torch.rand(4, 9, generator=generator, dtype=torch.float64)
    got = metrics.pearson_correlation(x, y)
    for row in range(4):
        assert got[row].item() == pytest.approx(np.corrcoef(x[row].numpy(), y[row].numpy())[0, 1])
    constant = metrics.pearson_correlation(torch.ones(2, 5, dtype=torch.float64), y[:2, :5])
    assert torch.isnan(constant).all()


def _mass_share_alpha(routing, length):
    """A length-independent alpha: router-softmax mass of the selected blocks (any function will do)."""
    router_probs = torch.softmax(routing.scores, dim=-1)
    return router_probs.gather(-1, routing.lut.long()).sum(-1).clamp(0.05, 1.0)


@pytest.mark.parametrize("length", [384, 450])
def test_attention_metrics_match_brute_force(length):
    q, k, v = _qkv(length, heads=2, batch=2, seed=7)
    generator = torch.Generator().manual_seed(11)
    eye = torch.eye(64)
    proj_q = eye + 0.6 * torch.randn(64, 64, generator=generator)
    proj_k = eye + 0.6 * torch.randn(64, 64, generator=generator)
    sparsity = 0.6
    got = metrics.attention_metrics(
        q, k, v, sparsity=sparsity, proj_q=proj_q, proj_k=proj_k, alpha_fn=_mass_share_alpha,
        block_q=BLOCK_Q, block_k=BLOCK_K, max_chunk_elements=1 << 14,
    )
    assert list(got) == [name for name in metrics.METRIC_NAMES if name != "lowbit_rel_l2_vs_sla2"]

    probs = _full_probs(q, k)
    exact = probs @ v.double()
    mass = _brute_block_mass(probs, length)
    routing = route(q, k, sparsity=sparsity, proj_q=proj_q, proj_k=proj_k)
    heuristic = route(q, k, sparsity=sparsity)
    assert not torch.equal(routing.lut, heuristic.lut)  # the two routers really differ here
    alpha = _mass_share_alpha(routing, length)
    sla2 = sla2_reference(q, k, v, sparsity=sparsity, alpha=alpha, proj_q=proj_q, proj_k=proj_k).double()
    baseline = sla2_reference(q, k, v, sparsity=sparsity, alpha=_mass_share_alpha(heuristic, length)).double()
    np = pytest.importorskip("numpy")
    for b in range(2):
        for h in range(2):
            sel = _selected_sets(routing.lut)[b][h]
            per_block = [sum(mass[b, h, i, j].item() for j in sel[i]) for i in range(len(sel))]
            heuristic_sel = _selected_sets(heuristic.lut)[b][h]
            oracle = mass[b, h].topk(routing.k_sel, dim=-1).indices.tolist()
            recall = [len(sel[i].intersection(oracle[i])) / routing.k_sel for i in range(len(sel))]
            selected_pairs = sum(
                min(BLOCK_Q, length - i * BLOCK_Q) * min(BLOCK_K, length - j * BLOCK_K)
                for i in range(len(sel)) for j in sel[i]
            )
            heuristic_mass = [sum(mass[b, h, i, j].item() for j in heuristic_sel[i]) for i in range(len(sel))]
            alphas = alpha[b, h].double().tolist()
            diff = (sla2[b, h] - exact[b, h]).norm() / exact[b, h].norm()
            base_diff = (baseline[b, h] - exact[b, h]).norm() / exact[b, h].norm()
            cos = (sla2[b, h].flatten() @ exact[b, h].flatten()) / (sla2[b, h].norm() * exact[b, h].norm())
            expected = {
                "sparsity": 1.0 - selected_pairs / length**2,
                "router_recall": sum(recall) / len(recall),
                "k_sel": k_selected(num_blocks(length, BLOCK_K), sparsity),
                "key_blocks": num_blocks(length, BLOCK_K),
                "requested_sparsity": sparsity,
                "effective_sparsity": 1.0 - len(sel[0]) / num_blocks(length, BLOCK_K),  # whole blocks
                "captured_mass": sum(per_block) / len(per_block),
                "captured_mass_min": min(per_block),
                "alpha_mean": sum(alphas) / len(alphas),
                "alpha_min": min(alphas),
                "alpha_max": max(alphas),
                "alpha_mass_corr": np.corrcoef(alphas, per_block)[0, 1],
                "alpha_mass_gap": sum(abs(a - m) for a, m in zip(alphas, per_block, strict=True)) / len(sel),
                "rel_l2_error": diff.item(),
                "cosine": cos.item(),
                "heuristic_captured_mass": sum(heuristic_mass) / len(heuristic_mass),
                "heuristic_rel_l2_error": base_diff.item(),
            }
            for name, value in expected.items():
                assert got[name][b, h].item() == pytest.approx(value, rel=2e-4, abs=2e-5), name


def test_identity_router_makes_heuristic_columns_equal():
    q, k, v = _qkv(300, seed=9)
    eye = torch.eye(64)
    got = metrics.attention_metrics(
        q, k, v, sparsity=0.7, proj_q=eye, proj_k=eye, alpha_fn=_mass_share_alpha,
        block_q=BLOCK_Q, block_k=BLOCK_K,
    )
    torch.testing.assert_close(got["rel_l2_error"], got["heuristic_rel_l2_error"])
    torch.testing.assert_close(got["captured_mass"], got["heuristic_captured_mass"])
    torch.testing.assert_close(got["router_recall"], got["heuristic_router_recall"])


def test_full_selection_is_exact_attention():
    q, k, v = _qkv(256, seed=4)
    got = metrics.attention_metrics(
        q, k, v, sparsity=0.0, proj_q=None, proj_k=None, alpha_fn=lambda routing, length: None,
        block_q=BLOCK_Q, block_k=BLOCK_K,
    )
    assert torch.all(got["sparsity"] == 0)
    torch.testing.assert_close(got["captured_mass"], torch.ones_like(got["captured_mass"]))
    torch.testing.assert_close(got["router_recall"], torch.ones_like(got["router_recall"]))
    assert torch.all(got["rel_l2_error"] < 1e-5)
    assert torch.all(got["flop_reduction"] < 1)


def test_metrics_of_a_trained_looking_sla2_layer():
    """A real SLA2Attention with non-identity router and alpha parameters, its own output passed in."""
    from sla2cli.module import SLA2Attention

    length, sparsity = 400, 0.7
    layer = SLA2Attention(2, 64, sparsity=sparsity)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.proj_q.add_(0.4 * torch.randn(64, 64, generator=generator))
        layer.proj_k.add_(0.4 * torch.randn(64, 64, generator=generator))
        layer.alpha_weight.copy_(torch.tensor([0.8, 1.3]))
        layer.alpha_bias.copy_(torch.tensor([0.2, -0.1]))
    q, k, v = _qkv(length, heads=2, seed=12)
    got = metrics.attention_metrics(
        q, k, v, sparsity=sparsity, proj_q=layer.proj_q.detach(), proj_k=layer.proj_k.detach(),
        alpha_fn=layer.predict_alpha, block_q=BLOCK_Q, block_k=BLOCK_K, output=layer(q, k, v),
    )
    routing = route(q, k, sparsity=sparsity, proj_q=layer.proj_q.detach(), proj_k=layer.proj_k.detach())
    alpha = layer.predict_alpha(routing, length).detach()
    reference = sla2_reference(
        q, k, v, sparsity=sparsity, alpha=alpha, proj_q=layer.proj_q.detach(), proj_k=layer.proj_k.detach()
    ).double()
    exact = _full_probs(q, k) @ v.double()
    for h in range(2):
        error = ((reference[0, h] - exact[0, h]).norm() / exact[0, h].norm()).item()
        assert got["rel_l2_error"][0, h].item() == pytest.approx(error, rel=1e-4)
        assert got["alpha_mean"][0, h].item() == pytest.approx(alpha[0, h].double().mean().item(), rel=1e-6)
        assert got["alpha_max"][0, h].item() == pytest.approx(alpha[0, h].max().item(), rel=1e-6)
    baseline = sla2_reference(
        q, k, v, sparsity=sparsity, alpha=layer.predict_alpha(route(q, k, sparsity=sparsity), length).detach()
    ).double()
    for h in range(2):
        error = ((baseline[0, h] - exact[0, h]).norm() / exact[0, h].norm()).item()
        assert got["heuristic_rel_l2_error"][0, h].item() == pytest.approx(error, rel=1e-4)


@pytest.mark.parametrize(
    ("layer_quant", "extra_calls"), [("none", 1), ("int8-fp8", 1), ("int8", 2)]
)
def test_lowbit_error_matches_brute_force_at_one_extra_call(monkeypatch, layer_quant, extra_calls):
    """lowbit_rel_l2_vs_sla2 = ||O(int8-fp8) - O(none)|| / ||O(none)|| per head, same routing and alpha."""
    from sla2cli.module import SLA2Attention
    from sla2cli.ops.quantization import sla2_lowbit_reference

    length, sparsity = 450, 0.6
    layer = SLA2Attention(2, 64, sparsity=sparsity, quant=layer_quant)
    with torch.no_grad():
        layer.alpha_bias.copy_(torch.tensor([0.3, -0.2]))
    q, k, v = _qkv(length, heads=2, batch=2, seed=13)
    output = layer(q, k, v).detach()
    calls = []
    original = metrics.sla2_attention_routed
    monkeypatch.setattr(
        metrics, "sla2_attention_routed", lambda *a, **kw: calls.append(kw["quant"]) or original(*a, **kw)
    )

    def run(lowbit):
        calls.clear()
        got = metrics.attention_metrics(
            q, k, v, sparsity=sparsity, proj_q=layer.proj_q.detach(), proj_k=layer.proj_k.detach(),
            alpha_fn=layer.predict_alpha, block_q=BLOCK_Q, block_k=BLOCK_K, output=output,
            quant=layer_quant, lowbit_quant=lowbit,
        )
        return got, list(calls)

    without, base_calls = run(None)
    assert "lowbit_rel_l2_vs_sla2" not in without and base_calls == []
    assert "lowbit_rel_l2_vs_sla2" not in run("none")[0]
    got, lowbit_calls = run("int8-fp8")
    assert len(lowbit_calls) == extra_calls and layer_quant not in lowbit_calls
    torch.testing.assert_close(got["rel_l2_error"], without["rel_l2_error"])

    routing = route(q, k, sparsity=sparsity)
    alpha = layer.predict_alpha(routing, length).detach()
    lowbit = sla2_lowbit_reference(q, k, v, routing.lut, mode="int8-fp8", alpha=alpha).double()
    exact = sla2_reference(q, k, v, sparsity=sparsity, alpha=alpha).double()
    for b in range(2):
        for h in range(2):
            expected = ((lowbit[b, h] - exact[b, h]).norm() / exact[b, h].norm()).item()
            assert expected > 1e-4  # the low-bit forward really differs
            assert got["lowbit_rel_l2_vs_sla2"][b, h].item() == pytest.approx(expected, rel=1e-3, abs=1e-6)
