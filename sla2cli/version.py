"""The package version: one place, read by the package, the checkpoint writer, bench rows and packaging."""

__version__ = "0.1.0"
