"""SLA2 backward.

Two kernels, as in FlashAttention-2's backward: one program per query block accumulates dQ (sparse
branch from recomputed probabilities, linear branch through phi(Q)) and writes the per-query-block
linear-state gradients dH_i, dz_i and the sparse branch's dO_s = alpha dO; one program per key block
walks the query blocks that selected it (a reverse look-up table) for dK, dV of the sparse branch, and
takes the linear branch's dK, dV from dG_j = sum of dH_i over the query blocks that did NOT select it
(one GEMM outside).

The forward, per query block i (sla2_kernels.forward), with c = 1 / sqrt(D):
    P = softmax(c Q K_S^T),  O_s = P V_S,  O_l = N / den,  N = phi(Q) H_i,  den = phi(Q) z_i + eps,
    O = alpha O_s + (1 - alpha) O_l,  H_i = sum_{j not in S_i} h_j,  h_j = phi(K_j)^T V_j,  z_j = sum_rows phi(K_j).
Each gradient below is written next to the code that computes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sla2_kernels.common import (
    LOG2E,
    Launch,
    block_rows,
    block_sources,
    d_by_d_strides,
    dot_precision,
    feature_softmax,
    feature_softmax_grad,
    row_stride_args,
    tile_pointers,
)

# Per head dim for each backward kernel; benchmarks/gpu_suite.py --backward-parts sweeps them (D = 128 from
# benchmarks/results/h200_backward_launch_sweep.csv). Tensor descriptors (--tma-parts, h200_tma_sweep_6be644f.csv,
# 0.97): the query side 1.65 against 1.75 ms at 1x12x32760x128 and 17.7 against 18.8 at 1x40x75600x128. The key
# side, since it reads dO_s as stored (h200_key_sweep_bdd88bf.csv): 8 warps, 2 stages and descriptors 2.44 / 34.8
# ms against 2.57 / 38.4 for the earlier 8 warps, 1 stage, pointers (fastest while it scaled dO on every visit).
QUERY_LAUNCH: dict[int, Launch] = {64: Launch(4, 1), 128: Launch(8, 3, tma=True)}
KEY_LAUNCH: dict[int, Launch] = {64: Launch(4, 1), 128: Launch(8, 2, tma=True)}


@triton.jit(do_not_specialize=["length", "num_q_blocks", "num_k_blocks", "k_sel"])
def _sla2_backward_query_kernel(
    Q, K, V, DO, OutSparse, Lse, Lut, Alpha, CompState, CompNorm,
    DQ, Delta, DOSparse, DAlpha, DStateQ, DNormQ,
    q_strides, k_strides, v_strides, o_strides, dq_strides,
    heads, length, num_q_blocks, num_k_blocks, k_sel,
    qk_scale_log2, scale, linear_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_LINEAR: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    key_offsets = tl.arange(0, BLOCK_N)
    row_valid = rows < length

    q = tl.load(tile_pointers(Q, batch, head, rows[:, None], cols[None, :], q_strides),
                mask=row_valid[:, None], other=0.0)
    # dO and O_s share strides (the op makes them so).
    grad_out = tl.load(tile_pointers(DO, batch, head, rows[:, None], cols[None, :], o_strides),
                       mask=row_valid[:, None], other=0.0).to(tl.float32)
    out_sparse = tl.load(tile_pointers(OutSparse, batch, head, rows[:, None], cols[None, :], o_strides),
                         mask=row_valid[:, None], other=0.0).to(tl.float32)
    lse = tl.load(Lse + bh * length + rows, mask=row_valid, other=0.0)
    if HAS_LINEAR:
        mix = tl.load(Alpha + bh * num_q_blocks + q_block)
    else:
        mix = 1.0
    # dO_s = alpha dO. Delta = rowsum(dO_s * O_s) = rowsum(P * dP), the softmax gradient's shift,
    # from the same rounded dO_s that the dP products use: keeps dS = P (dP - Delta) free of
    # rounding bias where P concentrates (a one-token block gives an exactly zero dS).
    grad_sparse_in = (grad_out * mix).to(q.dtype)
    delta = tl.sum(grad_sparse_in.to(tl.float32) * out_sparse, axis=1)
    tl.store(Delta + bh * length + rows, delta, mask=row_valid)
    if HAS_LINEAR:
        # The key side reads this rounded dO_s as it is: its tiles then go to the MMAs as loaded (scaling
        # them there per visit kept the key kernel from pipelining its loads).
        tl.store(tile_pointers(DOSparse, batch, head, rows[:, None], cols[None, :], o_strides), grad_sparse_in,
                 mask=row_valid[:, None])

    lut_row = Lut + (bh * num_q_blocks + q_block) * k_sel
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in range(0, k_sel):
        key_block = tl.load(lut_row + t)
        keys = key_block * BLOCK_N + key_offsets
        key_valid = keys < length
        k = block_rows(K, batch, head, key_block * BLOCK_N, k_strides, length, BLOCK_N, HEAD_DIM, TMA)
        v = block_rows(V, batch, head, key_block * BLOCK_N, v_strides, length, BLOCK_N, HEAD_DIM, TMA)
        # P recomputed from the saved log2 log-sum-exp; dP = dO_s V^T; dS = P (dP - Delta); dQ += dS K (times c below).
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        probs = tl.math.exp2(scores - lse[:, None])
        probs = tl.where(key_valid[None, :] & row_valid[:, None], probs, 0.0)
        grad_probs = tl.dot(grad_sparse_in, tl.trans(v), input_precision=DOT_PRECISION)
        grad_scores = probs * (grad_probs - delta[:, None])
        dq = tl.dot(grad_scores.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq = dq * scale

    if HAS_LINEAR:
        block_offset = bh * num_q_blocks + q_block
        state = tl.load(tile_pointers(CompState, block_offset, 0, cols[:, None], cols[None, :],
                                      d_by_d_strides(HEAD_DIM))).to(tl.float32)
        norm = tl.load(CompNorm + block_offset * HEAD_DIM + cols)
        phi = feature_softmax(q.to(tl.float32))
        denominator = tl.sum(phi * norm[None, :], axis=1) + linear_eps
        out_linear = tl.dot(phi, state, input_precision=DOT_PRECISION) / denominator[:, None]
        # dalpha = sum over the block's rows and features of dO * (O_s - O_l).
        tl.store(DAlpha + bh * num_q_blocks + q_block, tl.sum(tl.sum(grad_out * (out_sparse - out_linear), 1), 0))
        # dO_l = (1 - alpha) dO. O_l = N / den gives dN = dO_l / den and, for the normaliser,
        # d den = -rowsum(dO_l * N) / den^2 = -rowsum(dO_l * O_l) / den.
        grad_linear = grad_out * (1.0 - mix)
        grad_numerator = grad_linear / denominator[:, None]
        grad_denominator = -tl.sum(grad_linear * out_linear, axis=1) / denominator
        # N = phi H and den = phi z + eps: d phi = dN H^T + d den z^T; dH = phi^T dN; dz = sum_rows d den phi.
        grad_phi = tl.dot(grad_numerator, tl.trans(state), input_precision=DOT_PRECISION)
        grad_phi += grad_denominator[:, None] * norm[None, :]
        dq += feature_softmax_grad(phi, grad_phi)
        grad_state = tl.dot(tl.trans(phi), grad_numerator, input_precision=DOT_PRECISION)
        tl.store(tile_pointers(DStateQ, block_offset, 0, cols[:, None], cols[None, :], d_by_d_strides(HEAD_DIM)),
                 grad_state.to(DStateQ.dtype.element_ty))
        tl.store(DNormQ + block_offset * HEAD_DIM + cols, tl.sum(grad_denominator[:, None] * phi, axis=0))
    tl.store(tile_pointers(DQ, batch, head, rows[:, None], cols[None, :], dq_strides),
             dq.to(DQ.dtype.element_ty), mask=row_valid[:, None])


@triton.jit(do_not_specialize=["length", "num_k_blocks", "state_blocks"])
def _sla2_backward_key_kernel(
    Q, K, V, DOSparse, Lse, Delta, RevIndex, RevOffset, DStateK, DNormK,
    DK, DV,
    q_strides, k_strides, v_strides, o_strides, dk_strides, dv_strides,
    heads, length, num_k_blocks, state_blocks, rev_len,
    qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_LINEAR: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    k_block = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    keys = k_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    query_offsets = tl.arange(0, BLOCK_M)
    key_valid = keys < length
    k = tl.load(tile_pointers(K, batch, head, keys[:, None], cols[None, :], k_strides),
                mask=key_valid[:, None], other=0.0)
    v = tl.load(tile_pointers(V, batch, head, keys[:, None], cols[None, :], v_strides),
                mask=key_valid[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    start = tl.load(RevOffset + bh * (num_k_blocks + 1) + k_block)
    stop = tl.load(RevOffset + bh * (num_k_blocks + 1) + k_block + 1)
    for t in range(start, stop):
        q_block = tl.load(RevIndex + bh * rev_len + t)
        rows = q_block * BLOCK_M + query_offsets
        row_valid = rows < length
        q = block_rows(Q, batch, head, q_block * BLOCK_M, q_strides, length, BLOCK_M, HEAD_DIM, TMA)
        grad_sparse = block_rows(DOSparse, batch, head, q_block * BLOCK_M, o_strides, length, BLOCK_M, HEAD_DIM,
                                 TMA)
        lse = tl.load(Lse + bh * length + rows, mask=row_valid, other=0.0)
        delta = tl.load(Delta + bh * length + rows, mask=row_valid, other=0.0)
        # Transposed (keys x query rows): P^T, then dV += P^T dO_s, dP^T = V dO_s^T,
        # dS^T = P^T (dP^T - Delta), dK += dS^T Q (times c below).
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        probs_t = tl.math.exp2(scores_t - lse[None, :])
        probs_t = tl.where(key_valid[:, None] & row_valid[None, :], probs_t, 0.0)
        dv = tl.dot(probs_t.to(q.dtype), grad_sparse, dv, input_precision=DOT_PRECISION)
        grad_probs_t = tl.dot(v, tl.trans(grad_sparse), input_precision=DOT_PRECISION)
        grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
        dk = tl.dot(grad_scores_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    dk = dk * scale
    if HAS_LINEAR:
        # dG_j, dg_j: the sums of dH_i, dz_i over the query blocks that left this key block to the
        # linear branch. h_j = phi(K_j)^T V_j and z_j = sum_rows phi(K_j) give dV += phi(K_j) dG_j and
        # d phi(K_j) = V_j dG_j^T + dg_j (on every row); padded rows have phi = 0.
        block_offset = bh * state_blocks + k_block  # dG, dg are stored for state_blocks blocks per head
        dstate = tl.load(tile_pointers(DStateK, block_offset, 0, cols[:, None], cols[None, :],
                                       d_by_d_strides(HEAD_DIM))).to(tl.float32)
        dnorm = tl.load(DNormK + block_offset * HEAD_DIM + cols)
        kf = k.to(tl.float32)
        phi = tl.where(key_valid[:, None], feature_softmax(kf), 0.0)
        dv += tl.dot(phi, dstate, input_precision=DOT_PRECISION)
        grad_phi = tl.dot(v.to(tl.float32), tl.trans(dstate), input_precision=DOT_PRECISION) + dnorm[None, :]
        dk += feature_softmax_grad(phi, grad_phi)
    tl.store(tile_pointers(DK, batch, head, keys[:, None], cols[None, :], dk_strides),
             dk.to(DK.dtype.element_ty), mask=key_valid[:, None])
    tl.store(tile_pointers(DV, batch, head, keys[:, None], cols[None, :], dv_strides),
             dv.to(DV.dtype.element_ty), mask=key_valid[:, None])


def reverse_lut(lut: torch.Tensor, num_k_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key block, the query blocks that selected it (CSR: indices, offsets). No host sync."""
    batch, heads, num_q_blocks, k_sel = lut.shape
    flat = lut.reshape(batch * heads, num_q_blocks * k_sel).long()
    order = flat.sort(dim=1, stable=True).indices
    rev_index = (order // k_sel).to(torch.int32).contiguous()
    counts = torch.zeros(batch * heads, num_k_blocks, dtype=torch.int64, device=lut.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    rev_offset = torch.nn.functional.pad(counts.cumsum(dim=1), (1, 0)).to(torch.int32).contiguous()
    return rev_index, rev_offset


def sla2_backward_query(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    alpha: torch.Tensor | None,
    out_sparse: torch.Tensor,
    lse: torch.Tensor,
    comp_states: torch.Tensor | None,
    comp_norms: torch.Tensor | None,
    block_q: int,
    block_k: int,
    linear_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Query-side backward: (dq, delta, dO_s, dalpha, dH per query block, dz per query block).

    dO_s = alpha dO rounded to the inputs' dtype, what the key side takes (grad_out itself without alpha).
    alpha None means the pure sparse branch (no linear terms; dalpha and dH/dz are None).
    grad_out must have out_sparse's strides.
    """
    batch, heads, length, head_dim = q.shape
    num_q_blocks, num_k_blocks = triton.cdiv(length, block_q), triton.cdiv(length, block_k)
    has_linear = alpha is not None
    empty = q.new_empty(0, dtype=torch.float32)
    dq = torch.empty_like(q)
    delta = torch.empty(batch, heads, length, device=q.device, dtype=torch.float32)
    dalpha = dstate_q = dnorm_q = None
    grad_sparse = grad_out
    if has_linear:
        grad_sparse = torch.empty_like(out_sparse)
        dalpha = torch.empty(batch, heads, num_q_blocks, device=q.device, dtype=torch.float32)
        dstate_q = q.new_empty(batch, heads, num_q_blocks, head_dim, head_dim)
        dnorm_q = q.new_empty(batch, heads, num_q_blocks, head_dim, dtype=torch.float32)
    launch = QUERY_LAUNCH[head_dim]
    (k_rows, v_rows), tma = block_sources((k, v), block_k, launch.tma)
    _sla2_backward_query_kernel[(num_q_blocks, batch * heads)](
        q, k_rows, v_rows, grad_out, out_sparse, lse, lut,
        *(x if has_linear else empty for x in (alpha, comp_states, comp_norms)),
        dq, delta, *(x if has_linear else empty for x in (grad_sparse, dalpha, dstate_q, dnorm_q)),
        row_stride_args(q), row_stride_args(k), row_stride_args(v), row_stride_args(grad_out),
        row_stride_args(dq),
        heads, length, num_q_blocks, num_k_blocks, lut.shape[-1],
        head_dim**-0.5 * LOG2E, head_dim**-0.5, linear_eps,
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=head_dim,
        HAS_LINEAR=has_linear, DOT_PRECISION=dot_precision(q.dtype), TMA=tma,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return dq, delta, grad_sparse, dalpha, dstate_q, dnorm_q


def sla2_backward_key(
    grad_sparse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    key_dstates: torch.Tensor | None,
    key_dnorms: torch.Tensor | None,
    block_q: int,
    block_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-side backward: (dk, dv). grad_sparse: dO_s as sla2_backward_query returns it. key_dstates/key_dnorms:
    None without a linear branch, else dG_j, dg_j per key block (B, H, T_s, ...), stored for T_s >= T_n blocks as
    complement_state_grads returns them."""
    batch, heads, length, head_dim = q.shape
    num_k_blocks = triton.cdiv(length, block_k)
    has_linear = key_dstates is not None
    empty = q.new_empty(0, dtype=torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    rev_index, rev_offset = reverse_lut(lut, num_k_blocks)
    launch = KEY_LAUNCH[head_dim]
    (q_rows, grad_sparse_rows), tma = block_sources((q, grad_sparse), block_q, launch.tma)
    _sla2_backward_key_kernel[(num_k_blocks, batch * heads)](
        q_rows, k, v, grad_sparse_rows, lse, delta, rev_index, rev_offset,
        key_dstates if has_linear else empty, key_dnorms if has_linear else empty,
        dk, dv,
        row_stride_args(q), row_stride_args(k), row_stride_args(v), row_stride_args(grad_sparse),
        row_stride_args(dk), row_stride_args(dv),
        heads, length, num_k_blocks, key_dstates.shape[2] if has_linear else 0, rev_index.shape[-1],
        head_dim**-0.5 * LOG2E, head_dim**-0.5,
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=head_dim,
        HAS_LINEAR=has_linear, DOT_PRECISION=dot_precision(q.dtype), TMA=tma,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return dk, dv
