"""The routing kernels (Triton, through the interpreter on CPU) against PyTorch's routing, the reference.

Same look-up tables and scores within float32 rounding, on random inputs at odd lengths, partial blocks,
batch > 1, both head dims, both block geometries, with and without the router's projections; exactly
k_sel distinct ascending blocks per row even when scores tie or are NaN.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_cases import random_qkv

from sla2_kernels import routes_in_kernel, select_top_blocks
from sla2_kernels.routing import MAX_KERNEL_KEY_BLOCKS, RouteLaunch
from sla2cli.ops import Routing, num_blocks, route
from sla2cli.ops.geometry import k_selected

LENGTHS = (1, 63, 64, 65, 200, 1000)
SPARSITIES = (0.0, 0.5, 0.9, 0.97)
BLOCKS = ((128, 64), (32, 16))


def _route_both(monkeypatch, q, k, **kwargs):
    monkeypatch.setenv("SLA2_BACKEND", "triton")
    kernel = route(q, k, **kwargs)
    monkeypatch.setenv("SLA2_BACKEND", "torch")
    return kernel, route(q, k, **kwargs)


def _projections(kind: str, head_dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    pair = [torch.eye(head_dim) + 0.3 * torch.randn(head_dim, head_dim, generator=generator) for _ in range(2)]
    return {"none": (None, None), "q": (pair[0], None), "k": (None, pair[1]), "both": tuple(pair)}[kind]


def _cases():
    cases = []
    for index, (length, head_dim, sparsity) in enumerate(itertools.product(LENGTHS, (64, 128), SPARSITIES)):
        batch, heads = ((2, 3), (1, 2), (2, 1))[index % 3]
        blocks = BLOCKS[index % 2]
        projection = ("none", "both", "q", "k")[index % 4]
        cases.append(pytest.param(batch, heads, length, head_dim, sparsity, blocks, projection,
                                  id=f"B{batch}H{heads}L{length}D{head_dim}s{sparsity}-{blocks[0]}x{blocks[1]}-{projection}"))
    return cases


@pytest.mark.parametrize("batch,heads,length,head_dim,sparsity,blocks,projection", _cases())
def test_kernel_routing_matches_pytorch(monkeypatch, batch, heads, length, head_dim, sparsity, blocks, projection):
    seed = length + head_dim + int(100 * sparsity)
    q, k, _ = random_qkv(batch, heads, length, head_dim, torch.float32, seed, requires_grad=False)
    k = k + 0.7  # a sequence mean far from zero: the smoothing term matters
    proj_q, proj_k = _projections(projection, head_dim, seed)
    kernel, expected = _route_both(monkeypatch, q, k, sparsity=sparsity, proj_q=proj_q, proj_k=proj_k,
                                   block_q=blocks[0], block_k=blocks[1])
    assert routes_in_kernel(num_blocks(length, blocks[1])), "the case must reach the kernel"
    assert kernel.k_sel == expected.k_sel
    assert kernel.lut.dtype == torch.int32 and kernel.lut.shape == expected.lut.shape
    assert torch.equal(kernel.lut, expected.lut)
    scale = expected.scores.abs().max().clamp_min(1e-6)
    assert ((kernel.scores - expected.scores).abs().max() / scale).item() <= 1e-5


def test_strided_inputs_route_like_contiguous_ones(monkeypatch):
    q, k, _ = random_qkv(2, 3, 300, 64, torch.float32, 5, requires_grad=False)
    strided_q, strided_k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    kernel, expected = _route_both(monkeypatch, strided_q, strided_k, sparsity=0.9, block_q=32, block_k=16)
    assert torch.equal(kernel.lut, expected.lut)


def _assert_valid_table(lut: torch.Tensor, k_sel: int, num_k_blocks: int) -> None:
    assert lut.shape[-1] == k_sel
    assert bool((lut >= 0).all()) and bool((lut < num_k_blocks).all())
    assert bool((lut[..., 1:] > lut[..., :-1]).all()), "ascending and distinct"


def test_equal_scores_take_the_lowest_blocks(monkeypatch):
    """Constant keys give every key block the same score: the first k_sel blocks, each once."""
    monkeypatch.setenv("SLA2_BACKEND", "triton")
    length = 1000
    q = torch.randn(1, 2, length, 64, generator=torch.Generator().manual_seed(3))
    k = torch.ones(1, 2, length, 64)
    routing = route(q, k, sparsity=0.75, block_q=32, block_k=16)
    num_k_blocks = num_blocks(length, 16)
    _assert_valid_table(routing.lut, k_selected(num_k_blocks, 0.75), num_k_blocks)
    assert torch.equal(routing.lut[0, 0, 0], torch.arange(routing.k_sel, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_routing_under_autocast_is_the_float32_routing(monkeypatch, backend):
    """Fine-tuning runs the model under bf16 autocast: routing keeps its float32 products there (the route
    kernel once got a bf16 W = W_q W_k^T from an autocast matmul and failed to compile)."""
    monkeypatch.setenv("SLA2_BACKEND", backend)
    q, k, _ = random_qkv(1, 2, 200, 64, torch.bfloat16, 9, requires_grad=False)
    proj_q, proj_k = _projections("both", 64, 9)
    kwargs = dict(sparsity=0.9, proj_q=proj_q, proj_k=proj_k, block_q=32, block_k=16)
    expected = route(q, k, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = route(q, k, **kwargs)
    assert routed.scores.dtype == torch.float32
    assert torch.equal(routed.lut, expected.lut) and torch.equal(routed.scores, expected.scores)


@pytest.mark.gpu
def test_gpu_routing_under_autocast_with_projections(monkeypatch):
    """The same on the GPU at the embedded model's geometry, through the routing kernels."""
    generator = torch.Generator(device="cuda").manual_seed(4)
    q, k = (torch.randn(1, 4, 8192, 128, device="cuda", generator=generator).to(torch.bfloat16) for _ in range(2))
    proj_q, proj_k = (p.cuda() for p in _projections("both", 128, 4))
    kwargs = dict(sparsity=0.97, proj_q=proj_q, proj_k=proj_k, block_q=32, block_k=16)
    expected = route(q, k, **kwargs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        routed = route(q, k, **kwargs)
    assert routed.scores.dtype == torch.float32 and torch.equal(routed.lut, expected.lut)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN
def test_nan_scores_still_give_a_valid_table(monkeypatch):
    """NaN inputs must not send the attention kernels outside the key blocks."""
    monkeypatch.setenv("SLA2_BACKEND", "triton")
    q, k, _ = random_qkv(1, 2, 500, 64, torch.float32, 8, requires_grad=False)
    k[0, 0, 100:130] = float("nan")
    q[0, 1, :40] = float("inf")
    routing = route(q, k, sparsity=0.9, block_q=32, block_k=16)
    _assert_valid_table(routing.lut, routing.k_sel, num_blocks(500, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("heads,length,sparsity", [(12, 32760, 0.97), (4, 75600, 0.97), (2, 8192, 0.9)])
def test_gpu_routing_matches_pytorch_at_video_lengths(monkeypatch, heads, length, sparsity):
    """bf16 inputs on the GPU: same scores within float32 rounding; a row may differ from PyTorch's only
    where its k_sel-th and next scores are that close (the kernel's scores come from other float32 sums)."""
    generator = torch.Generator(device="cuda").manual_seed(length)
    q, k = (torch.randn(1, heads, length, 128, device="cuda", generator=generator).to(torch.bfloat16)
            for _ in range(2))
    from sla2_kernels.routing import route_blocks

    monkeypatch.setenv("SLA2_BACKEND", "torch")
    expected = route(q, k + 0.5, sparsity=sparsity)
    scores, lut = route_blocks(q, k + 0.5, None, 128, 64, expected.k_sel)  # also where route() skips it
    kernel = Routing(scores=scores, lut=lut, k_sel=expected.k_sel)
    spread = expected.scores.amax(-1, keepdim=True) - expected.scores.amin(-1, keepdim=True)
    assert ((kernel.scores - expected.scores).abs() / spread).max().item() <= 1e-5
    _assert_valid_table(kernel.lut, expected.k_sel, expected.scores.shape[-1])
    differs = (kernel.lut != expected.lut).any(-1)
    assert differs.float().mean().item() <= 1e-3
    kth = expected.scores.topk(expected.k_sel, dim=-1).values[..., -1:]
    taken = expected.scores.gather(-1, kernel.lut.long())
    assert bool((taken >= kth - 1e-5 * spread).all())


@pytest.mark.parametrize("rows,select_elements,select_warps", [(16, 4096, 4), (32, 128, 1), (16, 16384, 8)])
def test_launch_settings_route_alike(monkeypatch, rows, select_elements, select_warps):
    """Other launch settings (more rows per score program, one or many rows per select program) route alike."""
    from sla2_kernels.routing import route_blocks

    q, k, _ = random_qkv(2, 2, 700, 64, torch.float32, 21, requires_grad=False)
    k[:, :, 320:] = 0.25  # key blocks 20 on share one mean: equal scores
    _, expected = _route_both(monkeypatch, q, k, sparsity=0.8, block_q=32, block_k=16)
    scores, lut = route_blocks(q, k, None, 32, 16, expected.k_sel, RouteLaunch(rows, 4, select_elements, select_warps))
    assert torch.allclose(scores, expected.scores, atol=1e-6)
    _assert_valid_table(lut, expected.k_sel, num_blocks(700, 16))
    kth = expected.scores.topk(expected.k_sel, dim=-1).values[..., -1:]
    assert bool((expected.scores.gather(-1, lut.long()) >= kth - 1e-6).all())


def test_kernel_routing_takes_the_rows_it_holds():
    assert routes_in_kernel(512) and routes_in_kernel(1182)  # 32760 and 75600 tokens in key blocks of 64
    assert routes_in_kernel(MAX_KERNEL_KEY_BLOCKS) and not routes_in_kernel(MAX_KERNEL_KEY_BLOCKS + 1)


FLOAT32_MAX = torch.finfo(torch.float32).max


def reference_top_blocks(scores: torch.Tensor, k_sel: int) -> torch.Tensor:
    """The selection's rule in PyTorch: the k_sel largest scores, the lowest block first among equal ones,
    NaN and -inf as the lowest float; ascending int32."""
    ordered = torch.nan_to_num(scores.float(), nan=-FLOAT32_MAX, posinf=float("inf"), neginf=-FLOAT32_MAX)
    top = torch.sort(ordered, dim=-1, descending=True, stable=True).indices[..., :k_sel]
    return top.sort(dim=-1).values.to(torch.int32)


def _tied_scores(shape, seed: int) -> torch.Tensor:
    """Random scores with many exact ties, both signed zeros, infinities and NaN."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(-4, 5, shape, generator=generator).float() * 0.5
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), FLOAT32_MAX, -FLOAT32_MAX])
    where = torch.rand(shape, generator=generator) < 0.2
    picks = specials[torch.randint(0, len(specials), shape, generator=generator)]
    return torch.where(where, picks, scores)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets NaN and infinities
@pytest.mark.parametrize("num_k_blocks", [1, 2, 17, 64, 300, 1182])
@pytest.mark.parametrize("ties", [False, True])
def test_selection_follows_the_rule(num_k_blocks, ties):
    """select_top_blocks against the rule's PyTorch form: random and heavily tied rows, k_sel from 1 to T_n."""
    shape = (2, 3, 5, num_k_blocks)
    seed = num_k_blocks + 7 * ties
    scores = _tied_scores(shape, seed) if ties else torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for k_sel in sorted({1, max(1, num_k_blocks // 3), max(1, num_k_blocks - 1), num_k_blocks}):
        lut = select_top_blocks(scores, k_sel)
        assert lut.dtype == torch.int32 and lut.shape == (*shape[:-1], k_sel)
        assert torch.equal(lut, reference_top_blocks(scores, k_sel)), f"k_sel={k_sel}"


@pytest.mark.gpu
@pytest.mark.parametrize("num_k_blocks,k_sel", [(512, 15), (1182, 35), (4096, 122)])
def test_gpu_selection_follows_the_rule(num_k_blocks, k_sel):
    """Rows of 32760, 75600 and the longest routed lengths (key blocks of 64), with ties and NaN."""
    scores = _tied_scores((2, 4, 100, num_k_blocks), num_k_blocks)
    assert torch.equal(select_top_blocks(scores.cuda(), k_sel).cpu(), reference_top_blocks(scores, k_sel))


def test_selection_takes_every_launch_alike():
    scores = _tied_scores((4, 7, 200), 3)
    expected = reference_top_blocks(scores, 20)
    for elements, warps in ((256, 1), (1024, 2), (8192, 8)):
        launch = RouteLaunch(16, 4, elements, warps)
        assert torch.equal(select_top_blocks(scores, 20, launch), expected)


def test_selection_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="k_sel"):
        select_top_blocks(torch.zeros(1, 4, 10), 11)
