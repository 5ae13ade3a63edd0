"""Report output: rich table, CSV and JSON (one row per layer and head), error heatmap PNG, sample GIF.

Every file is written under a temporary name in the target folder and renamed when complete, so a
reader never sees half a file and an interrupted run leaves the previous file intact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table

from sla2cli.files import atomic_path, write_json_file
from sla2cli.report.summary import Row, layer_name, rounded_levels, worst_layers

if TYPE_CHECKING:  # PIL loads only when a GIF is asked for
    from PIL.Image import Image as PilImage
    from PIL.ImageFont import FreeTypeFont, ImageFont

    PilFont = FreeTypeFont | ImageFont

ALWAYS, WIDE, ROUNDED = "always", "wide", "rounded"
# (metric, header, format, when shown: always, on wide terminals, or on wide terminals where the requested
# sparsity was rounded to whole key blocks; the note under the table says that on any terminal)
TABLE_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("requested_sparsity", "requested", "{:.3f}", ROUNDED),
    ("effective_sparsity", "sparsity", "{:.3f}", ALWAYS),
    ("k_sel", "k_sel", "{:.0f}", WIDE),
    ("flop_reduction", "FLOPs /", "{:.1f}x", WIDE),
    ("captured_mass", "mass", "{:.3f}", ALWAYS),
    ("captured_mass_min", "mass min", "{:.3f}", WIDE),
    ("router_recall", "recall", "{:.3f}", ALWAYS),
    ("alpha_mean", "alpha", "{:.3f}", ALWAYS),
    ("alpha_mass_corr", "alpha~mass", "{:.2f}", WIDE),
    ("rel_l2_error", "rel L2", "{:.4f}", ALWAYS),
    ("cosine", "cosine", "{:.4f}", WIDE),
    ("heuristic_rel_l2_error", "heur. rel L2", "{:.4f}", ALWAYS),
    ("lowbit_rel_l2_vs_sla2", "low-bit vs SLA2", "{:.4f}", WIDE),
)
WIDE_CONSOLE = 130


def _format(value: Any, pattern: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return pattern.format(value)


def highlight_count(layers: int) -> int:
    """How many worst layers to mark: one in four, at least one, at most three (none for one layer)."""
    return 0 if layers < 2 else min(3, max(1, layers // 4))


def render_table(console: Console, layer_rows: list[Row], model_row: Row, *, title: str = "") -> None:
    """Per-layer summary (heads averaged) with the worst layers by relative error in red.

    Its sparsity column is the effective one (whole key blocks); where that differs from the requested
    sparsity, wide terminals show the requested value beside it (and k_sel, as always)."""
    worst = set(worst_layers(layer_rows, highlight_count(len(layer_rows))))
    wide = console.width >= WIDE_CONSOLE
    rounded = bool(rounded_levels(layer_rows))
    shown = {ALWAYS: True, WIDE: wide, ROUNDED: rounded and wide}
    present = [
        (name, header, pattern)
        for name, header, pattern, when in TABLE_COLUMNS
        if layer_rows and name in layer_rows[0] and shown[when]
    ]
    table = Table(title=title or None, header_style="bold")
    table.add_column("layer", overflow="fold")
    for _, header, _ in present:
        table.add_column(header, justify="right", no_wrap=True)
    for row in layer_rows:
        cells = [_format(row[name], pattern) for name, _, pattern in present]
        name = layer_name(row)
        table.add_row(name, *cells, style="bold red" if name in worst else None)
    table.add_section()
    model_cells = [_format(model_row.get(name, math.nan), pattern) for name, _, pattern in present]
    table.add_row("model", *model_cells, style="bold")
    console.print(table)
    if worst:
        names = ", ".join(layer_name(row) for row in layer_rows if layer_name(row) in worst)
        console.print(f"[red]worst layers by relative error:[/] {names}", highlight=False)


def model_csv_row(model_row: Row, quality: Row) -> Row:
    """The CSV's last row: layer `model`, the model means of the metrics and the model-level figures."""
    means = {key: value for key, value in model_row.items() if key not in ("layers", "heads")}
    return {"layer": "model", **means, **quality}


def write_csv(rows: list[Row], path: Path, model_row: Row | None = None) -> None:
    """One row per (layer, head), snake_case columns, NaN as an empty cell; then `model_row`, if given
    (its extra columns, e.g. output_rel_l2_error, come after the per-head ones and are empty above it)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if model_row is not None:  # as objects, so that the head rows' integer columns stay integers
        frame = pd.concat([frame.astype(object), pd.DataFrame([model_row]).astype(object)], ignore_index=True)
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def render_quality(console: Console, quality: Row) -> None:
    """One line with the model-level figures: output error against dense, validation losses if measured;
    for an embedded model with weights of its own, a table beside the shipped dense model and the untrained
    conversion instead (its own weights run dense are no baseline: they were trained for SLA2)."""
    if not quality:
        return
    text = f"model output vs dense attention: rel L2 {quality['output_rel_l2_error']:.4f}"
    if "val_loss" in quality and "shipped_dense_val_loss" not in quality:
        text += (f"; validation loss {quality['val_loss']:.4f} vs dense {quality['dense_val_loss']:.4f} "
                 f"({quality['val_loss_ratio']:.2f}x)")
    console.print(text, highlight=False)
    if "shipped_dense_val_loss" in quality:
        render_reference_table(console, quality)


def render_reference_table(console: Console, quality: Row) -> None:
    """Validation loss of this model beside the shipped dense model (the baseline) and the untrained
    conversion at the same sparsity (the contrast), on the report's validation clips."""
    baseline = quality["shipped_dense_val_loss"]
    table = Table(title="model quality: validation loss (velocity MSE) on the report's validation clips",
                  title_justify="left", header_style="bold")
    table.add_column("model")
    table.add_column("val loss", justify="right")
    table.add_column("vs dense", justify="right")
    rows = (
        ("dense: the shipped embedded model, full attention", baseline),
        ("SLA2, untrained conversion of it (same sparsity)", quality["untrained_val_loss"]),
        ("this model (SLA2 with its own trained weights)", quality["val_loss"]),
        ("this model's weights with full attention", quality["dense_val_loss"]),
    )
    for index, (name, value) in enumerate(rows):
        table.add_row(name, _format(value, "{:.4f}"), _format(value / baseline if baseline > 0 else math.nan,
                                                                 "{:.2f}x"),
                      style="bold" if index == 2 else None)
    console.print(table)


def write_json(document: dict[str, Any], path: Path) -> None:
    """The whole report as JSON; non-finite numbers become null (strict JSON has no NaN)."""
    write_json_file(path, document)


def error_grid(rows: list[Row], metric: str) -> tuple[list[str], torch.Tensor]:
    """(layer names, layers x heads tensor of `metric`) from per-(layer, head) rows, in model order."""
    layers: list[str] = []
    for row in rows:
        if layer_name(row) not in layers:
            layers.append(layer_name(row))
    heads = 1 + max(int(row["head"]) for row in rows)
    grid = torch.full((len(layers), heads), math.nan, dtype=torch.float64)
    for row in rows:
        grid[layers.index(layer_name(row)), int(row["head"])] = float(row[metric])
    return layers, grid


def write_heatmap(rows: list[Row], path: Path, *, title: str = "") -> None:
    """PNG of the relative L2 error per layer (rows) and head (columns): SLA2 beside the heuristic router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [name for name in ("rel_l2_error", "heuristic_rel_l2_error") if name in rows[0]]
    grids = [error_grid(rows, name) for name in metrics]
    layers = grids[0][0]
    top = max(float(torch.nan_to_num(grid, nan=0.0).max()) for _, grid in grids) or 1.0
    height = min(40.0, 1.5 + 0.25 * len(layers))
    figure, axes = plt.subplots(
        1, len(metrics), figsize=(4.0 * len(metrics) + 1.5, height), squeeze=False, layout="constrained"
    )
    for axis, name, (_, grid) in zip(axes[0], metrics, grids, strict=True):
        image = axis.imshow(
            grid.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=top, interpolation="nearest"
        )
        axis.set_title(name)
        axis.set_xlabel("head")
        axis.set_xticks(range(grid.shape[1]))
        axis.set_yticks(range(len(layers)))
        axis.set_yticklabels(layers if axis is axes[0][0] else [], fontsize=8 if len(layers) <= 40 else 5)
    figure.colorbar(image, ax=list(axes[0]), label="relative L2 error vs full attention")
    if title:
        figure.suptitle(title)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120)
    plt.close(figure)


def latents_to_rgb(video: torch.Tensor, low: float, high: float, scale: int) -> list[torch.Tensor]:
    """(C, F, H, W) latents -> F uint8 frames (H * scale, W * scale, 3): first three channels as RGB."""
    channels = video.float()[:3]
    if channels.shape[0] < 3:
        channels = torch.cat([channels, channels[-1:].expand(3 - channels.shape[0], *channels.shape[1:])])
    normalised = ((channels - low) / max(high - low, 1e-6)).clamp(0.0, 1.0)
    frames = (normalised * 255.0).round().to(torch.uint8).permute(1, 2, 3, 0)  # (F, H, W, 3)
    return [frame.repeat_interleave(scale, 0).repeat_interleave(scale, 1) for frame in frames]


MIN_HALF_WIDTH = 160  # pixels: room for a label such as "SLA2, sparsity 0.97" above each half
LABEL_FONT_SIZES = (14, 12, 10, 8)


def _label_font(text: str, width: int) -> PilFont:
    """The largest default font whose rendering of `text` fits in `width` pixels."""
    from PIL import ImageFont

    for size in LABEL_FONT_SIZES:
        font = ImageFont.load_default(size=size)
        if font.getlength(text) <= width - 4:
            return font
    return font


def labelled_side_by_side(left: PilImage, right: PilImage, labels: tuple[str, str]) -> PilImage:
    """One RGB frame: `left` and `right` (PIL images of one size) side by side under a white strip that
    names each half (so a GIF passed around on its own still says which side is which)."""
    from PIL import Image, ImageDraw

    width, height = left.size
    gap = max(4, width // 32)
    fonts = [_label_font(text, width) for text in labels]
    strip = max(font.getbbox("Ag")[3] for font in fonts) + 8
    frame = Image.new("RGB", (2 * width + gap, strip + height), "white")
    draw = ImageDraw.Draw(frame)
    for index, (image, text, font) in enumerate(zip((left, right), labels, fonts, strict=True)):
        x = index * (width + gap)
        frame.paste(image, (x, strip))
        draw.text((x + width / 2, strip / 2), text, fill="black", font=font, anchor="mm")
    return frame


def write_side_by_side_gif(
    left: torch.Tensor, right: torch.Tensor, path: Path, *, labels: tuple[str, str] = ("dense", "SLA2"),
    scale: int = 4, frame_ms: int = 150,
) -> None:
    """Animated GIF with `left` and `right` (C, F, H, W) side by side, one shared colour range, each half
    labelled in the image. Small latents are enlarged (nearest neighbour) so that the labels fit."""
    from PIL import Image

    scale = max(scale, math.ceil(MIN_HALF_WIDTH / left.shape[-1]))
    both = torch.stack([left.float(), right.float()])
    sample = both.flatten()[:: max(1, both.numel() // 1_000_000)]
    low, high = torch.quantile(sample, torch.tensor([0.01, 0.99]))
    left_frames = latents_to_rgb(left, low.item(), high.item(), scale)
    right_frames = latents_to_rgb(right, low.item(), high.item(), scale)
    images = [
        labelled_side_by_side(Image.fromarray(a.numpy()), Image.fromarray(b.numpy()), labels)
        for a, b in zip(left_frames, right_frames, strict=True)
    ]
    with atomic_path(path) as temporary:
        images[0].save(
            temporary, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0
        )


def report_document(settings: dict[str, Any], model_row: Row, layer_rows: list[Row], rows: list[Row],
                    warnings: Sequence[str], notes: Sequence[str] = (), quality: Row | None = None) -> dict[str, Any]:
    """The JSON report: settings, warnings, notes, model summary, model-level quality against dense, per-layer
    summary, one row per (layer, head)."""
    return {
        "settings": settings,
        "warnings": list(warnings),
        "notes": list(notes),
        "model": model_row,
        "model_quality": dict(quality or {}),
        "layers": layer_rows,
        "rows": rows,
    }
