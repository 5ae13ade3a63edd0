"""Dense attention baselines: FlashAttention2 and cuDNN through torch SDPA, flash-attn, SageAttention.

All of them compute full softmax attention, so one float32 reference serves: the exact output for a
few heads and the first query rows (each row needs only its own query and all keys), and, for the
backward pass, all gradients of a small problem cut from the same inputs.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla2cli.bench.checks import (
    BACKWARD_FACTOR,
    GRAD_CHECK_LENGTH,
    KernelMismatch,
    check_sample,
    dense_attention_float32,
    dense_rows_float32,
    fresh_leaves,
    head_slice,
    output_and_grads,
    require_close,
    training,
)
from sla2cli.bench.inputs import AttentionInputs
from sla2cli.bench.providers.base import DENSE, Provider, ProviderUnavailable


class DenseProvider(Provider):
    """Full attention on (B, H, L, D) tensors."""

    kind = DENSE

    @abstractmethod
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) -> (B, H, L, D)."""

    def build(self, inputs: AttentionInputs, sparsity: float | None) -> Callable[[], torch.Tensor]:
        return lambda: self.attention(inputs.q, inputs.k, inputs.v)

    def verify(
        self, inputs: AttentionInputs, sparsity: float | None, call: Callable[[], torch.Tensor]
    ) -> None:
        sample = check_sample(inputs)
        heads, rows = sample.heads, sample.query.rows
        with torch.no_grad():
            out = call()
            q_rows, k, v = inputs.q[:, heads, rows], inputs.k[:, heads], inputs.v[:, heads]
            reference = dense_rows_float32(q_rows, k, v)
        tolerance = self.tolerance(inputs.dtype)
        require_close(self.name, "output", out[:, heads, rows], reference, tolerance)
        if training(inputs):
            self._verify_gradients(inputs, tolerance * BACKWARD_FACTOR)

    def _verify_gradients(self, inputs: AttentionInputs, tolerance: float) -> None:
        """Gradients need all rows, so they are checked on a small problem cut from the inputs."""
        heads, tokens = head_slice(inputs), slice(0, min(GRAD_CHECK_LENGTH, inputs.shape.length))
        pieces = [t[:, heads, tokens] for t in (inputs.q, inputs.k, inputs.v)]
        grad_out = inputs.grad_out[:, heads, tokens].contiguous()
        leaves = fresh_leaves(pieces, requires_grad=True)
        _, grads = output_and_grads(lambda: self.attention(*leaves), leaves, grad_out)
        exact = fresh_leaves([p.float() for p in pieces], requires_grad=True)
        _, expected = output_and_grads(lambda: dense_attention_float32(*exact), exact, grad_out.float())
        for name, grad, reference in zip(("dq", "dk", "dv"), grads, expected, strict=True):
            if grad is None:
                raise KernelMismatch(f"{self.name}: returned no gradient for {name[1]}")
            require_close(self.name, name, grad, reference, tolerance)


class SdpaBackendProvider(DenseProvider):
    """torch.nn.functional.scaled_dot_product_attention pinned to one backend."""

    backend: SDPBackend

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        try:
            with sdpa_kernel(self.backend):
                return F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as error:
            if "No available kernel" in str(error):
                raise ProviderUnavailable(f"torch has no {self.backend.name} kernel for this case") from error
            raise


class FlashSdpa(SdpaBackendProvider):
    name = "fa2"
    summary = "FlashAttention2 via torch SDPA (flash backend)"
    backend = SDPBackend.FLASH_ATTENTION
    needs_cuda = True
    half_precision_only = True


class CudnnSdpa(SdpaBackendProvider):
    name = "cudnn"
    summary = "cuDNN attention via torch SDPA (cudnn backend)"
    backend = SDPBackend.CUDNN_ATTENTION
    needs_cuda = True
    half_precision_only = True


class DefaultSdpa(DenseProvider):
    """Whatever backend torch picks by itself; the only dense provider on a CPU."""

    name = "sdpa"
    summary = "torch SDPA, backend chosen by torch"

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class FlashAttnPackage(DenseProvider):
    name = "flash-attn"
    summary = "flash_attn.flash_attn_func (the flash-attn package)"
    package = "flash_attn"
    install_hint = "pip install flash-attn"
    needs_cuda = True
    half_precision_only = True

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from flash_attn import flash_attn_func

        # flash-attn takes (B, L, H, D); transposed views cost nothing and keep the last dim contiguous.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


class Sage(DenseProvider):
    name = "sage"
    summary = "SageAttention (INT8 Q K^T), forward only"
    package = "sageattention"
    install_hint = "pip install sageattention"
    needs_cuda = True
    half_precision_only = True
    has_backward = False

    def tolerance(self, dtype: torch.dtype) -> float:
        return 8e-2  # INT8 Q and K: a few percent of relative error is its design point

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
