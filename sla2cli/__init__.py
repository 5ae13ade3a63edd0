"""sla2: SLA2 sparse-linear attention for video diffusion transformers."""

from sla2cli.version import __version__

__all__ = ["__version__", "convert", "evaluate", "finetune", "load", "save"]
_API = ("convert", "load", "save", "finetune", "evaluate")


def __getattr__(name: str):
    """`sla2cli.convert/load/save/finetune/evaluate`, imported on first use so that `import sla2cli` stays light."""
    if name in _API:
        # Lazy on purpose: the API pulls in torch and diffusers, which `sla2 --version` and tools that only
        # read the version should not pay for.
        from sla2cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'sla2cli' has no attribute {name!r}")
