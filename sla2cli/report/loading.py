"""What `sla2 report` runs on: an SLA2 checkpoint (folder or Hub id), or the embedded model converted now.

A base model is refused rather than converted on the fly: its router is the untrained heuristic, so a
report on it would describe the conversion defaults, not a model anyone runs.
"""

from __future__ import annotations

import torch
from torch import nn

from sla2cli import api
from sla2cli.checkpoint.format import CONFIG_FILE
from sla2cli.errors import UserError
from sla2cli.integration.conversion import conversion_info
from sla2cli.integration.recipes import EMBEDDED_RECIPE, get_recipe
from sla2cli.report.runner import ReportTarget
from sla2cli.sources.locate import locate
from sla2cli.sources.spec import parse_model_spec


def load_report_target(
    model_or_dir: str | None,
    *,
    sparsity: float | None,
    device: torch.device,
    dtype: torch.dtype,
    offline: bool = False,
) -> ReportTarget:
    """The converted model(s) with their recipe; None means the embedded model at its recipe's sparsity."""
    spec = parse_model_spec(model_or_dir)
    if spec.kind != "embedded":
        if spec.kind == "local":
            is_checkpoint = (spec.path / CONFIG_FILE).is_file()
        else:
            is_checkpoint = locate(spec, offline=offline).holds_checkpoint()
        if not is_checkpoint:
            raise UserError(
                f"{spec.describe()} is not an SLA2 checkpoint (it has no {CONFIG_FILE}); "
                f"convert it first with: sla2 convert {model_or_dir} --out FOLDER"
            )
    loaded = api.load(model_or_dir, sparsity=sparsity, dtype=dtype, device=device, offline=offline)
    components: dict[str, nn.Module] = loaded if isinstance(loaded, dict) else {"transformer": loaded}
    info = conversion_info(next(iter(components.values())))
    if info is None:
        raise UserError(f"{spec.describe()} did not load as a converted model; convert it again")
    recipe = get_recipe(info.recipe)
    return ReportTarget(
        components={name: model.eval() for name, model in components.items()},
        recipe=recipe,
        name=spec.describe(),
        embedded=recipe.source == EMBEDDED_RECIPE,
    )
