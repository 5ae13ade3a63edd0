"""Model-level quality of a converted model: its whole output against the same model with dense attention.

Per-layer errors say where SLA2 departs from full attention; these say what reaches the output. The
dense model is the same weights with every converted layer computing full softmax attention (the
model as it was before conversion), so the only difference measured is the attention.

- `output_rel_l2_error` (any model): ||out - out_dense|| / ||out_dense|| of the transformer's output
  per sample input (clip and timestep), averaged over them;
- `val_loss`, `dense_val_loss`, `val_loss_ratio` (the embedded model): the velocity loss of its
  trainer's validation (`validation_loss`: fixed noise, fixed times) on the report's clean clips.
- `shipped_dense_val_loss`, `untrained_val_loss`, `val_loss_vs_shipped_dense` (an embedded model with base
  weights of its own, e.g. the shipped SLA2 model or any fine-tuned one): there `dense_val_loss` is its own
  fine-tuned weights run dense, which is no baseline; these add the shipped dense model (the model users
  start from) and its untrained conversion at the same sparsity (what conversion alone gives) on the same clips.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sla2cli.checkpoint.storage import split_state
from sla2cli.embedded.loading import load_embedded_model
from sla2cli.integration.conversion import convert_embedded, model_quant, model_settings
from sla2cli.module import SLA2Attention
from sla2cli.report.capture import dense_attention
from sla2cli.report.inputs import CleanSample, ForwardInput
from sla2cli.report.summary import Row
from sla2cli.training.objectives import validation_loss


def output_relative_error(output: torch.Tensor, dense: torch.Tensor) -> float:
    """||output - dense|| / ||dense|| over the whole tensor, in float32."""
    dense = dense.float()
    return ((output.float() - dense).norm() / dense.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


@torch.no_grad()
def dense_outputs(
    models: Iterable[nn.Module], layers: dict[str, SLA2Attention], forwards: list[ForwardInput]
) -> list[torch.Tensor]:
    """Every model's output on every input with dense attention in the converted layers, in run order."""
    with dense_attention(layers):
        return [model(**item.kwargs, return_dict=False)[0] for model in models for item in forwards]


def mean_output_error(outputs: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    """Mean relative error of the SLA2 outputs against the dense ones, pairwise in run order."""
    errors = [output_relative_error(out, ref) for out, ref in zip(outputs, dense, strict=True)]
    return sum(errors) / len(errors)


def _validation_batch(samples: list[CleanSample], device: torch.device, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.cat([sample.latents for sample in samples]).to(device=device, dtype=dtype)
    text = torch.cat([sample.text for sample in samples]).to(device=device, dtype=dtype)
    return clean, text


def has_own_base_weights(model: nn.Module, shipped: nn.Module) -> bool:
    """Whether a converted embedded model's base weights differ from the shipped dense model's."""
    own, _ = split_state(model, model.state_dict())
    reference = shipped.state_dict()
    if own.keys() != reference.keys():
        return True
    return any(not torch.equal(own[key].float(), reference[key].to(own[key].device).float()) for key in own)


def embedded_reference_losses(
    model: nn.Module, samples: list[CleanSample], device: torch.device, dtype: torch.dtype
) -> tuple[float, float] | None:
    """(shipped dense model, its untrained conversion at `model`'s settings) validation losses on `samples`,
    or None when `model` runs the shipped dense weights (then its own figures already are these)."""
    reference = load_embedded_model(dtype=dtype, device=device)
    if not has_own_base_weights(model, reference):
        return None
    clean, text = _validation_batch(samples, device, dtype)
    use_autocast = device.type == "cuda"
    dense = validation_loss(reference, clean, text, use_autocast)
    sparsity, block_q, block_k = model_settings(model)
    convert_embedded(reference, sparsity=sparsity, block_q=block_q, block_k=block_k, quant=model_quant(model))
    return dense, validation_loss(reference, clean, text, use_autocast)


def embedded_validation_losses(
    model: nn.Module, layers: dict[str, SLA2Attention], samples: list[CleanSample], device: torch.device,
    dtype: torch.dtype,
) -> tuple[float, float]:
    """(SLA2 validation loss, dense validation loss) of the embedded model on the clips of `samples`."""
    clean, text = _validation_batch(samples, device, dtype)
    use_autocast = device.type == "cuda"
    sla2 = validation_loss(model, clean, text, use_autocast)
    with dense_attention(layers):
        dense = validation_loss(model, clean, text, use_autocast)
    return sla2, dense


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("nan")


def quality_row(
    output_error: float, losses: tuple[float, float] | None, references: tuple[float, float] | None = None
) -> Row:
    """The figures as one row (validation losses only when measured, the references only when given)."""
    row: Row = {"output_rel_l2_error": output_error}
    if losses is not None:
        sla2, dense = losses
        row.update(val_loss=sla2, dense_val_loss=dense, val_loss_ratio=_ratio(sla2, dense))
        if references is not None:
            shipped_dense, untrained = references
            row.update(shipped_dense_val_loss=shipped_dense, untrained_val_loss=untrained,
                       val_loss_vs_shipped_dense=_ratio(sla2, shipped_dense))
    return row
