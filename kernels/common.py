"""What every SLA2 kernel shares: the launch-settings type, tile addressing, phi, precision choices."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# Re-exported (the redundant alias says so): the forward and backward kernels import LOG2E from here.
from sla2_kernels.numerics import LOG2E as LOG2E


class Launch(NamedTuple):
    """How a kernel is launched: the tables of launch settings in each kernel module hold these.

    accumulate_linear picks the forward kernel's epilogue (see sla2_kernels.forward); the other kernels
    leave it False. tma: the kernels that gather whole blocks of rows (the forward's and the query side's
    key blocks, the key side's query blocks) read them through tensor descriptors (block_rows).
    """

    num_warps: int
    num_stages: int
    accumulate_linear: bool = False
    tma: bool = False


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs keep full float32 products (tests need 1e-5); 16-bit inputs use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_stride_args(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, L, D) tensor whose last dim is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels read rows as contiguous vectors; copy only when the feature dim is strided."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def tile_pointers(X, outer, inner, rows, cols, strides):
    """Pointers to X[outer, inner, rows, cols] of a 4-d tensor whose last dim is contiguous.

    strides: the (outer, inner, row) strides. For a (B, H, L, D) tensor, outer and inner are the
    batch and the head, rows the sequence positions and cols the features, with the strides that
    row_stride_args gives. rows and cols come shaped for the tile: rows[:, None], cols[None, :]
    address an (L, D) tile; keys[None, :], cols[:, None] the transposed (D, L) one. The outer and
    inner offsets go onto the 64-bit pointer one by one; only the tile's offsets are summed in 32 bits.
    """
    return X + outer * strides[0] + inner * strides[1] + (rows * strides[2] + cols)


def takes_descriptors(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can address these tensors: 16-byte aligned bases and strides."""
    return all(x.data_ptr() % 16 == 0 and all(stride * x.element_size() % 16 == 0 for stride in x.stride()[:-1])
               for x in tensors)


def block_descriptor(x: torch.Tensor, block: int) -> TensorDescriptor:
    """A tensor descriptor for (1, 1, block, D) tiles of a (B, H, L, D) tensor (see takes_descriptors)."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, block, x.shape[-1]])


def block_sources(tensors: tuple[torch.Tensor, ...], block: int, wanted: bool) -> tuple[list, bool]:
    """What a kernel's block_rows reads each tensor through, and its TMA flag: descriptors of (block, D)
    tiles where `wanted` and every tensor takes them, else the tensors themselves (read through pointers)."""
    tma = wanted and takes_descriptors(*tensors)
    return [block_descriptor(x, block) if tma else x for x in tensors], tma


@triton.jit
def block_rows(X, batch, head, first_row, strides, length,
               BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """The (BLOCK, D) tile of X[batch, head] from row first_row; rows past `length` read as zero. TMA: X is
    block_descriptor's descriptor, read by one asynchronous bulk copy (which zero-fills past the tensor's
    end); else X is the tensor, read through pointers."""
    if TMA:
        return X.load([batch, head, first_row, 0]).reshape(BLOCK, HEAD_DIM)
    else:
        rows = first_row + tl.arange(0, BLOCK)
        return tl.load(tile_pointers(X, batch, head, rows[:, None], tl.arange(0, HEAD_DIM)[None, :], strides),
                       mask=rows[:, None] < length, other=0.0)


@triton.jit
def d_by_d_strides(HEAD_DIM: tl.constexpr):
    """tile_pointers' strides for a contiguous stack of D x D matrices (the linear-branch states and
    their gradients, one per (batch*head, block)): matrix `index` is tile_pointers(X, index, 0, ...)."""
    return HEAD_DIM * HEAD_DIM, 0, HEAD_DIM


@triton.jit
def feature_softmax(x):
    """phi(x): softmax over the feature axis (axis 1) of a float32 tile."""
    shifted = x - tl.max(x, axis=1)[:, None]
    e = tl.exp(shifted)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def feature_softmax_grad(phi, grad_phi):
    """Gradient through phi = softmax over features: dx = phi * (dphi - sum_c dphi_c phi_c), per row."""
    return phi * (grad_phi - tl.sum(grad_phi * phi, axis=1)[:, None])
