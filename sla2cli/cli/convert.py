"""`sla2 convert`: swap a model's self-attention for SLA2 and write a checkpoint folder.

Conversion needs the model's module tree, not its weights: Hub and local models are built as skeletons
(meta tensors) from their config, so converting a 14B model takes seconds and little memory. The weights
are still downloaded (once, into the Hugging Face cache) and checked, so that later commands run offline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from sla2cli.checkpoint.format import read_config
from sla2cli.checkpoint.storage import flop_estimate, open_checkpoint, write_checkpoint
from sla2cli.embedded.shipped_sla2 import load_shipped_sla2, shipped_sla2_record
from sla2cli.errors import UserError
from sla2cli.files import check_output_folder
from sla2cli.integration.conversion import conversion_info, convert_with_recipe, sla2_layers
from sla2cli.integration.recipes import Recipe, all_recipes, get_recipe
from sla2cli.ops.geometry import describe_rounding, num_blocks, sparsity_is_rounded
from sla2cli.ops.quantization import QUANT_NONE, REQUESTABLE_QUANT_MODES, check_quant
from sla2cli.ops.validation import check_sparsity
from sla2cli.sources.locate import ModelLocation, base_source, build_components, locate
from sla2cli.sources.spec import ModelSpec, parse_model_spec

QUANT_HELP = (
    "Low-bit forward of the sparse (exact) branch: int8 (INT8 Q K^T, P V in the model's own precision; "
    "GPUs of compute capability 8.0+), int8-fp8 (INT8 Q K^T, FP8 P V: no faster on an H100 and about "
    "3.7% off on random inputs; 8.9+), none, or auto (int8 where the GPU runs it). The backward "
    "stays unquantised (straight through), so fine-tuning with it is quantisation-aware. Default: "
    "none, or the checkpoint's own when re-converting one."
)

OUT_SUFFIX = "-sla2"
SHIPPED = "(ships with sla2)"  # the hub id cell of a recipe whose model comes with the package
UNLIMITED_WIDTH = 10_000  # to measure the width a table needs to show every cell whole


RECIPE_COLUMNS = ("recipe", "model", "hub id", "class", "components", "sparsity", "blocks q/k",
                  "default resolution", "tokens", "dense layers")


def _recipe_cells(recipe: Recipe) -> dict[str, str]:
    """One recipe's values, by column."""
    size = recipe.resolution()
    values = (
        recipe.name,
        recipe.title,
        recipe.hub_id or SHIPPED,
        recipe.model_class,
        ", ".join(recipe.components),
        f"{recipe.sparsity:g}",
        f"{recipe.block_q}/{recipe.block_k}",
        f"{recipe.default_resolution}: {size.width}x{size.height}, {size.frames} frames",
        f"{recipe.default_tokens():,}",
        ", ".join(map(str, recipe.dense_layers)) or "none",
    )
    return dict(zip(RECIPE_COLUMNS, values, strict=True))


def _wide_recipes_table(rows: list[dict[str, str]]) -> Table:
    table = Table(title="SLA2 recipes", title_justify="left")
    for column in RECIPE_COLUMNS:
        table.add_column(column, justify="right" if column in ("sparsity", "tokens") else "left")
    for row in rows:
        table.add_row(*row.values())
    return table


def _narrow_recipes_table(rows: list[dict[str, str]]) -> Table:
    """Name first and never cut (it is what --recipe takes); everything else wraps beside it."""
    table = Table(title="SLA2 recipes", title_justify="left", box=box.SIMPLE_HEAD, show_lines=True)
    table.add_column("recipe", no_wrap=True, style="bold")
    table.add_column("model and defaults", overflow="fold")
    for row in rows:
        details = "\n".join((
            row["model"] if row["hub id"] == SHIPPED else f"{row['model']}: {row['hub id']}",
            f"{row['class']} ({row['components']})",
            f"sparsity {row['sparsity']}, blocks q/k {row['blocks q/k']}, dense layers: {row['dense layers']}",
            f"{row['default resolution']} ({row['tokens']} tokens)",
        ))
        table.add_row(row["recipe"], details)
    return table


def recipes_table(console: Console) -> Table:
    """Every shipped recipe, one row each: all columns where the console is wide enough, else names
    first with the details wrapped beside them."""
    rows = [_recipe_cells(recipe) for recipe in all_recipes().values()]
    wide = _wide_recipes_table(rows)
    unlimited = console.options.update_width(UNLIMITED_WIDTH)
    if console.measure(wide, options=unlimited).maximum <= console.width:
        return wide
    return _narrow_recipes_table(rows)


def default_out(spec: ModelSpec) -> Path:
    """`<model name>-sla2` in the current folder."""
    if spec.kind == "hub":
        name = spec.repo_id.split("/")[-1]
    elif spec.kind == "local":
        name = spec.path.name
    else:
        name = "embedded"
    return Path(name + OUT_SUFFIX)


def _check_quant_option(quant: str) -> str:
    try:
        return check_quant(quant)
    except ValueError:
        raise UserError(f"--quant must be one of {', '.join(REQUESTABLE_QUANT_MODES)}; got {quant!r}") from None


def _format_flops(flops: int) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:,} FLOP"


def _sparsity_summary(sparsity: float, key_blocks: int) -> str:
    """The sparsity, and what it rounds to in whole key blocks at the default resolution where that shows."""
    if not sparsity_is_rounded(key_blocks, sparsity):
        return f"{sparsity:g}"
    return f"{describe_rounding(key_blocks, sparsity)} at the default resolution"


def summary_table(
    components: dict, recipe: Recipe, source: str, out: Path, seconds: float, weights: str | None = None
) -> Table:
    """Layers converted, parameters added and the attention FLOP reduction at the default resolution;
    `weights` says where the SLA2 parameters (and base weights) come from when that needs saying."""
    layers = {name: sla2_layers(model) for name, model in components.items()}
    any_layer = next(layer for per_model in layers.values() for layer in per_model.values())
    added = sum(p.numel() for per_model in layers.values() for layer in per_model.values() for p in layer.parameters())
    estimate = flop_estimate(components, recipe)
    size = recipe.resolution()
    converted = ", ".join(f"{len(per_model)} in {name}" for name, per_model in layers.items())
    table = Table(title="sla2 convert", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = [
        ("model", source),
        *([("weights", weights)] if weights else []),
        ("recipe", f"{recipe.name} ({recipe.title})"),
        ("self-attention layers converted", converted),
        ("left on dense attention", ", ".join([*recipe.attention.kept_dense, "calls with a mask"])),
        ("layers kept dense by the recipe", ", ".join(map(str, recipe.dense_layers)) or "none"),
        ("parameters added", f"{added:,} ({added * 4 / 1e6:.2f} MB float32)"),
        ("sparsity", _sparsity_summary(any_layer.sparsity, num_blocks(estimate.length, any_layer.block_k))),
        ("sparse-branch quantisation", any_layer.quant),
        ("blocks (query, key)", f"{any_layer.block_q}, {any_layer.block_k}"),
        ("default resolution", f"{recipe.default_resolution}: {size.width}x{size.height}, {size.frames} frames, "
                               f"{estimate.length:,} tokens"),
        ("self-attention FLOPs", f"{_format_flops(estimate.dense_flops)} dense -> "
                                 f"{_format_flops(estimate.converted_flops)} SLA2"),
        ("attention FLOP reduction", f"{estimate.reduction:.1f}x"),
        ("checkpoint", str(out)),
        ("time", f"{seconds:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _convert_base_model(
    location: ModelLocation, recipe: str | None, sparsity: float | None, quant: str | None
) -> dict:
    """Skeletons of the model's transformers with SLA2 processors at the recipe's (or given) settings."""
    source = base_source(location, recipe_name=recipe)
    components = build_components(source, weights=False, dtype=torch.float32, device="cpu")
    convert_with_recipe(components, source.recipe, base=source.base, sparsity=sparsity, quant=quant or QUANT_NONE)
    return components


SHIPPED_WEIGHTS = "shipped SLA2: router and alpha calibrated, base weights fine-tuned at sparsity {sparsity:g}"
UNTRAINED_WEIGHTS = "untrained conversion: identity router, initial alpha, the shipped dense weights"


def _shipped_components(sparsity: float | None, quant: str | None, console: Console) -> tuple[dict, dict] | None:
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


def _reconvert_checkpoint(
    location: ModelLocation, sparsity: float | None, quant: str | None
) -> tuple[dict, bool]:
    """An existing checkpoint's components (trained SLA2 parameters kept), and whether it includes base
    weights; those must then be loaded to be written again."""
    include = read_config(location.root).base_weights == "included"
    components, _ = open_checkpoint(
        location, weights=include, dtype=torch.float32, device="cpu", sparsity=sparsity, quant=quant
    )
    return components, include


def convert_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Hub id org/name or org/name@revision, a local diffusers folder, or an SLA2 checkpoint to re-convert "
            "(e.g. with another sparsity). Default: the embedded model that ships with sla2.",
            show_default=False,
        ),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(help="Recipe to use (see --list-recipes). Default: found from the Hub id or the architecture."),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(help="Share of key blocks per query block sent to the linear branch, in [0, 1). "
                     "Default: the recipe's (0.97).", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Checkpoint folder to write. Default: ./<model name>-sla2.", show_default=False),
    ] = None,
    quant: Annotated[
        str | None,
        typer.Option(metavar="|".join(REQUESTABLE_QUANT_MODES), help=QUANT_HELP, show_default=False),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace --out if it exists and holds only an sla2 checkpoint (or nothing); "
                     "a folder with other files is never replaced."),
    ] = False,
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Use only the Hugging Face cache, never the network (like HF_HUB_OFFLINE=1)."),
    ] = False,
    untrained: Annotated[
        bool,
        typer.Option("--untrained", help="Embedded model only: convert the shipped dense model with an untrained "
                     "router and alpha (the start of sla2 calibrate and sla2 finetune) instead of the shipped SLA2 "
                     "model, whose router and alpha are calibrated and base weights fine-tuned at 0.97."),
    ] = False,
    list_recipes: Annotated[bool, typer.Option("--list-recipes", help="Show the recipes and exit.")] = False,
) -> None:
    """Swap the self-attention of a video diffusion transformer for SLA2 and write a checkpoint."""
    console = Console()
    if list_recipes:
        console.print(recipes_table(console))
        return
    if sparsity is not None:
        check_sparsity(sparsity, "--sparsity")
    if quant is not None:
        quant = _check_quant_option(quant)
    if recipe is not None:
        get_recipe(recipe)
    spec = parse_model_spec(model)
    if untrained and spec.kind != "embedded":
        raise UserError("--untrained is for the embedded model (run without MODEL); other models always convert "
                        "untrained")
    shown_out = out or default_out(spec)
    out = check_output_folder(shown_out, overwrite=overwrite)
    if spec.kind == "local" and (out == spec.path or out in spec.path.parents):
        raise UserError(f"--out {shown_out} would replace the input folder {spec.path}; choose another output folder")
    start = time.monotonic()
    location = locate(spec, offline=offline)
    weights, measurements = None, None
    with console.status("building the model and attaching SLA2 processors"):
        shipped = _shipped_components(sparsity, quant, console) if spec.kind == "embedded" and not untrained else None
        if shipped is not None:
            (components, record), include = shipped, True
            weights, measurements = SHIPPED_WEIGHTS.format(sparsity=record["sparsity"]), record["measurements"]
        elif location.root is not None and location.contents().is_checkpoint:
            if recipe is not None:
                raise UserError("--recipe cannot change the recipe of an SLA2 checkpoint; convert the base model")
            components, include = _reconvert_checkpoint(location, sparsity, quant)
        else:
            components, include = _convert_base_model(location, recipe, sparsity, quant), False
            weights = UNTRAINED_WEIGHTS if spec.kind == "embedded" else None
    with console.status(f"writing {shown_out}"):
        write_checkpoint(out, components, include_base_weights=include, overwrite=overwrite, measurements=measurements)
    used = get_recipe(conversion_info(next(iter(components.values()))).recipe)
    console.print(summary_table(components, used, spec.describe(), shown_out, time.monotonic() - start, weights))


def register(app: typer.Typer) -> None:
    """Add `convert` to the app."""
    app.command("convert", no_args_is_help=False)(convert_command)
