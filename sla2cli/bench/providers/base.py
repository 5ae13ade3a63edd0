"""What every benchmarked attention implementation ("provider") tells the runner.

A provider says whether it can run here (installed? right device, dtype, mode?), builds the call to
time (everything that is not part of the timed work, such as layout or block-mask construction, is
done once in build), and verifies that call against a reference before the runner times it.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from sla2cli.bench.cases import FORWARD_BACKWARD
from sla2cli.bench.checks import FORWARD_TOLERANCE, check_sample, describe_sample
from sla2cli.bench.inputs import AttentionInputs

DENSE = "dense"  # full attention: sparsity does not apply, measured once per shape and mode
SPARSE = "sparse"  # measured at every sparsity
ROUTING = "routing"  # a part of SLA2 timed on its own

HALF_DTYPES = (torch.float16, torch.bfloat16)


class ProviderUnavailable(Exception):
    """The provider cannot run this case (a backend refused it); the row is skipped with this reason."""


class Provider(ABC):
    """One attention implementation under test. Subclasses set the class attributes below."""

    name: ClassVar[str]
    kind: ClassVar[str]
    summary: ClassVar[str]  # what the timed call covers, shown as the row's note
    partial: ClassVar[str] = ""  # short label when the call is only a part of attention (plot legends)
    package: ClassVar[str | None] = None  # importable module it needs, None when torch suffices
    install_hint: ClassVar[str] = ""
    needs_cuda: ClassVar[bool] = False
    half_precision_only: ClassVar[bool] = False
    has_backward: ClassVar[bool] = True

    def not_installed(self) -> str | None:
        """Why the provider cannot be imported at all, or None."""
        if self.package is None or importlib.util.find_spec(self.package) is not None:
            return None
        return f"{self.package} is not installed ({self.install_hint})"

    def unsupported(self, device: torch.device, dtype: torch.dtype, mode: str) -> str | None:
        """Why this provider cannot run on this device, dtype or mode, or None."""
        if self.needs_cuda and device.type != "cuda":
            return "needs a CUDA GPU"
        if self.half_precision_only and dtype not in HALF_DTYPES:
            return "runs in float16/bfloat16 only"
        if mode == FORWARD_BACKWARD and not self.has_backward:
            return "has no backward pass"
        return None

    def quant_mode(self, device: torch.device) -> str | None:
        """The SLA2 quantisation mode the provider runs on `device` (its row's `quant`); None if not SLA2."""
        return None

    def checked_on(self, inputs: AttentionInputs) -> str:
        """The row's `checked_on` cell: what the correctness check compared (sampled heads and rows)."""
        return describe_sample(inputs, check_sample(inputs).query.rows.numel())

    def decision_note(self, inputs: AttentionInputs) -> str | None:
        """A line the row's note adds about what the library would choose at this case; none by default."""
        return None

    def accuracy(
        self, inputs: AttentionInputs, sparsity: float | None, call: Callable[[], torch.Tensor]
    ) -> dict[str, float]:
        """Accuracy columns of the row (after verify passed), by column name; none by default."""
        return {}

    def tolerance(self, dtype: torch.dtype) -> float:
        """Relative L2 error allowed against the float32 reference."""
        return FORWARD_TOLERANCE[dtype]

    @abstractmethod
    def build(self, inputs: AttentionInputs, sparsity: float | None) -> Callable[[], torch.Tensor]:
        """The call to time (sparsity is None for dense providers)."""

    @abstractmethod
    def verify(
        self, inputs: AttentionInputs, sparsity: float | None, call: Callable[[], torch.Tensor]
    ) -> None:
        """Raise KernelMismatch unless call() (and, when training, its gradients) match the reference."""
