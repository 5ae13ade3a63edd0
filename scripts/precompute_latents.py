"""Precompute fine-tuning data for `sla2 finetune --data`: latents and prompt embeddings from a diffusers pipeline.

The transformer trains on what its pipeline feeds it, so the data comes from the base model's own VAE and
text encoder (the format: README, "Fine-tuning data"; the code: sla2cli/training/latent_format.py).
Two sources of clips:

  --captions FILE.jsonl  one {"video": "clip.mp4", "prompt": "..."} per line (video paths relative to the
                         file): each video is read with diffusers' load_video, resized to --height x --width,
                         cut to its first --frames frames, encoded by the VAE (distribution mode) and normalised
                         with the VAE's latents_mean / latents_std, exactly as the Wan pipelines do.
  --prompts FILE.txt     one prompt per line: the base pipeline generates each clip and keeps its latents
                         (output_type="latent"), e.g. data for `--objective distill` or for self-training.

Example (one GPU, Wan2.1 1.3B at 480p, 81 frames):

  python scripts/precompute_latents.py Wan-AI/Wan2.1-T2V-1.3B-Diffusers --captions clips.jsonl \
      --out wan-latents --height 480 --width 832 --frames 81 --validation 8 --device cuda
  sla2 finetune wan13-sla2 --data wan-latents --out wan13-sla2-ft
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import load_video
from rich.progress import track

from sla2cli.errors import UserError
from sla2cli.training.latent_format import latent_folder_writer


@dataclass(frozen=True)
class Item:
    """One clip to make: its sample name, prompt and (for --captions) video file."""

    name: str
    prompt: str
    video: Path | None = None


def read_items(captions: Path | None, prompts: Path | None) -> list[Item]:
    """The clips listed by a captions jsonl file or a prompt list, named clip-00000, clip-00001, ..."""
    if (captions is None) == (prompts is None):
        raise UserError("give exactly one of --captions FILE.jsonl and --prompts FILE.txt")
    items = []
    if prompts is not None:
        lines = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines()]
        items = [Item(f"clip-{index:05d}", line) for index, line in enumerate(line for line in lines if line)]
    else:
        for number, line in enumerate(captions.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                items.append(Item(f"clip-{len(items):05d}", str(entry["prompt"]), captions.parent / entry["video"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{captions}:{number}: expected {{\"video\": PATH, \"prompt\": TEXT}}") from None
    if not items:
        raise UserError("no clips listed; nothing to precompute")
    return items


def normalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """(latents - latents_mean) / latents_std per channel: the space the Wan transformer denoises."""
    shape = (1, -1) + (1,) * (latents.dim() - 2)
    mean = torch.tensor(vae_config.latents_mean, dtype=latents.dtype, device=latents.device).view(shape)
    std = torch.tensor(vae_config.latents_std, dtype=latents.dtype, device=latents.device).view(shape)
    return (latents - mean) / std


@torch.no_grad()
def prompt_embeddings(pipe: Any, prompt: str, max_sequence_length: int, device: torch.device) -> torch.Tensor:
    """The text encoder's embeddings of one prompt, (S, D), as the pipeline computes them (no CFG)."""
    embeds, _ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False,
                                   max_sequence_length=max_sequence_length, device=device)
    return embeds[0].float().cpu()


@torch.no_grad()
def video_latents(pipe: Any, frames: Sequence[Any], height: int, width: int, device: torch.device) -> torch.Tensor:
    """VAE latents (C, T, H, W) of a clip (PIL images or arrays), normalised."""
    video = pipe.video_processor.preprocess_video(list(frames), height=height, width=width)
    video = video.to(device=device, dtype=pipe.vae.dtype)
    latents = pipe.vae.encode(video).latent_dist.mode()
    return normalize_latents(latents.float(), pipe.vae.config)[0].cpu()


@torch.no_grad()
def generated_latents(pipe: Any, prompt: str, *, height: int, width: int, frames: int, steps: int, seed: int,
                      device: torch.device) -> torch.Tensor:
    """The latents (C, T, H, W) of a clip the base pipeline generates for `prompt`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    output = pipe(prompt=prompt, height=height, width=width, num_frames=frames, num_inference_steps=steps,
                  generator=generator, output_type="latent")
    return output.frames[0].float().cpu()


def write_folder(
    pipe: Any,
    items: list[Item],
    out: Path,
    *,
    height: int,
    width: int,
    frames: int,
    validation: int,
    device: torch.device,
    steps: int = 50,
    seed: int = 0,
    max_sequence_length: int = 512,
    overwrite: bool = False,
    read_video: Callable[[Path], Sequence[Any]] | None = None,
) -> Path:
    """Encode every item and write the data folder (atomically); the last `validation` items are held out."""
    if not 0 < validation < len(items):
        raise UserError(f"--validation must hold out at least one and fewer than all {len(items)} clips")
    with latent_folder_writer(out, overwrite=overwrite) as writer:
        for index, item in enumerate(track(items, description="encoding clips")):
            text = prompt_embeddings(pipe, item.prompt, max_sequence_length, device)
            if item.video is None:
                latents = generated_latents(pipe, item.prompt, height=height, width=width, frames=frames,
                                            steps=steps, seed=seed + index, device=device)
            else:
                clip = list(read_video(item.video))[:frames]
                if len(clip) < frames:
                    raise UserError(f"{item.video} has {len(clip)} frames; --frames asks for {frames}")
                latents = video_latents(pipe, clip, height, width, device)
            writer.add(item.name, latents, text)
        writer.finish(
            validation=[item.name for item in items[-validation:]],
            source={"height": height, "width": width, "frames": frames,
                    "kind": "videos" if items[0].video is not None else "generated"},
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="diffusers pipeline: Hub id or folder (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--captions", type=Path)
    parser.add_argument("--prompts", type=Path)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--validation", type=int, default=8, help="clips held out for validation (the last ones)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps when generating from --prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    items = read_items(args.captions, args.prompts)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, use_safetensors=True).to(device)
    pipe.vae.to(torch.float32)  # the Wan VAE is meant to run in float32
    write_folder(pipe, items, args.out, height=args.height, width=args.width, frames=args.frames,
                 validation=args.validation, device=device, steps=args.steps, seed=args.seed,
                 max_sequence_length=args.max_sequence_length, overwrite=args.overwrite,
                 read_video=lambda path: load_video(str(path)))
    print(f"wrote {len(items)} clips to {args.out}")


if __name__ == "__main__":
    main()
