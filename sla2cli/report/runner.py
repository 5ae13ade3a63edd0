"""Run a converted model on sample inputs and collect the report's metrics at every converted layer.

The runner only orchestrates: inputs come from `inputs`, the hooks from `capture`, the numbers from
`metrics`; loading the model and writing files are the command's business.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sla2cli.errors import UserError
from sla2cli.integration.conversion import sla2_layers
from sla2cli.integration.recipes import Recipe
from sla2cli.module import SLA2Attention
from sla2cli.ops.quantization import (
    QUANT_AUTO,
    QUANT_NONE,
    REQUESTABLE_QUANT_MODES,
    check_runnable,
    runnable_lowbit_mode,
)
from sla2cli.ops.validation import check_sparsity, check_timestep
from sla2cli.report.capture import capture_metrics, overridden_sparsity
from sla2cli.report.inputs import (
    RANDOM_INPUTS_WARNING,
    CleanSample,
    FamilyInputs,
    embedded_samples,
    family_inputs,
    file_samples,
    forward_inputs,
    latent_grid_for,
    parse_resolution,
    random_samples,
)
from sla2cli.report.metrics import DEFAULT_CHUNK_ELEMENTS
from sla2cli.report.model_quality import (
    dense_outputs,
    embedded_reference_losses,
    embedded_validation_losses,
    mean_output_error,
    quality_row,
)
from sla2cli.report.summary import MetricAccumulator, Row, rounding_note, summarize_layers, summarize_model

DEFAULT_TIMESTEPS = (0.9, 0.5, 0.1)
DEFAULT_TIMESTEPS_TEXT = ",".join(f"{t:g}" for t in DEFAULT_TIMESTEPS)  # as --timesteps takes them
DEFAULT_CLIPS = {"cpu": 1, "cuda": 4}  # one clip keeps the embedded model's report near 30 s on 2 cores
# (query, key) pairs per step of the dense scan: the fused GPU kernels never hold them, so GPU steps
# can be large; on CPU smaller steps keep a fallback kernel's scratch memory modest.
CHUNK_ELEMENTS = {"cpu": DEFAULT_CHUNK_ELEMENTS, "cuda": 1 << 27}


@dataclass(frozen=True)
class ReportTarget:
    """Converted model(s) to report on: components by name (one, or two experts for Wan2.2 A14B), the
    recipe, how to name the model, and whether it is the embedded model (own clips, viewable latents)."""

    components: dict[str, nn.Module]
    recipe: Recipe
    name: str
    embedded: bool

    @property
    def main(self) -> nn.Module:
        return next(iter(self.components.values()))


@dataclass(frozen=True)
class ReportSettings:
    """What to measure. sparsity None keeps each layer's own; resolution None is the recipe default;
    clips None is every clip of an inputs file, else a per-device default (few on CPU, more on GPU)."""

    sparsity: float | None = None
    timesteps: tuple[float, ...] = DEFAULT_TIMESTEPS
    inputs: Path | None = None
    resolution: str | None = None
    clips: int | None = None
    seed: int = 0
    max_chunk_elements: int | None = None
    quant: str = QUANT_AUTO  # low-bit mode compared with the unquantised op per layer; none: not compared
    model_quality: bool = True  # run the inputs again with dense attention for the model-level figures


@dataclass
class ReportResult:
    """Rows per (layer, head), summaries per layer and for the model, the model's output against dense
    (`model_quality`), and what the user should know."""

    rows: list[Row]
    layer_rows: list[Row]
    model_row: Row
    warnings: list[str]
    quality: Row = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # facts to read the numbers by (sparsity rounding)


def parse_timesteps(text: str) -> tuple[float, ...]:
    """'0.9,0.5,0.1' -> (0.9, 0.5, 0.1): comma-separated numbers in [0, 1] (1 is pure noise)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        raise UserError(
            f"--timesteps must be comma-separated numbers in [0, 1] such as 0.9,0.5,0.1; got {text!r}"
        ) from None
    if not values:
        raise UserError(f"--timesteps needs at least one value such as 0.9,0.5,0.1; got {text!r}")
    for value in values:
        check_timestep(value, "--timesteps values")
    return values


def check_settings(settings: ReportSettings) -> None:
    """User mistakes in the settings, found before any model work."""
    if settings.sparsity is not None:
        check_sparsity(settings.sparsity, "--sparsity")
    if settings.clips is not None and settings.clips < 1:
        raise UserError(f"--clips must be at least 1, got {settings.clips}")
    if not settings.timesteps:
        raise UserError("--timesteps needs at least one value, e.g. 0.9,0.5,0.1")
    if settings.quant not in REQUESTABLE_QUANT_MODES:
        raise UserError(f"--quant must be one of {', '.join(REQUESTABLE_QUANT_MODES)}; got {settings.quant!r}")


def lowbit_mode(settings: ReportSettings, device: torch.device) -> tuple[str, list[str]]:
    """The concrete mode to compare (none: no column) and a warning when `auto` finds none on this GPU.

    The report measures accuracy, not speed, so `auto` here is the low-bit mode this GPU runs even where
    the model's own `auto` runs bf16 because that mode is not faster there."""
    mode = check_runnable(settings.quant, device)
    if mode == QUANT_AUTO:
        mode = runnable_lowbit_mode(device)
    if settings.quant == QUANT_AUTO and mode == QUANT_NONE:
        return mode, ["this GPU runs no low-bit mode, so lowbit_rel_l2_vs_sla2 is left out"]
    return mode, []


def clean_samples(
    target: ReportTarget, adapter: FamilyInputs, settings: ReportSettings, *, calibration: bool = False
) -> tuple[list[CleanSample], list[str]]:
    """The clips to run (validation clips, a user file, or random) and any warning about them; with
    `calibration`, the embedded model's calibration clips instead of its validation clips."""
    if settings.inputs is not None:
        ignored = ["--resolution is ignored: the clip size comes from --inputs"] if settings.resolution else []
        return file_samples(settings.inputs, adapter, settings.clips), ignored
    grid = latent_grid_for(parse_resolution(settings.resolution, target.recipe), target.recipe, adapter)
    if target.embedded:
        return embedded_samples(adapter, grid, settings.clips, calibration=calibration), []
    return random_samples(adapter, grid, settings.clips, settings.seed), [RANDOM_INPUTS_WARNING]


def converted_layers(target: ReportTarget) -> dict[tuple[str, str], SLA2Attention]:
    """(component, converted module name) -> SLA2 layer, over every component in model order."""
    return {
        (component, name): layer
        for component, model in target.components.items()
        for name, layer in sla2_layers(model).items()
    }


def _layer_key(component: str, module: str) -> str:
    return f"{component}:{module}"


def _labelled_rows(rows: list[Row], recipe: Recipe, keys: list[tuple[str, str]]) -> list[Row]:
    """Rows keyed internally by component and module get the report's columns: component, layer, module."""
    by_key = {_layer_key(component, module): (component, module) for component, module in keys}
    labelled = []
    for row in rows:
        component, module = by_key[str(row["layer"])]
        index = recipe.attention.layer_index(module)
        fields = {k: v for k, v in row.items() if k != "layer"}
        labelled.append({"component": component, "layer": index, "module": module, **fields})
    return labelled


def run_report(
    target: ReportTarget,
    settings: ReportSettings,
    *,
    device: torch.device,
    dtype: torch.dtype,
    on_start: Callable[[int], None] | None = None,
    on_layer: Callable[[str], None] | None = None,
) -> ReportResult:
    """Run every (clip, timestep) through the converted model and average the metrics per (layer, head).

    With several components (the two experts of Wan2.2 A14B) each runs on every input. on_start(total)
    is told how many layer calls to expect; on_layer(name) is called after each.
    """
    check_settings(settings)
    if settings.clips is None and settings.inputs is None:
        settings = replace(settings, clips=DEFAULT_CLIPS.get(device.type, DEFAULT_CLIPS["cuda"]))
    started = time.perf_counter()
    keyed = converted_layers(target)
    if not keyed:
        raise UserError(f"{target.name} has no SLA2 layers; convert it first with sla2 convert")
    layers = {_layer_key(*key): layer for key, layer in keyed.items()}
    lowbit, quant_warnings = lowbit_mode(settings, device)
    adapter = family_inputs(target.main, target.recipe)
    samples, warnings = clean_samples(target, adapter, settings)
    warnings += quant_warnings
    forwards = forward_inputs(
        adapter, samples, settings.timesteps, seed=settings.seed, device=device, dtype=dtype
    )
    if on_start is not None:
        on_start(len(forwards) * len(layers))
    accumulator = MetricAccumulator()
    chunk = settings.max_chunk_elements or CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS)
    models = list(target.components.values())
    with torch.no_grad(), overridden_sparsity(layers, settings.sparsity):
        with capture_metrics(layers, accumulator, max_chunk_elements=chunk, on_layer=on_layer, lowbit_quant=lowbit):
            outputs = [model(**item.kwargs, return_dict=False)[0] for model in models for item in forwards]
        quality: Row = {}
        if settings.model_quality:
            output_error = mean_output_error(outputs, dense_outputs(models, layers, forwards))
            embedded = target.embedded
            losses = embedded_validation_losses(target.main, layers, samples, device, dtype) if embedded else None
            references = embedded_reference_losses(target.main, samples, device, dtype) if embedded else None
            quality = quality_row(output_error, losses, references)
    missing = [name for name in layers if name not in accumulator.layers]
    if len(missing) == len(layers):
        raise UserError(f"no SLA2 layer of {target.name} was called; its attention processors are not SLA2")
    if missing:
        warnings.append(f"{len(missing)} converted layer(s) were never called (e.g. {missing[0]})")
    rows = _labelled_rows(accumulator.rows(), target.recipe, list(keyed))
    note = rounding_note(rows)
    return ReportResult(
        rows=rows,
        layer_rows=summarize_layers(rows),
        model_row=summarize_model(rows),
        warnings=warnings,
        quality=quality,
        settings={**_settings_document(target, settings, samples, device, dtype), "quant_compared": lowbit},
        seconds=time.perf_counter() - started,
        notes=[note] if note else [],
    )


def _settings_document(
    target: ReportTarget, settings: ReportSettings, samples: list[CleanSample], device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    document = asdict(settings)
    document["inputs"] = str(settings.inputs) if settings.inputs else None
    document["timesteps"] = list(settings.timesteps)
    document.update(
        model=target.name,
        recipe=target.recipe.name,
        samples=[sample.label for sample in samples],
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
    return document
