"""The oracle against a brute-force, row-by-row reading of docs/method.md, sections 1-5 (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import rel_l2

from sla2cli.ops import k_selected, sla2_reference


def brute_force_sla2(q, k, v, sparsity, alpha, proj_q, proj_k, block_q=128, block_k=64):
    """Loops over heads, query blocks and rows; no masks, no vectorised routing."""
    batch, heads, length, head_dim = q.shape
    num_q_blocks, num_k_blocks = math.ceil(length / block_q), math.ceil(length / block_k)
    k_sel = max(1, math.floor((1 - sparsity) * num_k_blocks + 1e-9))
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            qh, kh, vh = q[b, h], k[b, h], v[b, h]
            k_smooth = kh - kh.mean(dim=0)
            k_pooled = torch.stack([k_smooth[j * block_k:(j + 1) * block_k].mean(0) for j in range(num_k_blocks)])
            for i in range(num_q_blocks):
                rows = range(i * block_q, min(length, (i + 1) * block_q))
                q_pooled = qh[i * block_q:(i + 1) * block_q].mean(0)
                scores = ((q_pooled @ proj_q) @ (k_pooled @ proj_k).T) / math.sqrt(head_dim)
                chosen = set(scores.topk(k_sel).indices.tolist())
                selected = [c for c in range(length) if c // block_k in chosen]
                others = [c for c in range(length) if c // block_k not in chosen]
                mix = alpha[b, h, i] if alpha is not None else 1.0
                for r in rows:
                    logits = kh[selected] @ qh[r] / math.sqrt(head_dim)
                    sparse = torch.softmax(logits, 0) @ vh[selected]
                    if not others:
                        out[b, h, r] = sparse
                        continue
                    phi_q = torch.softmax(qh[r], 0)
                    phi_k = torch.softmax(kh[others], dim=-1)
                    weights = phi_k @ phi_q
                    linear = (weights @ vh[others]) / (weights.sum() + 1e-6)
                    out[b, h, r] = mix * sparse + (1 - mix) * linear
    return out


@pytest.mark.parametrize("length,sparsity", [(1, 0.5), (130, 0.0), (200, 0.5), (333, 0.8)])
def test_reference_matches_brute_force(length, sparsity):
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 2, length, 64, generator=generator, dtype=torch.float64) for _ in range(3))
    num_q_blocks = math.ceil(length / 128)
    alpha = torch.rand(2, 2, num_q_blocks, generator=generator, dtype=torch.float64)
    proj_q = torch.eye(64, dtype=torch.float64) + 0.1 * torch.randn(64, 64, generator=generator, dtype=torch.float64)
    proj_k = torch.eye(64, dtype=torch.float64) + 0.1 * torch.randn(64, 64, generator=generator, dtype=torch.float64)
    expected = brute_force_sla2(q, k, v, sparsity, alpha, proj_q, proj_k)
    actual = sla2_reference(q, k, v, sparsity=sparsity, alpha=alpha, proj_q=proj_q, proj_k=proj_k)
    assert rel_l2(actual, expected) < 1e-10


def test_sparsity_zero_is_dense_attention():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 300, 128, generator=generator) for _ in range(3))
    alpha = torch.rand(1, 3, 3, generator=generator)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_l2(sla2_reference(q, k, v, sparsity=0.0, alpha=alpha), expected) < 1e-6


@pytest.mark.parametrize("num_blocks,sparsity,expected", [(512, 0.97, 15), (512, 0.95, 25), (16, 0.97, 1),
                                                           (4, 0.5, 2), (7, 0.0, 7), (1, 0.99, 1)])
def test_k_selected(num_blocks, sparsity, expected):
    assert k_selected(num_blocks, sparsity) == expected
