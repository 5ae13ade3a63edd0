"""What `sla2 convert` prints: the recipes table (--list-recipes) and the summary of a conversion."""

from __future__ import annotations

from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

from sla2cli.checkpoint.storage import flop_estimate
from sla2cli.integration.conversion import sla2_layers
from sla2cli.integration.recipes import Recipe, all_recipes
from sla2cli.module import SLA2Attention
from sla2cli.ops.geometry import describe_rounding, num_blocks, sparsity_is_rounded
from sla2cli.ops.quantization import QUANT_AUTO, describe_auto_quant

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


def format_flops(flops: int) -> str:
    """A FLOP count in the largest unit that keeps it at 1 or more (2.43 TFLOP)."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:,} FLOP"


def sparsity_summary(sparsity: float, key_blocks: int) -> str:
    """The sparsity, and what it rounds to in whole key blocks at the default resolution where that shows."""
    if not sparsity_is_rounded(key_blocks, sparsity):
        return f"{sparsity:g}"
    return f"{describe_rounding(key_blocks, sparsity)} at the default resolution"


def quant_summary(layer: SLA2Attention, tokens: int) -> str:
    """The layers' mode; for `auto`, what it runs on this machine's GPU at the default resolution (forward)."""
    if layer.quant != QUANT_AUTO:
        return layer.quant
    line = describe_auto_quant((1, layer.num_heads, tokens, layer.head_dim), training=False)
    return f"{line}; resolved per call, at the default resolution here" if torch.cuda.is_available() else line


def summary_table(
    components: dict[str, nn.Module], recipe: Recipe, source: str, out: Path, seconds: float, weights: str | None = None
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
        ("sparsity", sparsity_summary(any_layer.sparsity, num_blocks(estimate.length, any_layer.block_k))),
        ("sparse-branch quantisation", quant_summary(any_layer, estimate.length)),
        ("blocks (query, key)", f"{any_layer.block_q}, {any_layer.block_k}"),
        ("default resolution", f"{recipe.default_resolution}: {size.width}x{size.height}, {size.frames} frames, "
                               f"{estimate.length:,} tokens"),
        ("self-attention FLOPs", f"{format_flops(estimate.dense_flops)} dense -> "
                                 f"{format_flops(estimate.converted_flops)} SLA2"),
        ("attention FLOP reduction", f"{estimate.reduction:.1f}x"),
        ("checkpoint", str(out)),
        ("time", f"{seconds:.1f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
