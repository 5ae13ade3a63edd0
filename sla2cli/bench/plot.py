"""Speedup over FA2 against sparsity, one panel per shape and mode, one line per provider.

Dense providers do not depend on sparsity and appear as horizontal dashed lines; routing alone is left
out. Where FA2 was not measured (a CPU run) the panels show median time instead, and their axis says so.
"""

from __future__ import annotations

from pathlib import Path

from sla2cli.bench.providers import ROUTING, get_provider, provider_names
from sla2cli.bench.records import OK, Measurement
from sla2cli.models.atomic import atomic_path


def _is_routing(name: str) -> bool:
    """Routing alone is a part of SLA2, not an attention; its 'speedup' would only flatten the plot."""
    return name in provider_names() and get_provider(name).kind == ROUTING


def _label(name: str) -> str:
    partial = get_provider(name).partial if name in provider_names() else ""
    return f"{name} ({partial})" if partial else name


def _panels(measurements: list[Measurement]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((m.shape, m.mode) for m in measurements if m.status == OK))


def write_plot(measurements: list[Measurement], path: Path, cpu_numbers: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [
        m for m in measurements if m.status == OK and m.median_ms is not None and not _is_routing(m.provider)
    ]
    use_speedup = any(m.speedup_vs_fa2 is not None for m in timed)
    panels = _panels(timed) or [("no timed rows", "")]
    sparsities = sorted({m.sparsity for m in timed if m.sparsity is not None}) or [0.0, 1.0]
    colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(m.provider for m in timed))}
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, (shape, mode) in zip(axes[0], panels, strict=True):
        rows = [m for m in timed if (m.shape, m.mode) == (shape, mode)]
        for provider in dict.fromkeys(m.provider for m in rows):
            mine = sorted((m for m in rows if m.provider == provider), key=lambda m: m.sparsity or 0.0)
            values = [m.speedup_vs_fa2 if use_speedup else m.median_ms for m in mine]
            if any(v is None for v in values):
                continue
            style = {"label": _label(provider), "color": colours[provider]}
            if mine[0].sparsity is None:
                axis.axhline(values[0], linestyle="--", linewidth=1.2, **style)
            else:
                axis.plot([m.sparsity for m in mine], values, marker="o", **style)
        axis.set_title(f"{shape} {mode}")
        axis.set_xlabel("sparsity")
        axis.set_xlim(min(sparsities) - 0.01, max(sparsities) + 0.01)
        axis.set_ylabel("speedup vs FA2 (x)" if use_speedup else "median time (ms)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if cpu_numbers:
        figure.suptitle("CPU run: not GPU numbers", color="darkred")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
