"""Speedup over FA2 against sparsity, one panel per shape and mode, one line per provider.

Dense providers do not depend on sparsity and appear as horizontal dashed lines; routing alone is left
out. Where FA2 was not measured (a CPU run) the panels show median time instead, and their axis says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sla2cli.bench.providers import ROUTING, get_provider, provider_names
from sla2cli.bench.records import OK, Measurement
from sla2cli.files import atomic_path
from sla2cli.ops.geometry import sparsity_is_rounded

if TYPE_CHECKING:  # matplotlib loads only when a plot is asked for
    from matplotlib.figure import Figure


def _is_routing(name: str) -> bool:
    """Routing alone is a part of SLA2, not an attention; its 'speedup' would only flatten the plot."""
    return name in provider_names() and get_provider(name).kind == ROUTING


def _label(name: str) -> str:
    partial = get_provider(name).partial if name in provider_names() else ""
    return f"{name} ({partial})" if partial else name


def _panels(measurements: list[Measurement]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((m.shape, m.mode) for m in measurements if m.status == OK))


def _position(m: Measurement) -> float:
    """Where a row sits on the sparsity axis: the sparsity that really ran (whole key blocks)."""
    return m.effective_sparsity if m.effective_sparsity is not None else (m.sparsity or 0.0)


def _rounding_caption(rows: list[Measurement]) -> str:
    """'requested 0.9, 0.97 -> 0.938 (k_sel 1 of 16)', a line per point where requested values were rounded."""
    groups: dict[tuple[float, int | None, int | None], list[float]] = {}
    for m in rows:
        if m.sparsity is not None and m.key_blocks is not None and sparsity_is_rounded(m.key_blocks, m.sparsity):
            requested = groups.setdefault((_position(m), m.k_sel, m.key_blocks), [])
            if m.sparsity not in requested:
                requested.append(m.sparsity)
    return "\n".join(
        f"requested {', '.join(f'{r:g}' for r in sorted(requested))} -> {x:.3f} (k_sel {k_sel} of {blocks})"
        for (x, k_sel, blocks), requested in sorted(groups.items())
    )


def speedup_figure(measurements: list[Measurement], cpu_numbers: bool) -> Figure:
    """The figure `write_plot` saves. Points sit at the effective sparsity; where a requested value was
    rounded to whole key blocks, the panel's caption and tick labels say to which k_sel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [
        m for m in measurements if m.status == OK and m.median_ms is not None and not _is_routing(m.provider)
    ]
    use_speedup = any(m.speedup_vs_fa2 is not None for m in timed)
    panels = _panels(timed) or [("no timed rows", "")]
    sparsities = sorted({_position(m) for m in timed if m.sparsity is not None}) or [0.0, 1.0]
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(m.provider for m in timed))}
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    for axis, (shape, mode) in zip(axes[0], panels, strict=True):
        rows = [m for m in timed if (m.shape, m.mode) == (shape, mode)]
        for provider in dict.fromkeys(m.provider for m in rows):
            mine = sorted((m for m in rows if m.provider == provider), key=lambda m: (_position(m), m.sparsity or 0.0))
            values = [m.speedup_vs_fa2 if use_speedup else m.median_ms for m in mine]
            if any(v is None for v in values):
                continue
            style = {"label": _label(provider), "color": colours[provider]}
            if mine[0].sparsity is None:
                axis.axhline(values[0], linestyle="--", linewidth=1.2, **style)
            else:
                axis.plot([_position(m) for m in mine], values, marker="o", **style)
        caption = _rounding_caption(rows)
        axis.set_title(f"{shape} {mode}" + (f"\n{caption}" if caption else ""), fontsize=10 if caption else None)
        if caption:
            ticks = dict.fromkeys((_position(m), m.k_sel) for m in rows if m.sparsity is not None)
            axis.set_xticks([x for x, _ in ticks], [f"{x:.3f}\nk_sel {k_sel}" for x, k_sel in ticks])
        axis.set_xlabel("effective sparsity (whole key blocks)" if caption else "sparsity")
        axis.set_xlim(min(sparsities) - 0.01, max(sparsities) + 0.01)
        axis.set_ylabel("speedup vs FA2 (x)" if use_speedup else "median time (ms)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if cpu_numbers:
        figure.suptitle("CPU run: not GPU numbers", color="darkred")
    figure.tight_layout()
    return figure


def write_plot(measurements: list[Measurement], path: Path, cpu_numbers: bool) -> None:
    """Speedup (or median time) against sparsity as a PNG, written atomically."""
    import matplotlib.pyplot as plt

    figure = speedup_figure(measurements, cpu_numbers)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
