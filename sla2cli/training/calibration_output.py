"""What `sla2 calibrate` prints: one row per layer with its hard-routing error before and for each candidate."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from sla2cli.training.calibration import ALPHA_ONLY, ROUTER_AND_ALPHA, CalibrationSettings, LayerResult

KEPT_LABELS = {ALPHA_ONLY: "alpha", ROUTER_AND_ALPHA: "router"}
LEGEND = (
    "rel L2: hard-routing SLA2 output vs full attention on the captured q, k, v, per head, averaged "
    "(what inference runs; `sla2 report` measures it inside the running model), before; alpha: "
    "alpha refitted, router as it was; router: trained router, alpha refitted; the kept one in green. "
    "mass: true softmax share inside the kept key blocks, before and with the trained router. kept "
    "no: neither beat the previous parameters; n/a: every key block is exact."
)


def results_title(model: str, settings: CalibrationSettings, seconds: float) -> str:
    """The table's title: the model, the steps each layer took and the time it all took."""
    what = f"{settings.router_steps} router + {settings.alpha_steps} alpha steps" if settings.train_router else (
        f"{settings.alpha_steps} alpha steps, router kept"
    )
    return f"sla2 calibrate: {model} ({what} per layer, {seconds:.1f} s)"


def _figure(value: float, pattern: str = "{:.4f}") -> str:
    return "-" if math.isnan(value) else pattern.format(value)


def _marked(result: LayerResult, candidate: str) -> str:
    value = result.rel_l2_alpha_only if candidate == ALPHA_ONLY else result.rel_l2_router
    text = _figure(value)
    return f"[green]{text}[/]" if result.choice == candidate else text


def _kept(result: LayerResult) -> str:
    if not result.trained:
        return "n/a"
    return KEPT_LABELS.get(result.choice, "[red]no[/]")


def render_results(console: Console, results: list[LayerResult], title: str) -> None:
    """One row per layer, the mean error before and after, and the legend; the hard-routing error is the
    figure that matters for inference."""
    single_component = len({result.name.split(":", 1)[0] for result in results}) == 1
    table = Table(title=title, header_style="bold")
    table.add_column("layer", no_wrap=True)
    for header in ("mass", "new", "rel L2", "alpha", "router", "kept"):
        table.add_column(header, justify="right", no_wrap=True)
    for result in results:
        name = result.name.split(":", 1)[1] if single_component else result.name
        table.add_row(
            name,
            _figure(result.mass_before, "{:.3f}"), _figure(result.mass_after, "{:.3f}"),
            _figure(result.rel_l2_before), _marked(result, ALPHA_ONLY), _marked(result, ROUTER_AND_ALPHA),
            _kept(result),
        )
    console.print(table)
    before = sum(r.rel_l2_before for r in results) / len(results)
    after = sum(r.rel_l2_final for r in results) / len(results)
    console.print(f"mean rel L2 {before:.4f} -> {after:.4f} ({after / before:.2f}x)", highlight=False)
    console.print(LEGEND, highlight=False)
