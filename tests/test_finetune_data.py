"""Fine-tuning data: the latent folder format (writer, reader, errors), per-sample randomness, the
precompute script's writer; and the settings, schedule and trainable-parameter choice."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

import sla2cli
from sla2cli.embedded.loading import build_embedded_model
from sla2cli.embedded.synthetic import VALIDATION_SEED_BASE
from sla2cli.errors import UserError
from sla2cli.integration.recipes import all_recipes, get_recipe
from sla2cli.training.data import LatentData, ProceduralClips, check_fits, training_batch
from sla2cli.training.latent_format import MANIFEST, latent_folder_writer, open_latent_folder
from sla2cli.training.optim import finetune_parameter_groups, select_trainable
from sla2cli.training.schedule import schedule_factor
from sla2cli.training.seeding import STREAM_CLIP, derived_seed
from sla2cli.training.settings import (
    FinetuneSettings,
    check_partition,
    parse_clip,
    recipe_defaults,
    resume_mismatches,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, count: int, *, shape=(4, 2, 8, 8), text=(8, 32), validation=None, shard_samples=3):
    generator = torch.Generator().manual_seed(count)
    with latent_folder_writer(folder, shard_samples=shard_samples) as writer:
        for index in range(count):
            writer.add(f"s{index}", torch.randn(shape, generator=generator), torch.randn(text, generator=generator))
        writer.finish(validation=validation)
    return folder


def test_latent_folder_round_trip_and_split(tmp_path):
    folder = _write(tmp_path / "data", 7, validation=["s2"])
    manifest = json.loads((folder / MANIFEST).read_text())
    assert [len(shard["samples"]) for shard in manifest["shards"]] == [3, 3, 1]
    opened = open_latent_folder(folder)
    assert [ref.name for ref in opened.validation] == ["s2"]
    assert [ref.name for ref in opened.training] == ["s0", "s1", "s3", "s4", "s5", "s6"]
    assert opened.shapes == {"latents": (4, 2, 8, 8), "prompt_embeds": (8, 32)}
    tail = open_latent_folder(_write(tmp_path / "tail", 30))
    assert [ref.name for ref in tail.validation] == ["s27", "s28", "s29"]  # N // 10 held out
    sample = opened.read(opened.training[0])
    generator = torch.Generator().manual_seed(7)
    assert torch.equal(sample["latents"], torch.randn((4, 2, 8, 8), generator=generator))


def test_latent_data_visits_each_training_sample_once_per_epoch(tmp_path):
    data = LatentData(open_latent_folder(_write(tmp_path / "data", 6, validation=["s5"])), seed=3)
    training = {ref.name: data.folder.read(ref)["latents"] for ref in data.folder.training}

    def name_of(index: int) -> str:
        latents = data.sample(index, torch.device("cpu")).latents
        return next(name for name, value in training.items() if torch.equal(value, latents))

    first, second = [name_of(i) for i in range(5)], [name_of(i) for i in range(5, 10)]
    assert sorted(first) == sorted(second) == sorted(training)
    assert first != second  # a fresh permutation per epoch (for this seed)
    assert name_of(7) == second[2]  # a sample depends on its index only, not on the order of the calls


def test_training_batch_is_the_same_however_it_is_split():
    data = ProceduralClips((2, 8, 8), seed=5, validation_samples=2)
    whole = training_batch(data, [4, 5, 6, 7], seed=5, shift=3.0, device=torch.device("cpu"))
    halves = [training_batch(data, part, seed=5, shift=3.0, device=torch.device("cpu")) for part in ([4, 5], [6, 7])]
    for name in ("clean", "text", "noise", "t"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(part, name) for part in halves])), name
    other_seed = training_batch(data, [4], seed=6, shift=3.0, device=torch.device("cpu"))
    assert not torch.equal(other_seed.noise, whole.noise[:1])


def test_procedural_clips_never_draw_validation_scenes():
    assert all(derived_seed(0, STREAM_CLIP, index) % VALIDATION_SEED_BASE < VALIDATION_SEED_BASE
               for index in range(100))
    data = ProceduralClips((2, 8, 8), seed=0, validation_samples=3)
    validation = data.validation_set(torch.device("cpu")).clean
    drawn = torch.stack([data.sample(i, torch.device("cpu")).latents for i in range(20)])
    assert not any(torch.equal(clip, held) for clip in drawn for held in validation)


def test_shift_pushes_timesteps_towards_noise():
    data = ProceduralClips((1, 4, 4), seed=0, validation_samples=1)
    plain = training_batch(data, list(range(64)), seed=0, shift=1.0, device=torch.device("cpu")).t
    shifted = training_batch(data, list(range(64)), seed=0, shift=3.0, device=torch.device("cpu")).t
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert shifted.mean() > plain.mean()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / MANIFEST).unlink(), "no manifest.json"),
        (lambda f: (f / MANIFEST).write_text("{"), "not readable json"),
        (lambda f: (f / MANIFEST).write_text(json.dumps({"format": "other"})), "format field"),
        (lambda f: (f / "shard-00001.safetensors").unlink(), "is not a file"),
        (lambda f: (f / "shard-00001.safetensors").write_bytes(
            (f / "shard-00001.safetensors").read_bytes()[:-10]), r"shard-00001\.safetensors is truncated"),
        (lambda f: _manifest(f, lambda m: m["shards"][0]["samples"].append("ghost")), "no tensor ghost.latents"),
        (lambda f: _manifest(f, lambda m: m.update(validation=["nobody"])), "validation must list"),
        (lambda f: _manifest(f, lambda m: m.update(validation=[f"s{i}" for i in range(4)])), "every sample is held"),
    ],
)
def test_bad_data_folders_name_the_file(tmp_path, damage, message):
    folder = _write(tmp_path / "data", 4)
    damage(folder)
    with pytest.raises(UserError, match=message):
        open_latent_folder(folder)


def _manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_mismatched_shapes_and_missing_or_empty_folders(tmp_path):
    with latent_folder_writer(tmp_path / "mixed") as writer:
        writer.add("a", torch.zeros(4, 2, 8, 8), torch.zeros(8, 32))
        writer.add("b", torch.zeros(4, 2, 8, 6), torch.zeros(8, 32))
    with pytest.raises(UserError, match=r"shard-00000\.safetensors: sample b has shapes"):
        open_latent_folder(tmp_path / "mixed")
    with pytest.raises(UserError, match="no such folder"):
        open_latent_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        open_latent_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="rank 4"):
        with latent_folder_writer(tmp_path / "bad") as writer:
            writer.add("a", torch.zeros(4, 8, 8), torch.zeros(8, 32))
    assert not (tmp_path / "bad").exists()


def test_samples_must_fit_the_model(tmp_path):
    model = build_embedded_model()
    check_fits(LatentData(open_latent_folder(_write(tmp_path / "ok", 3)), 0), model)
    cases = [
        ((16, 2, 8, 8), (8, 32), "16 channels, the model takes 4"),
        ((4, 2, 8, 7), (8, 32), "not a multiple of the model's patch"),
        ((4, 2, 8, 8), (8, 4096), "width 4096"),
    ]
    for index, (shape, text, message) in enumerate(cases):
        data = LatentData(open_latent_folder(_write(tmp_path / f"bad{index}", 3, shape=shape, text=text)), 0)
        with pytest.raises(UserError, match=message) as error:
            check_fits(data, model)
        assert "shard-00000.safetensors" in str(error.value)


def _precompute_module():
    spec = importlib.util.spec_from_file_location("precompute_latents", ROOT / "scripts" / "precompute_latents.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_precompute_script_encodes_videos_and_prompts_with_a_tiny_pipeline(tmp_path):
    script = _precompute_module()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0]).eval()
    prompts_seen = []

    def encode_prompt(prompt, do_classifier_free_guidance, max_sequence_length, device):
        prompts_seen.append(prompt)
        return torch.full((1, max_sequence_length, 32), float(len(prompt))), None

    pipe = SimpleNamespace(vae=vae, video_processor=VideoProcessor(vae_scale_factor=2), encode_prompt=encode_prompt)
    (tmp_path / "clips.jsonl").write_text("\n".join(json.dumps({"video": f"v{i}.mp4", "prompt": "x" * (i + 1)})
                                                    for i in range(3)))
    items = script.read_items(tmp_path / "clips.jsonl", None)
    videos = {f"v{i}.mp4": [np.random.default_rng(i).random((8, 8, 3)).astype(np.float32) for _ in range(6)]
              for i in range(3)}
    out = script.write_folder(pipe, items, tmp_path / "latents", height=8, width=8, frames=5, validation=1,
                              device=torch.device("cpu"), max_sequence_length=8,
                              read_video=lambda path: videos[path.name])

    folder = open_latent_folder(out)
    assert [ref.name for ref in folder.validation] == ["clip-00002"]
    assert folder.shapes == {"latents": (4, 3, 4, 4), "prompt_embeds": (8, 32)}
    assert prompts_seen == ["x", "xx", "xxx"]
    sample = folder.read(folder.training[1])
    video = VideoProcessor(vae_scale_factor=2).preprocess_video(videos["v1.mp4"][:5], height=8, width=8)
    with torch.no_grad():
        raw = vae.encode(video).latent_dist.mode()[0]
    mean, std = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(sample["latents"], (raw - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1))
    assert torch.equal(sample["prompt_embeds"], torch.full((8, 32), 2.0))
    with pytest.raises(UserError, match="has 6 frames"):
        script.write_folder(pipe, items, tmp_path / "long", height=8, width=8, frames=9, validation=1,
                            device=torch.device("cpu"), read_video=lambda path: videos[path.name])
    assert not (tmp_path / "long").exists()


def test_every_recipe_carries_valid_finetune_defaults():
    for recipe in all_recipes().values():
        settings = recipe_defaults(recipe)
        assert settings.objective == "flow" and settings.steps >= 1 and settings.learning_rate > 0
    embedded = recipe_defaults(get_recipe("embedded"))
    assert (embedded.steps, embedded.batch_size, embedded.learning_rate, embedded.shift) == (2000, 8, 3e-4, 1.0)
    wan = recipe_defaults(get_recipe("wan2.1-t2v-1.3b"))
    assert wan.gradient_checkpointing and wan.shift == 3.0
    assert recipe_defaults(get_recipe("wan2.1-t2v-14b")).shift == 5.0


def test_settings_checks_and_resume_rules():
    base = FinetuneSettings(steps=10, learning_rate=1e-4, batch_size=8)
    for overrides, message in [({"steps": 0}, "--steps"), ({"learning_rate": -1.0}, "--lr"),
                               ({"objective": "mse"}, "--objective"), ({"quant": "int4"}, "--quant"),
                               ({"clip": (2, 15, 16)}, "--clip")]:
        with pytest.raises(UserError, match=message):
            with_overrides(base, overrides)
    assert check_partition(base, 2) == 4
    with pytest.raises(UserError, match="multiple of processes"):
        check_partition(with_overrides(base, {"grad_accum": 3}), 2)
    assert parse_clip("2,16,16") == (2, 16, 16)
    with pytest.raises(UserError, match="FRAMES,HEIGHT,WIDTH"):
        parse_clip("2,16")
    stored = base.to_json()
    assert resume_mismatches(stored, with_overrides(base, {"steps": 20, "save_every": 5})) == []
    assert resume_mismatches(stored, with_overrides(base, {"learning_rate": 2e-4})) == ["--lr 0.0001 -> 0.0002"]


def test_schedules():
    assert schedule_factor(0, 100, "constant", 4, 0.1) == pytest.approx(0.25)
    assert schedule_factor(50, 100, "constant", 4, 0.1) == 1.0
    assert schedule_factor(10, 100, "cosine", 0, 0.1) > schedule_factor(90, 100, "cosine", 0, 0.1)
    assert schedule_factor(100, 100, "cosine", 0, 0.1) == pytest.approx(0.1)


def test_trainable_choice_freezes_the_router_and_groups_sla2_parameters():
    model = sla2cli.convert(build_embedded_model(), sparsity=0.9)
    names = select_trainable(model)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(name.endswith((".proj_q", ".proj_k")) and ".processor.sla2." in name for name in frozen)
    assert len(frozen) == 2 * 4 and len(names) == len(list(model.parameters())) - len(frozen)
    groups = {g["group"]: g for g in finetune_parameter_groups(model, learning_rate=1e-4, sla2_learning_rate=1e-3,
                                                                weight_decay=0.01)}
    assert groups["sla2"]["lr"] == 1e-3 and groups["sla2"]["weight_decay"] == 0.0
    assert len(groups["sla2"]["params"]) == 3 * 4  # alpha weight, bias, log-temperature per layer
    assert groups["decayed"]["weight_decay"] == 0.01 and groups["other"]["weight_decay"] == 0.0
    alpha_only = select_trainable(model, ["*.alpha_*"])
    assert len(alpha_only) == 12 and all(".alpha_" in name for name in alpha_only)
    assert select_trainable(model, lambda name, p: name.startswith("blocks.0.")) == [
        name for name, _ in model.named_parameters() if name.startswith("blocks.0.")]
    with pytest.raises(UserError, match="nothing would train"):
        select_trainable(model, ["nothing.*"])
