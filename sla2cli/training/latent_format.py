"""The on-disk format of fine-tuning data for Hub models: precomputed latents and text embeddings.

A data folder holds safetensors shards and a manifest:

    manifest.json                {"format": "sla2-latents", "version": 1,
                                  "shards": [{"file": "shard-00000.safetensors", "samples": ["clip-0", ...]}, ...],
                                  "validation": ["clip-97", ...],      # optional: the held-out samples
                                  "source": {...}}                     # optional: how it was made
    shard-00000.safetensors      per sample NAME: NAME.latents (C, T, H, W), NAME.prompt_embeds (S, D_text),
                                 and for image-to-video models NAME.image_embeds (N, D_image)

Latents are the VAE's normalised latents, exactly what the transformer denoises (for Wan: (latent -
latents_mean) / latents_std, as the pipeline's decode step inverts). All samples share one shape, so
any of them batch together. Without a `validation` list the last samples are held out.
`scripts/precompute_latents.py` writes such a folder from a diffusers pipeline.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sla2cli.errors import UserError
from sla2cli.files import atomic_folder
from sla2cli.sources.safetensors_check import METADATA_KEY, read_header

FORMAT = "sla2-latents"
VERSION = 1
MANIFEST = "manifest.json"
LATENTS = "latents"
PROMPT_EMBEDS = "prompt_embeds"
IMAGE_EMBEDS = "image_embeds"
RANKS = {LATENTS: 4, PROMPT_EMBEDS: 2, IMAGE_EMBEDS: 2}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")
SHARD_SAMPLES = 64


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives: its name and its shard file."""

    name: str
    path: Path


@dataclass(frozen=True)
class LatentFolder:
    """A checked data folder: training and validation samples, and the shapes they all share."""

    root: Path
    training: tuple[SampleRef, ...]
    validation: tuple[SampleRef, ...]
    shapes: dict[str, tuple[int, ...]]  # tensor kind -> shape of one sample's tensor
    digest: str  # sha256 of the manifest and of every shard header: identifies the data on resume

    def read(self, ref: SampleRef) -> dict[str, torch.Tensor]:
        """One sample's tensors by kind (latents, prompt_embeds[, image_embeds]), as float32 on the CPU."""
        try:
            with safe_open(str(ref.path), framework="pt") as shard:
                return {kind: shard.get_tensor(f"{ref.name}.{kind}").float() for kind in self.shapes}
        except (SafetensorError, OSError) as error:
            raise UserError(f"{ref.path}: cannot read sample {ref.name} ({error})") from None


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"{path}: {why}; see the README section on fine-tuning data (scripts/precompute_latents.py)")


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise UserError(f"--data {root}: no such folder; make one with scripts/precompute_latents.py")
    path = root / MANIFEST
    if not path.is_file():
        raise _bad(root, f"no {MANIFEST}; this is not a latent data folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "not readable json") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad(path, f"not a {FORMAT} manifest (its format field must be {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise _bad(path, f"version must be {VERSION}, got {manifest.get('version')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise _bad(path, "lists no shards; the folder holds no samples")
    return manifest


def _shard_samples(root: Path, entry: Any, manifest_path: Path) -> tuple[Path, list[str]]:
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(
        entry.get("samples"), list
    ):
        raise _bad(manifest_path, "each shard entry needs a file name and a samples list")
    path = root / entry["file"]
    if Path(entry["file"]).name != entry["file"] or not path.is_file():
        raise _bad(manifest_path, f"shard {entry['file']!r} is not a file in the folder")
    names = entry["samples"]
    if not all(isinstance(name, str) and NAME_PATTERN.fullmatch(name) for name in names):
        raise _bad(manifest_path, f"sample names in {entry['file']} must be letters, digits, '_' or '-'")
    return path, names


def _sample_shapes(path: Path, header: dict, name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for kind, rank in RANKS.items():
        entry = header.get(f"{name}.{kind}")
        if entry is None:
            if kind == IMAGE_EMBEDS:
                continue
            raise _bad(path, f"sample {name} has no tensor {name}.{kind}")
        shape = tuple(entry.get("shape", ()))
        if len(shape) != rank or entry.get("dtype") not in FLOAT_DTYPES or min(shape, default=0) < 1:
            raise _bad(path, f"{name}.{kind} must be a float tensor of rank {rank}, got {entry.get('dtype')} "
                             f"{list(shape)}")
        shapes[kind] = shape
    return shapes


def open_latent_folder(root: Path, holdout: int = 8) -> LatentFolder:
    """Check a data folder (manifest, every shard header, one shape for all samples) without reading data.

    Without a `validation` list in the manifest the last max(1, min(holdout, N // 10)) samples are held out.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    manifest_path = root / MANIFEST
    digest = hashlib.sha256(manifest_path.read_bytes())
    refs: list[SampleRef] = []
    shapes: dict[str, tuple[int, ...]] | None = None
    first: str | None = None
    for entry in manifest["shards"]:
        path, names = _shard_samples(root, entry, manifest_path)
        header = read_header(path)
        digest.update(json.dumps({k: v for k, v in header.items() if k != METADATA_KEY}, sort_keys=True).encode())
        for name in names:
            found = _sample_shapes(path, header, name)
            if shapes is None:
                shapes, first = found, name
            elif found != shapes:
                raise _bad(path, f"sample {name} has shapes {found}, sample {first} {shapes}; all samples must "
                                 "share one shape")
            refs.append(SampleRef(name, path))
    if not refs:
        raise _bad(manifest_path, "its shards list no samples")
    by_name = {ref.name: ref for ref in refs}
    if len(by_name) != len(refs):
        raise _bad(manifest_path, "a sample name appears twice")
    named = manifest.get("validation")
    if named is not None:
        if not isinstance(named, list) or any(name not in by_name for name in named) or not named:
            raise _bad(manifest_path, "validation must list names of samples in the shards")
        held = set(named)
    else:
        if len(refs) < 2:
            raise _bad(manifest_path, "holds one sample; fine-tuning needs at least two (one is held out)")
        held = {ref.name for ref in refs[len(refs) - max(1, min(holdout, len(refs) // 10)):]}
    training = tuple(ref for ref in refs if ref.name not in held)
    if not training:
        raise _bad(manifest_path, "every sample is held out for validation; none is left to train on")
    validation = tuple(ref for ref in refs if ref.name in held)
    return LatentFolder(root, training, validation, shapes, digest.hexdigest())


class LatentFolderWriter:
    """Collects samples into shards of `shard_samples`; `finish` writes the last shard and the manifest."""

    def __init__(self, folder: Path, shard_samples: int = SHARD_SAMPLES) -> None:
        self.folder = Path(folder)
        self.shard_samples = shard_samples
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_names: list[str] = []
        self.shards: list[dict[str, Any]] = []
        self.names: set[str] = set()
        self.finished = False

    def add(
        self, name: str, latents: torch.Tensor, prompt_embeds: torch.Tensor, image_embeds: torch.Tensor | None = None
    ) -> None:
        """One sample: latents (C, T, H, W) and prompt embeddings (S, D) without a batch axis."""
        if not NAME_PATTERN.fullmatch(name) or name in self.names:
            raise ValueError(f"sample name {name!r} must be new and made of letters, digits, '_' or '-'")
        tensors = {LATENTS: latents, PROMPT_EMBEDS: prompt_embeds}
        if image_embeds is not None:
            tensors[IMAGE_EMBEDS] = image_embeds
        for kind, tensor in tensors.items():
            if tensor.dim() != RANKS[kind] or not tensor.is_floating_point():
                raise ValueError(f"{name}.{kind} must be a float tensor of rank {RANKS[kind]}, got "
                                 f"{tensor.dtype} {tuple(tensor.shape)}")
            self.pending[f"{name}.{kind}"] = tensor.detach().to("cpu").contiguous()
        self.names.add(name)
        self.pending_names.append(name)
        if len(self.pending_names) >= self.shard_samples:
            self._flush()

    def _flush(self) -> None:
        if not self.pending_names:
            return
        file = f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(self.folder / file), metadata={"format": FORMAT})
        self.shards.append({"file": file, "samples": list(self.pending_names)})
        self.pending, self.pending_names = {}, []

    def finish(self, validation: list[str] | None = None, source: dict[str, Any] | None = None) -> None:
        """Write the last shard and the manifest (`validation`: held-out names; None: the last samples)."""
        self._flush()
        manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "shards": self.shards}
        if validation is not None:
            manifest["validation"] = list(validation)
        if source:
            manifest["source"] = source
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        self.finished = True


@contextmanager
def latent_folder_writer(out: Path, *, overwrite: bool = False, shard_samples: int = SHARD_SAMPLES) -> Iterator[
    LatentFolderWriter
]:
    """A writer into a temporary folder that becomes `out` once the block succeeds; the manifest is written
    by `finish` (called at the end of the block with its defaults if the block did not call it)."""
    with atomic_folder(Path(out), overwrite=overwrite) as folder:
        writer = LatentFolderWriter(folder, shard_samples)
        yield writer
        if not writer.finished:
            writer.finish()
