"""sla2: SLA2 sparse-linear attention for video diffusion transformers."""

__version__ = "0.1.0"

_API = ("convert", "load", "save", "finetune", "evaluate")


def __getattr__(name: str):
    """`sla2cli.convert/load/save/finetune/evaluate`, imported on first use so that `import sla2cli` stays light."""
    if name in _API:
        from sla2cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'sla2cli' has no attribute {name!r}")
