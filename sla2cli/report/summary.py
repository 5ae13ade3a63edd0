"""Averaging of per-call metrics into one row per (layer, head), and summaries per layer and per model.

Why running sums: the report sees every converted layer once per input and timestep; keeping only sums
and counts means memory does not grow with the number of inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sla2cli.ops.geometry import ROUNDING_NOTE, describe_rounding, sparsity_is_rounded
from sla2cli.report.metrics import METRIC_NAMES

Row = dict[str, "str | int | float"]
INTEGER_METRICS = ("k_sel", "key_blocks")


@dataclass
class _LayerSums:
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


class MetricAccumulator:
    """Running nan-aware means of (B, H) metric tensors, per layer and head.

    A metric that is undefined for one call (NaN, e.g. a correlation over one query block) is left out
    of that head's mean instead of poisoning it.
    """

    def __init__(self) -> None:
        self._layers: dict[str, _LayerSums] = {}

    def add(self, layer: str, values: dict[str, torch.Tensor]) -> None:
        """Add one call's metrics; each value is (B, H) and every batch element counts as one sample."""
        sums = self._layers.setdefault(layer, _LayerSums())
        for name, value in values.items():
            value = value.detach().to(device="cpu", dtype=torch.float64).reshape(-1, value.shape[-1])
            defined = ~torch.isnan(value)
            total = torch.where(defined, value, torch.zeros_like(value)).sum(dim=0)
            count = defined.sum(dim=0).to(torch.float64)
            if name in sums.sums:
                sums.sums[name] += total
                sums.counts[name] += count
            else:
                sums.sums[name], sums.counts[name] = total, count

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    def rows(self) -> list[Row]:
        """One row per (layer, head), in layer order then head order; NaN where nothing was defined."""
        rows: list[Row] = []
        for layer, sums in self._layers.items():
            heads = next(iter(sums.sums.values())).shape[0]
            samples = int(sums.counts["sparsity"][0].item()) if "sparsity" in sums.counts else 0
            for head in range(heads):
                row: Row = {"layer": layer, "head": head, "samples": samples}
                for name in METRIC_NAMES:
                    if name not in sums.sums:
                        continue
                    count = sums.counts[name][head].item()
                    row[name] = sums.sums[name][head].item() / count if count else math.nan
                for name in INTEGER_METRICS:
                    if name in row and float(row[name]).is_integer():
                        row[name] = int(row[name])
                rows.append(row)
        return rows


LABEL_COLUMNS = ("component", "layer", "module")


def layer_key(row: Row) -> tuple[str, str]:
    """What identifies a layer across components: (component, layer)."""
    return str(row.get("component", "")), str(row["layer"])


def layer_name(row: Row) -> str:
    """A short human name: the module (prefixed by its component when it is not the main one)."""
    name = str(row.get("module", row["layer"]))
    component = str(row.get("component", ""))
    return name if component in ("", "transformer") else f"{component}.{name}"


def _nan_mean(values: list[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan


def _metric_names(rows: list[Row]) -> list[str]:
    return [name for name in METRIC_NAMES if rows and name in rows[0]]


def summarize_layers(rows: list[Row]) -> list[Row]:
    """One row per layer: every metric averaged over heads, plus the worst head's error."""
    by_layer: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by_layer.setdefault(layer_key(row), []).append(row)
    summaries = []
    for layer_rows in by_layer.values():
        first = layer_rows[0]
        summary: Row = {key: first[key] for key in LABEL_COLUMNS if key in first}
        summary["heads"] = len(layer_rows)
        for name in _metric_names(layer_rows):
            summary[name] = _nan_mean([float(row[name]) for row in layer_rows])
        errors = [float(row["rel_l2_error"]) for row in layer_rows if "rel_l2_error" in row]
        summary["worst_head_rel_l2_error"] = max(errors) if errors else math.nan
        summaries.append(summary)
    return summaries


def summarize_model(rows: list[Row]) -> Row:
    """Every metric averaged over all (layer, head) rows."""
    summary: Row = {
        "layers": len({layer_key(row) for row in rows}),
        "heads": len(rows),
    }
    for name in _metric_names(rows):
        summary[name] = _nan_mean([float(row[name]) for row in rows])
    return summary


def worst_layers(layer_rows: list[Row], count: int) -> list[str]:
    """`layer_name`s of the `count` layers with the largest mean relative error (NaN ranks last)."""

    def error(row: Row) -> float:
        value = float(row.get("rel_l2_error", math.nan))
        return -math.inf if math.isnan(value) else value

    ranked = sorted(layer_rows, key=error, reverse=True)
    return [layer_name(row) for row in ranked[:count]]


def rounded_levels(rows: list[Row]) -> list[tuple[int, float]]:
    """(key blocks, requested sparsity) wherever the requested sparsity was visibly rounded to whole
    key blocks, in row order, once each."""
    levels: dict[tuple[int, float], None] = {}
    for row in rows:
        if "key_blocks" not in row or "requested_sparsity" not in row:
            continue
        blocks, requested = round(float(row["key_blocks"])), round(float(row["requested_sparsity"]), 6)
        if sparsity_is_rounded(blocks, requested):
            levels[(blocks, requested)] = None
    return list(levels)


def rounding_note(rows: list[Row]) -> str | None:
    """The report's one line on rounding: '... 0.97 keeps 3 of 128 key blocks (effective_sparsity 0.977)'."""
    levels = rounded_levels(rows)
    if not levels:
        return None
    return f"{ROUNDING_NOTE}: {', '.join(describe_rounding(blocks, requested) for blocks, requested in levels)}"
