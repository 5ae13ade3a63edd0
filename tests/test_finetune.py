"""`sla2 finetune` on the embedded model: the output checkpoint, exact resume (also after SIGKILL and
SIGINT), the Python API, objectives and QAT, and bad input."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures_hub import (
    assert_user_error,
    folder_listing,
    publish_to_hub_cache,
    run_cli,
    scaled_down_components,
    use_hub_cache,
)
from safetensors.torch import load_file

import sla2cli
from sla2cli.checkpoint.format import TRAINING_METRICS_FILE, TRAINING_STATE_DIR, read_config
from sla2cli.cli import main
from sla2cli.embedded.loading import load_embedded_model
from sla2cli.integration.conversion import sla2_layers
from sla2cli.integration.recipes import get_recipe
from sla2cli.module import SLA2Attention
from sla2cli.training import loop as loop_module
from sla2cli.training.latent_format import latent_folder_writer
from sla2cli.training.metrics import read_metrics_csv, train_losses, validations
from sla2cli.training.state import OPTIMIZER_FILE, STATE_FILE

QUIET = ["--quiet", "--device", "cpu"]
SMALL = ["--clip", "2,16,16", *QUIET]  # 128 tokens: 1 query block, 2 key blocks
FAST = ["--batch-size", "2", "--validation-samples", "2", *SMALL]
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """`sla2 convert --sparsity 0.9 --out c` of the embedded model."""
    folder = tmp_path_factory.mktemp("finetune") / "c"
    assert _cli(["convert", "--sparsity", "0.9", "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def finetuned(converted) -> Path:
    """`sla2 finetune c --out f --steps 3 --clip 2,16,16` (recipe defaults otherwise: batch 8, lr 3e-4)."""
    out = converted.parent / "f"
    assert _cli(["finetune", str(converted), "--out", str(out), "--steps", "3", *SMALL]) == 0
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for name in (WEIGHTS, "sla2_attention.safetensors", f"{TRAINING_STATE_DIR}/{OPTIMIZER_FILE}"):
        found.update({f"{name}:{key}": value for key, value in load_file(str(folder / name)).items()})
    return found


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights, SLA2 parameters, optimizer state and training losses."""
    first, second = _tensors(a), _tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    losses = [train_losses(read_metrics_csv(folder / TRAINING_METRICS_FILE)) for folder in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == read_config(a).measurements["finetune_steps"]


def test_output_is_a_checkpoint_every_command_loads(converted, finetuned, capsys):
    config = read_config(finetuned)
    assert (config.base_weights, config.quantization, config.sparsity) == ("included", "none", 0.9)
    assert config.measurements["finetune_steps"] == 3 and config.measurements["finetune_objective"] == "flow"
    assert "## Fine-tuning" in (finetuned / "README.md").read_text()
    rows = read_metrics_csv(finetuned / TRAINING_METRICS_FILE)
    assert [row["step"] for row in rows if row["kind"] == "train"] == [1, 2, 3]
    assert [step for step, _ in validations(rows)] == [0, 3]

    tuned, shipped = sla2cli.load(finetuned), sla2cli.load(converted)
    tuned_state, shipped_state = tuned.state_dict(), shipped.state_dict()
    changed = [key for key in shipped_state if not torch.equal(tuned_state[key], shipped_state[key])]
    assert any(".processor." not in key for key in changed)  # base weights were trained
    assert any(key.endswith("alpha_bias") for key in changed)  # so was alpha
    assert not any(key.endswith(("proj_q", "proj_k")) for key in changed)  # the router stayed frozen
    assert sla2cli.evaluate(tuned, clip=(2, 16, 16)) == validations(rows)[-1][1]  # what the run validated

    code, out, err = run_cli(["report", str(finetuned), "--resolution", "2x32x32", "--timesteps", "0.5"], capsys)
    assert code == 0, err
    calibrated = finetuned.parent / "f-cal"
    code, _, err = run_cli(["calibrate", str(finetuned), "--out", str(calibrated), "--router-steps", "2",
                            "--alpha-steps", "2", "--resolution", "2x32x32", "--timesteps", "0.5", "--quiet"], capsys)
    assert code == 0, err
    assert read_config(calibrated).measurements["finetune_steps"] == 3
    recalibrated = sla2cli.load(calibrated).state_dict()
    assert all(torch.equal(recalibrated[key], tuned_state[key]) for key in tuned_state if ".processor." not in key)


def test_resume_continues_exactly(converted, tmp_path):
    common = ["--save-every", "2", "--schedule", "constant", "--warmup", "2", *FAST]
    assert _cli(["finetune", str(converted), "--out", str(tmp_path / "straight"), "--steps", "4", *common]) == 0
    assert _cli(["finetune", str(converted), "--out", str(tmp_path / "split"), "--steps", "2", *common]) == 0
    assert _cli(["finetune", str(converted), "--out", str(tmp_path / "split"), "--steps", "4", "--resume",
                 *common]) == 0
    assert_same_run(tmp_path / "straight", tmp_path / "split")


RUN8 = ["--steps", "8", "--save-every", "2", *FAST]


@pytest.fixture(scope="module")
def straight(converted) -> Path:
    """8 uninterrupted steps, saved every 2: the reference of the interrupted runs."""
    out = converted.parent / "straight"
    assert _cli(["finetune", str(converted), "--out", str(out), *RUN8]) == 0
    return out


def wait_for_first_save(process: subprocess.Popen, out: Path) -> Path:
    """Block until the fine-tuning run `process` has saved its state in `out` (published whole, so complete once
    visible); fails if the run ends first or takes over 5 minutes. Returns the state file."""
    state = out / TRAINING_STATE_DIR / STATE_FILE
    deadline = time.monotonic() + 300
    while not state.is_file():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return state


def test_run_killed_after_a_save_resumes_to_the_same_result(converted, straight, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "sla2cli", "finetune", str(converted), "--out", str(out), *RUN8]
    # The same thread count as this process, which runs the straight and the resumed parts: float sums are
    # bit-identical only under the same split.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    wait_for_first_save(process, out)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert _cli(["finetune", str(converted), "--out", str(out), "--resume", *RUN8]) == 0
    assert_same_run(straight, out)


def test_interrupted_run_saves_says_how_to_resume_and_resumes(converted, straight, tmp_path, capsys, monkeypatch):
    out = tmp_path / "stopped"
    original = loop_module.train_step

    def interrupted_after_step_3(trainer, step):
        result = original(trainer, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3: it finishes, saves, and stops
        return result

    monkeypatch.setattr(loop_module, "train_step", interrupted_after_step_3)
    code, stdout, err = run_cli(["finetune", str(converted), "--out", str(out), *RUN8], capsys)
    monkeypatch.undo()
    assert code == 128 + signal.SIGINT, err
    assert "resume with: sla2 finetune" in " ".join(stdout.split()) and not err
    assert read_config(out).measurements["finetune_steps"] == 3
    assert _cli(["finetune", str(converted), "--out", str(out), "--resume", *RUN8]) == 0
    assert_same_run(straight, out)


def test_qat_and_distillation_and_gradient_checkpointing(converted, tmp_path):
    out = tmp_path / "qat"
    assert _cli(["finetune", str(converted), "--out", str(out), "--steps", "2", "--quant", "int8", "--objective",
                 "distill", "--gradient-checkpointing", *FAST]) == 0
    config = read_config(out)
    assert config.quantization == "int8" and config.measurements["finetune_objective"] == "distill"
    assert {layer.quant for layer in sla2_layers(sla2cli.load(out)).values()} == {"int8"}
    losses = [sla2cli.finetune(sla2cli.load(converted), steps=2, batch_size=2, clip=(2, 16, 16),
                               validation_samples=1, gradient_checkpointing=flag).losses for flag in (False, True)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_quant_auto_says_what_it_runs_and_is_stored_as_asked(converted, tmp_path, capsys):
    out = tmp_path / "auto"
    code, stdout, err = run_cli(["finetune", str(converted), "--out", str(out), "--steps", "1", "--quant", "auto",
                                 "--batch-size", "2", "--validation-samples", "2", "--clip", "2,16,16",
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    assert "auto: none (the low-bit modes are emulated on cpu" in " ".join(stdout.split())
    assert read_config(out).quantization == "auto"  # resolved per call on whatever GPU loads it


def test_python_api_trains_a_dense_baseline_and_chosen_parameters(converted):
    dense = load_embedded_model()  # the shipped weights, not converted
    summary = sla2cli.finetune(dense, steps=2, batch_size=2, clip=(2, 16, 16), validation_samples=2)
    assert summary.validation_before == summary.dense_validation  # no SLA2 layer: the model is the dense one
    assert len(summary.losses) == 2 and summary.validation_after == sla2cli.evaluate(
        dense, clip=(2, 16, 16), validation_samples=2)

    model = sla2cli.load(converted)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    summary = sla2cli.finetune(model, steps=2, batch_size=2, clip=(2, 16, 16), validation_samples=2,
                               train=["*.alpha_*"], sla2_lr=1e-2)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(".alpha_" in name for name in changed)
    assert summary.trainable_parameters == 12 and summary.validation_before > summary.dense_validation


def test_attention_runs_in_the_autocast_dtype():
    layer = SLA2Attention(2, 64, sparsity=0.5)
    q, k = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)  # float32 from the norms, as on a GPU
    v = torch.randn(1, 2, 256, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(q, k, v).dtype == torch.bfloat16


def _latents(folder: Path, channels: int) -> Path:
    with latent_folder_writer(folder) as writer:
        for index in range(3):
            writer.add(f"s{index}", torch.zeros(channels, 2, 16, 16), torch.zeros(8, 32))
    return folder


def test_bad_input_is_one_line_and_writes_nothing(converted, finetuned, tmp_path, capsys):
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("keep me")
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    sla2cli.save(sla2cli.load(None, sparsity=0.5), other)
    _latents(tmp_path / "wide", 16)
    fresh = str(tmp_path / "new")
    cases = [
        ([str(tmp_path / "empty"), "--out", fresh], "not an SLA2 checkpoint"),
        ([str(converted), "--out", str(user_folder)], "not an sla2 checkpoint"),
        ([str(converted), "--out", fresh, "--steps", "0"], "--steps"),
        ([str(converted), "--out", fresh, "--lr", "-1"], "--lr"),
        ([str(converted), "--out", fresh, "--data", str(tmp_path / "missing")], "no such folder"),
        ([str(converted), "--out", fresh, "--data", str(tmp_path / "empty")], "no manifest.json"),
        ([str(converted), "--out", fresh, "--data", str(tmp_path / "wide")], r"shard-00000.*16 channels"),
        ([str(converted), "--out", fresh, "--data", str(tmp_path / "wide"), "--clip", "2,16,16"], "--clip"),
        ([str(converted), "--out", fresh, "--batch-size", "3", "--grad-accum", "2"], "multiple of processes"),
        ([str(other), "--out", str(finetuned), "--resume", "--steps", "4", "--clip", "2,16,16"], "another model"),
        ([str(converted), "--out", str(finetuned), "--resume", "--steps", "4", "--clip", "2,16,16", "--lr", "1e-3"],
         "other settings"),
        ([str(converted), "--out", str(finetuned), "--resume", "--steps", "4", "--clip", "2,8,8"], "other data"),
        ([str(converted), "--out", str(user_folder), "--resume"], "no fine-tuning state"),
        ([str(converted), "--out", str(converted), "--overwrite"], "must differ"),
    ]
    listing = folder_listing(tmp_path)
    finetuned_listing = folder_listing(finetuned)
    for args, message in cases:
        code, _, err = run_cli(["finetune", *args, *QUIET], capsys)
        assert_user_error(code, err, mentions=message)
        assert folder_listing(tmp_path) == listing and folder_listing(finetuned) == finetuned_listing
    assert (user_folder / "notes.txt").read_text() == "keep me"


def test_help_lists_finetune(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "finetune" in out
    code, out, _ = run_cli(["finetune", "--help"], capsys)
    assert code == 0 and "--resume" in out and "--objective" in out


def test_hub_model_finetunes_on_a_latent_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")
    cache = tmp_path / "hub"
    use_hub_cache(monkeypatch, cache)
    for name in ("wan2.1-t2v-1.3b", "cogvideox-2b"):
        recipe = get_recipe(name)
        publish_to_hub_cache(cache, recipe.hub_id, scaled_down_components(recipe))
        assert _cli(["convert", recipe.hub_id, "--sparsity", "0.9", "--out", str(tmp_path / name)]) == 0
    generator = torch.Generator().manual_seed(0)
    with latent_folder_writer(tmp_path / "latents") as writer:  # scaled-down Wan: 16 channels, text width 32
        for index in range(4):
            writer.add(f"clip-{index}", torch.randn(16, 2, 16, 16, generator=generator),
                       torch.randn(16, 32, generator=generator))
    wan, out = tmp_path / "wan2.1-t2v-1.3b", tmp_path / "wan-ft"

    code, _, err = run_cli(["finetune", str(wan), "--out", str(out), *QUIET], capsys)
    assert_user_error(code, err, mentions="needs training data")
    code, _, err = run_cli(["finetune", str(tmp_path / "cogvideox-2b"), "--out", str(out), *QUIET], capsys)
    assert_user_error(code, err, mentions="not supported yet")
    assert _cli(["finetune", str(wan), "--out", str(out), "--data", str(tmp_path / "latents"), "--steps", "2",
                 "--batch-size", "2", *QUIET]) == 0  # the recipe turns gradient checkpointing on

    config = read_config(out)
    assert (config.base.source, config.base_weights) == ("hub", "included")
    assert "3 precomputed clips of latents (1 held out)" in (out / "README.md").read_text()
    rows = read_metrics_csv(out / TRAINING_METRICS_FILE)
    assert len(train_losses(rows)) == 2
    model = sla2cli.load(out)
    assert sla2cli.evaluate(model, tmp_path / "latents") == validations(rows)[-1][1]


def test_gpu_script_runs_at_tiny_sizes_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("finetune_gpu", ROOT / "benchmarks" / "finetune_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["finetune_gpu.py", "--out", str(tmp_path), "--device", "cpu", "--phases", "qat,wan", "--steps", "1",
            "--clip", "2,16,16", "--validation-samples", "1", "--wan-scaled-down", "--wan-latents", "16,2,16,16",
            "--wan-text", "16,32", "--wan-steps", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        script.main()
    with (tmp_path / "finetune_gpu.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["phase"], row["train_quant"], row["eval_quant"]) for row in rows] == [
        ("qat", "int8", "int8"), ("qat", "int8", "none"), ("wan", "none", "none")]
    assert all(row["device"] == "cpu" and row["commit"] and float(row["val_loss_after"]) > 0 for row in rows)


@pytest.mark.gpu
def test_finetune_on_a_gpu_trains_fp32_master_weights_under_bf16_autocast(converted, tmp_path):
    out = tmp_path / "gpu"
    assert _cli(["finetune", str(converted), "--out", str(out), "--steps", "3", "--batch-size", "2", "--quant",
                 "int8", "--validation-samples", "2", "--quiet", "--device", "cuda"]) == 0
    rows = read_metrics_csv(out / TRAINING_METRICS_FILE)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in train_losses(rows))
    model = sla2cli.load(out, quant="int8", dtype=torch.float32, device="cuda")
    assert sla2cli.evaluate(model, validation_samples=2) == pytest.approx(validations(rows)[-1][1], rel=1e-4)
    assert load_file(str(out / WEIGHTS))["proj_out.weight"].dtype == torch.float32


@pytest.mark.gpu
def test_finetune_on_a_gpu_at_the_default_sparsity(tmp_path):
    """`sla2 convert` (0.97) then `sla2 finetune` on CUDA at the default clip: the routing kernels under bf16
    autocast with the router's projections (the route kernel of an earlier release failed to compile there)."""
    import sla2_kernels

    assert sla2_kernels.routes_in_kernel(512)  # 8192 tokens in key blocks of 16
    converted, out = tmp_path / "c97", tmp_path / "f97"
    assert _cli(["convert", "--out", str(converted)]) == 0
    assert _cli(["finetune", str(converted), "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--validation-samples", "1", "--quiet", "--device", "cuda"]) == 0
    losses = train_losses(read_metrics_csv(out / TRAINING_METRICS_FILE))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(loss)) for loss in losses)


def test_running_out_of_memory_is_one_line_with_what_to_change(converted, tmp_path, capsys, monkeypatch):
    def out_of_memory(trainer, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop_module, "train_step", out_of_memory)
    out = tmp_path / "oom"
    code, stdout, err = run_cli(["finetune", str(converted), "--out", str(out), *RUN8], capsys)
    assert code == 2 and "Traceback" not in err, err
    message = " ".join(err.split())
    assert "out of memory on cpu" in message and "--gradient-checkpointing" in message and "--grad-accum" in message
    assert not out.exists()  # nothing was saved before the first step
