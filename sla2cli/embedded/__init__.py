"""The embedded default model: a tiny Wan-architecture video DiT trained on procedural clips.

It ships with the package so that every command has a model to work on with no download, and its
attention has the real spatio-temporal structure that SLA2 exploits.
"""

from sla2cli.embedded.attention_stats import (
    AttentionMassStats,
    QueryKeyCaptureProcessor,
    attention_block_mass_stats,
    capturing_query_key,
    top_block_mass_share,
)
from sla2cli.embedded.config import DEFAULT_CLIP, MODEL_KWARGS, default_config
from sla2cli.embedded.loading import build_embedded_model, embedded_example_inputs, load_embedded_model
from sla2cli.embedded.synthetic import SyntheticClip, calibration_clips, make_clip, validation_clips

__all__ = [
    "DEFAULT_CLIP",
    "MODEL_KWARGS",
    "AttentionMassStats",
    "QueryKeyCaptureProcessor",
    "SyntheticClip",
    "attention_block_mass_stats",
    "build_embedded_model",
    "calibration_clips",
    "capturing_query_key",
    "default_config",
    "embedded_example_inputs",
    "load_embedded_model",
    "make_clip",
    "top_block_mass_share",
    "validation_clips",
]
