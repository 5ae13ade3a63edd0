"""The embedded model's architecture, default clip and where its shipped files live.

One place for these numbers so that the trainer, the loader and the tests build the same model.
The default clip (8 latent frames of 64 x 64, patch 1 x 2 x 2) gives 8 * 32 * 32 = 8192 tokens: in the
recipe's key blocks of 16, 512 key blocks, so 97% sparsity keeps floor(0.03 * 512) = 15 per query block.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sla2cli.embedded.synthetic import LATENT_CHANNELS, TEXT_DIM, TEXT_TOKENS
from sla2cli.files import write_json_file

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
WEIGHTS_FILENAME = "embedded_wan.safetensors"
CONFIG_FILENAME = "embedded_wan.json"

# Keyword arguments of diffusers' WanTransformer3DModel. Head dim 64 is one the SLA2 kernels support;
# 4 layers of width 256 keep the fp32 weights under 20 MB.
MODEL_KWARGS: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "text_dim": TEXT_DIM,
    "freq_dim": 64,
    "ffn_dim": 768,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

DEFAULT_CLIP: dict[str, int] = {"frames": 8, "height": 64, "width": 64}
TEXT: dict[str, int] = {"tokens": TEXT_TOKENS, "dim": TEXT_DIM}


def default_config() -> dict[str, Any]:
    """The json document shipped next to the weights, before training adds its summary."""
    return {
        "architecture": "WanTransformer3DModel",
        "model": dict(MODEL_KWARGS),
        "default_clip": dict(DEFAULT_CLIP),
        "latent_channels": LATENT_CHANNELS,
        "text": dict(TEXT),
    }


def model_kwargs_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments from a config document (json lists become the tuples diffusers expects)."""
    kwargs = dict(config["model"])
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    return kwargs


def save_config(config: dict[str, Any], path: Path) -> None:
    """Write the config document atomically as indented json."""
    write_json_file(path, config, sort_keys=True)


def read_config(path: Path) -> dict[str, Any]:
    """Read a config document written by `save_config`."""
    return json.loads(path.read_text(encoding="utf-8"))
