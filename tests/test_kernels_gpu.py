"""bf16 checks of the Triton path on a real GPU (skipped without CUDA).

Same oracle as the CPU tests, at the lengths video models use. bf16 carries ~3 significant digits,
so the bound is 2e-2 relative L2 for outputs and gradients.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import force_tensor_descriptors, random_alpha, random_qkv, rel_l2

from sla2cli.ops import num_blocks, sla2_attention, sla2_attention_bshd, sla2_reference

pytestmark = pytest.mark.gpu
BF16_TOLERANCE = 2e-2


def _compare(batch, heads, length, head_dim, sparsity, seed, block_q=128, block_k=64):
    q, k, v = random_qkv(batch, heads, length, head_dim, torch.bfloat16, seed, device="cuda")
    alpha = random_alpha(batch, heads, num_blocks(length, block_q), seed, device="cuda")
    blocks = dict(block_q=block_q, block_k=block_k)
    out = sla2_attention(q, k, v, sparsity=sparsity, alpha=alpha, **blocks)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, alpha), grad)
    expected = sla2_reference(q, k, v, sparsity=sparsity, alpha=alpha, **blocks)
    expected_grads = torch.autograd.grad(expected, (q, k, v, alpha), grad, allow_unused=True)
    errors = [rel_l2(a.float(), e.float() if e is not None else None)
              for a, e in zip((out, *grads), (expected, *expected_grads), strict=True)]
    print(f"L={length} D={head_dim} s={sparsity} blocks={block_q}x{block_k} errors(out,dq,dk,dv,dalpha)=" +
          ",".join(f"{e:.2e}" for e in errors))
    assert max(errors) <= BF16_TOLERANCE, errors


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.97])
def test_bf16_matches_reference_4096(head_dim, sparsity):
    _compare(2, 2, 4096, head_dim, sparsity, seed=11)


@pytest.mark.parametrize("sparsity", [0.9, 0.97])
def test_bf16_matches_reference_32760(sparsity):
    _compare(1, 1, 32760, 128, sparsity, seed=12)


@pytest.mark.parametrize("sparsity", [0.9, 0.97])
def test_bf16_matches_reference_in_the_embedded_models_small_blocks(sparsity):
    # The embedded recipe's 32 x 16 blocks at its clip length (8192 tokens) and head dim, plus a partial block.
    _compare(2, 2, 8192, 64, sparsity, seed=13, block_q=32, block_k=16)
    _compare(1, 2, 4001, 64, sparsity, seed=14, block_q=32, block_k=16)


def test_bf16_unaligned_key_block_count():
    # 157 key blocks: the states are stored for 160 (sla2_kernels.numerics.stored_state_blocks).
    _compare(1, 2, 10000, 128, 0.9, seed=15)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_blocks_through_tensor_descriptors(monkeypatch, head_dim):
    """Every kernel gathering its blocks of rows through tensor descriptors (TMA), Launch.tma."""
    force_tensor_descriptors(monkeypatch, head_dim)
    _compare(2, 2, 4096, head_dim, 0.9, seed=16)
    _compare(1, 1, 32760, head_dim, 0.97, seed=17)
    _compare(1, 2, 10000, head_dim, 0.97, seed=18)


def test_bshd_layout_without_copies():
    q, k, v = random_qkv(1, 4, 3000, 128, torch.bfloat16, 3, device="cuda")
    q_bshd, k_bshd, v_bshd = (t.detach().transpose(1, 2).contiguous() for t in (q, k, v))
    out = sla2_attention_bshd(q_bshd, k_bshd, v_bshd, sparsity=0.9)
    assert out.is_contiguous()
    expected = sla2_reference(q.detach(), k.detach(), v.detach(), sparsity=0.9).transpose(1, 2)
    assert rel_l2(out.float(), expected.float()) <= BF16_TOLERANCE


class _AttentionBlock(torch.nn.Module):
    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)
        self.alpha_logit = torch.nn.Parameter(torch.zeros(heads, 1))
        self.heads, self.head_dim = heads, head_dim

    def forward(self, x):
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).unbind(2)
        alpha = torch.sigmoid(self.alpha_logit)
        return sla2_attention_bshd(q, k, v, sparsity=0.9, alpha=alpha).flatten(2)


def test_torch_compile_fullgraph_forward_backward():
    block = _AttentionBlock(4, 64).cuda().to(torch.bfloat16)
    x = torch.randn(1, 2048, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    out.float().square().mean().backward()
    eager = block(x.detach())
    assert rel_l2(out.float(), eager.float()) <= 1e-2
    assert block.alpha_logit.grad is not None and x.grad is not None


def test_one_compiled_kernel_per_configuration():
    from sla2_kernels.forward import _sla2_forward_kernel

    def variants() -> int:
        return sum(len(cache[0]) for cache in _sla2_forward_kernel.device_caches.values())

    q, k, v = random_qkv(1, 2, 4096, 64, torch.float16, 5, requires_grad=False, device="cuda")
    alpha = torch.full((1, 2, 32), 0.5, device="cuda")
    sla2_attention(q, k, v, sparsity=0.9, alpha=alpha)
    before = variants()
    for length, sparsity in ((4000, 0.9), (3333, 0.97), (2049, 0.5), (777, 0.95)):
        q, k, v = random_qkv(1, 2, length, 64, torch.float16, 6, requires_grad=False, device="cuda")
        alpha = torch.full((1, 2, num_blocks(length, 128)), 0.5, device="cuda")
        sla2_attention(q, k, v, sparsity=sparsity, alpha=alpha)
    assert variants() == before
