"""The README.md model card of a checkpoint: what it was made from, with which settings, how to load it."""

from __future__ import annotations

from sla2cli.checkpoint.format import CheckpointConfig
from sla2cli.flops import FlopEstimate
from sla2cli.integration.recipes import Recipe


def _front_matter(config: CheckpointConfig) -> list[str]:
    lines = ["---", "library_name: sla2", "tags:", "- sla2", "- sparse-attention", "- video-generation"]
    if config.base.source == "hub":
        lines.append(f"base_model: {config.base.repo_id}")
    return lines + ["---", ""]


def _settings_table(config: CheckpointConfig, recipe: Recipe) -> list[str]:
    converted = sum(len(record.converted_modules) for record in config.components.values())
    rows = [
        ("base model", config.base.describe()),
        ("base weights", config.base_weights),
        ("recipe", f"{recipe.name} ({recipe.title})"),
        ("components", ", ".join(config.components)),
        ("converted self-attention layers", str(converted)),
        ("layers kept dense", ", ".join(map(str, recipe.dense_layers)) or "none"),
        ("sparsity", f"{config.sparsity:g}"),
        ("block sizes (query, key)", f"{config.block_q}, {config.block_k}"),
        ("quantisation", config.quantization),
        ("sla2 version", config.sla2_version),
    ]
    return ["| setting | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows] + [""]


FINETUNE_PREFIX = "finetune_"


def _finetuning(measurements: dict) -> list[str]:
    """How the base weights were fine-tuned (`sla2 finetune` records `finetune_*` measurements)."""
    record = {key[len(FINETUNE_PREFIX):]: value for key, value in measurements.items()
              if key.startswith(FINETUNE_PREFIX)}
    if not record:
        return []
    lines = [
        "## Fine-tuning",
        "",
        "The base weights in this folder were fine-tuned end to end with SLA2 attention in place (`sla2 finetune`; "
        "hard routing, router frozen, alpha and every base weight trained). Validation losses are the velocity "
        "loss on fixed held-out clips, noise and times.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {name.replace('_', ' ')} | {value} |" for name, value in record.items()]
    return lines + [""]


def _figures(flops: FlopEstimate | None, recipe: Recipe, measurements: dict) -> list[str]:
    measurements = {key: value for key, value in measurements.items() if not key.startswith(FINETUNE_PREFIX)}
    lines = ["## Figures", ""]
    if flops is not None:
        resolution = recipe.resolution()
        lines += [
            f"Self-attention FLOPs at {recipe.default_resolution} ({resolution.width}x{resolution.height}, "
            f"{resolution.frames} frames, {flops.length} tokens): {flops.reduction:.1f}x fewer than dense "
            "(estimate from the block geometry, not a timing).",
            "",
        ]
    if measurements:
        lines += ["| measurement | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in sorted(measurements.items())] + [""]
    else:
        lines += ["No measurements yet: run `sla2 calibrate`, `sla2 bench` or `sla2 report` on this folder.", ""]
    return lines


def render_model_card(config: CheckpointConfig, recipe: Recipe, flops: FlopEstimate | None) -> str:
    """Markdown text of the card."""
    lines = _front_matter(config)
    lines += [
        f"# {recipe.title} with SLA2 attention",
        "",
        "The self-attention layers of this model run SLA2 sparse-linear attention: exact softmax attention "
        "on the key blocks a learnable router selects, linear attention on the rest, mixed per query block. "
        "Cross-attention and masked calls keep the model's dense attention.",
        "",
    ]
    lines += _settings_table(config, recipe)
    lines += _finetuning(config.measurements)
    lines += _figures(flops, recipe, config.measurements)
    included = config.base_weights == "included"
    lines += [
        "## How to load",
        "",
        "```python",
        "import sla2cli",
        "",
        'model = sla2cli.load("path/to/this/folder")  # builds the base model, then adds the SLA2 layers',
        "```",
        "",
        "This folder holds the SLA2 router and mixing parameters (`sla2_attention.safetensors`) and "
        + (
            "the fine-tuned base weights in diffusers layout."
            if included
            else "refers to the base weights, which load from the Hugging Face cache or the recorded folder."
        ),
        "",
    ]
    return "\n".join(lines)
