"""`sla2 convert`'s job: check the request, build the model (or re-open a checkpoint) as converted skeletons,
write the checkpoint folder.

Conversion needs the model's module tree, not its weights: Hub and local models are built as skeletons
(meta tensors) from their config, so converting a 14B model takes seconds and little memory. The weights
are still downloaded (once, into the Hugging Face cache) and checked, so that later commands run offline.
A checkpoint is re-converted (e.g. to another sparsity) with its trained SLA2 parameters; its base weights
are loaded only when it includes them, since they must then be written again. The embedded model becomes
the shipped SLA2 model (calibrated and fine-tuned) where the package has it, unless `untrained`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from sla2cli.checkpoint.format import read_config
from sla2cli.checkpoint.storage import open_converted, write_checkpoint
from sla2cli.embedded.shipped_sla2 import load_shipped_sla2, shipped_sla2_record
from sla2cli.errors import UserError
from sla2cli.files import check_output_folder
from sla2cli.integration.conversion import conversion_info
from sla2cli.integration.recipes import Recipe, get_recipe
from sla2cli.ops.quantization import QUANT_NONE, REQUESTABLE_QUANT_MODES, check_quant
from sla2cli.ops.validation import check_sparsity
from sla2cli.sources.locate import locate
from sla2cli.sources.spec import ModelSpec, parse_model_spec

OUT_SUFFIX = "-sla2"
SHIPPED_WEIGHTS = "shipped SLA2: router and alpha calibrated, base weights fine-tuned at sparsity {sparsity:g}"
UNTRAINED_WEIGHTS = "untrained conversion: identity router, initial alpha, the shipped dense weights"


@dataclass(frozen=True)
class ConvertRequest:
    """What the user asked for: the model (None: the embedded one) and the overrides of its recipe."""

    model: str | None = None
    recipe: str | None = None
    sparsity: float | None = None
    out: Path | None = None
    quant: str | None = None
    overwrite: bool = False
    offline: bool = False
    untrained: bool = False


@dataclass(frozen=True)
class ConvertOutcome:
    """The converted components, the recipe they used, the model as the user named it, where the checkpoint
    went (as given on the command line, or the default), how long it all took, and where the SLA2 parameters
    come from when that needs saying (the embedded model: shipped or untrained)."""

    components: dict[str, nn.Module]
    recipe: Recipe
    source: str
    out: Path
    seconds: float
    weights: str | None = None


def default_out(spec: ModelSpec) -> Path:
    """`<model name>-sla2` in the current folder."""
    if spec.kind == "hub":
        name = spec.repo_id.split("/")[-1]
    elif spec.kind == "local":
        name = spec.path.name
    else:
        name = "embedded"
    return Path(name + OUT_SUFFIX)


def check_quant_option(quant: str) -> str:
    """--quant as the mode name conversion takes, or a one-line error listing the choices."""
    try:
        return check_quant(quant)
    except ValueError:
        raise UserError(f"--quant must be one of {', '.join(REQUESTABLE_QUANT_MODES)}; got {quant!r}") from None


def shipped_components(
    sparsity: float | None, quant: str | None, console: Console
) -> tuple[dict[str, nn.Module], dict] | None:
    """The shipped calibrated and fine-tuned SLA2 model and its record, when the package has it and --sparsity
    allows it (its own sparsity or none); None means the untrained conversion (said when it is a choice)."""
    record = shipped_sla2_record()
    if record is None:
        return None
    if sparsity is not None and sparsity != record["sparsity"]:
        console.print(
            f"note: the shipped SLA2 weights are calibrated and fine-tuned at sparsity {record['sparsity']:g}; at "
            f"--sparsity {sparsity:g} this is the untrained conversion of the dense model (train it with sla2 "
            "calibrate and sla2 finetune)", highlight=False,
        )
        return None
    return {"transformer": load_shipped_sla2(dtype=torch.float32, device="cpu", quant=quant or QUANT_NONE)}, record


def run_convert_job(request: ConvertRequest, console: Console) -> ConvertOutcome:
    """Check every option before any download, convert, write the checkpoint (atomically)."""
    if request.sparsity is not None:
        check_sparsity(request.sparsity, "--sparsity")
    quant = check_quant_option(request.quant) if request.quant is not None else None
    if request.recipe is not None:
        get_recipe(request.recipe)
    spec = parse_model_spec(request.model)
    embedded = spec.kind == "embedded"
    if request.untrained and not embedded:
        raise UserError("--untrained is for the embedded model (run without MODEL); other models always convert "
                        "untrained")
    shown_out = request.out or default_out(spec)
    out = check_output_folder(shown_out, overwrite=request.overwrite)
    if spec.kind == "local" and (out == spec.path or out in spec.path.parents):
        raise UserError(f"--out {shown_out} would replace the input folder {spec.path}; choose another output folder")
    start = time.monotonic()
    location = locate(spec, offline=request.offline)
    include, weights, measurements = False, None, None
    with console.status("building the model and attaching SLA2 processors"):
        shipped = shipped_components(request.sparsity, quant, console) if embedded and not request.untrained else None
        if shipped is not None:
            (components, record), include = shipped, True
            weights, measurements = SHIPPED_WEIGHTS.format(sparsity=record["sparsity"]), record["measurements"]
        else:
            if location.holds_checkpoint():
                if request.recipe is not None:
                    raise UserError("--recipe cannot change the recipe of an SLA2 checkpoint; convert the base model")
                include = read_config(location.root).base_weights == "included"
            elif embedded:
                weights = UNTRAINED_WEIGHTS
            components = open_converted(
                location, weights=include, dtype=torch.float32, device="cpu", sparsity=request.sparsity, quant=quant,
                recipe=request.recipe,
            )
    with console.status(f"writing {shown_out}"):
        write_checkpoint(
            out, components, include_base_weights=include, overwrite=request.overwrite, measurements=measurements
        )
    used = get_recipe(conversion_info(next(iter(components.values()))).recipe)
    return ConvertOutcome(components, used, spec.describe(), shown_out, time.monotonic() - start, weights)
