"""Options shared by the commands that run a converted model on sample inputs (report, calibrate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sla2cli.report.runner import DEFAULT_CLIPS

InputsOption = Annotated[
    Path | None,
    typer.Option(help="A .safetensors file with clean 'latents' (batch first, in the model's layout) and "
                 "'encoder_hidden_states' (text embeddings); noised to each timestep. Without it, Hub "
                 "models get random inputs (with a warning) and the embedded model its validation clips.",
                 show_default=False),
]
TimestepsOption = Annotated[
    str, typer.Option(help="Comma-separated noise levels in [0, 1] (1 = pure noise) to run the model at.")
]
ResolutionOption = Annotated[
    str | None,
    typer.Option(help="Clip size without --inputs: a recipe resolution name (e.g. 480p) or "
                 "FRAMESxHEIGHTxWIDTH in pixels (latent units for the embedded model). Default: the "
                 "recipe's.", show_default=False),
]
ClipsOption = Annotated[
    int | None,
    typer.Option(help=f"Number of clips (validation clips, input clips or random draws). Default: "
                 f"{DEFAULT_CLIPS['cpu']} on CPU, {DEFAULT_CLIPS['cuda']} on GPU; every clip of --inputs.",
                 show_default=False),
]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when present), cuda or cpu.")]
QuietOption = Annotated[bool, typer.Option(help="No progress bar.")]
