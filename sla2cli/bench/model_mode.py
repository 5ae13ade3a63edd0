"""Model mode: one transformer forward (and training step) with dense self-attention, then with SLA2.

Same weights and inputs for both: the dense run swaps the model's original processors back in for its
duration. Cross-attention and everything else run the same code in both. On a GPU, torch SDPA is pinned
to its FlashAttention2 backend in both runs where it can be (so the dense row is FA2 and speedups are
vs FA2); otherwise torch picks the backend and the dense row is called "sdpa".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sla2cli.bench.cases import FORWARD, FORWARD_BACKWARD, AttentionShape
from sla2cli.bench.checks import KernelMismatch, relative_error
from sla2cli.bench.environment import Environment
from sla2cli.bench.flops import block_budget
from sla2cli.bench.kernel_mode import fill_speedups
from sla2cli.bench.model_setup import (
    BenchModel,
    ModelRequest,
    prepare_model,
    probe_attention_shape,
    run_forward,
)
from sla2cli.bench.records import OK, OUT_OF_MEMORY, Measurement
from sla2cli.bench.timing import CacheFlusher, TimingPlan, time_call
from sla2cli.errors import UserError
from sla2cli.integration.conversion import dense_processors, model_quant
from sla2cli.ops.quantization import QUANT_AUTO, choose_auto_quant, resolve_quant_mode

FA2, SDPA, SLA2 = "fa2", "sdpa", "sla2"


@dataclass(frozen=True)
class ModelBenchPlan:
    model: str
    resolution: str | None
    frames: int | None
    random_weights: bool
    scaled_down: bool
    train_step: bool
    sparsity: float | None
    dtype: torch.dtype
    device: torch.device
    timing: TimingPlan
    seed: int = 0

    def request(self) -> ModelRequest:
        return ModelRequest(
            model=self.model, resolution=self.resolution, frames=self.frames,
            random_weights=self.random_weights, scaled_down=self.scaled_down, sparsity=self.sparsity,
            dtype=self.dtype, device=self.device, seed=self.seed,
        )

    @property
    def modes(self) -> list[str]:
        return [FORWARD, FORWARD_BACKWARD] if self.train_step else [FORWARD]


def _pinned_fa2() -> AbstractContextManager:
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def choose_dense_backend(
    bench: BenchModel, device: torch.device
) -> tuple[str, Callable[[], AbstractContextManager]]:
    """FA2 on a GPU when every dense SDPA call of the model can use it, else torch's own choice."""
    if device.type == "cuda":
        try:
            with torch.no_grad(), _pinned_fa2(), dense_processors(bench.model):
                run_forward(bench.model, bench.inputs)
            return FA2, _pinned_fa2
        except RuntimeError as error:
            if "No available kernel" not in str(error):
                raise
    return SDPA, nullcontext


def uses_checkpointing(bench: BenchModel) -> bool:
    """Gradient checkpointing where the recipe's fine-tuning uses it and the model class supports it."""
    wanted = bool(bench.recipe.finetune.get("gradient_checkpointing"))
    return wanted and bool(getattr(bench.model, "_supports_gradient_checkpointing", False))


@contextmanager
def _training(bench: BenchModel) -> Iterator[None]:
    """Parameters require grad for the duration; gradient checkpointing where the recipe's
    fine-tuning uses it (what a real training step at this size would run)."""
    model = bench.model
    checkpointing = uses_checkpointing(bench)
    model.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        if checkpointing:
            model.disable_gradient_checkpointing()


def _step(bench: BenchModel, mode: str, grad_out: torch.Tensor) -> Callable[[], None]:
    if mode == FORWARD:

        def forward() -> None:
            with torch.no_grad():
                run_forward(bench.model, bench.inputs)

        return forward

    def forward_backward() -> None:
        bench.model.zero_grad(set_to_none=True)
        run_forward(bench.model, bench.inputs).backward(grad_out)

    return forward_backward


def _drop_gradients(bench: BenchModel) -> None:
    """Frees the model's gradients, as a training step's optimizer.zero_grad(set_to_none=True) does."""
    bench.model.zero_grad(set_to_none=True)


def _time_model(
    bench: BenchModel,
    mode: str,
    grad_out: torch.Tensor,
    plan: ModelBenchPlan,
    flusher: CacheFlusher,
    row: Measurement,
) -> None:
    step = _step(bench, mode, grad_out)
    try:
        timing = time_call(step, plan.device, plan.timing, flusher, before_each=lambda: _drop_gradients(bench))
        row.peak_mem_mb = timing.peak_extra_mb
    except torch.OutOfMemoryError:
        row.status, row.note = OUT_OF_MEMORY, "out of GPU memory"
        return
    finally:
        _drop_gradients(bench)
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    row.median_ms, row.min_ms, row.repeats = timing.median_ms, timing.min_ms, timing.repeats


def run_model_bench(
    plan: ModelBenchPlan,
    environment: Environment,
    on_step: Callable[[str], None] = lambda description: None,
) -> list[Measurement]:
    """Rows for dense and SLA2 at each mode; SLA2 rows carry the output's error vs the dense model."""
    on_step("building the model")
    try:
        bench = prepare_model(plan.request())
        on_step("first SLA2 forward")
        shape, sla2_out = probe_attention_shape(bench)
    except torch.OutOfMemoryError:
        raise UserError(
            "out of GPU memory building or running the model; try a smaller --resolution or --frames"
        ) from None
    if not torch.isfinite(sla2_out).all():
        raise KernelMismatch("sla2: the converted model's output is not finite")
    dense_name, backend = choose_dense_backend(bench, plan.device)
    with torch.no_grad(), backend(), dense_processors(bench.model):
        dense_out = run_forward(bench.model, bench.inputs)
    error = relative_error(sla2_out, dense_out)
    grad_out = torch.randn_like(dense_out)
    flusher = CacheFlusher(plan.device)
    common = {
        "model": bench.description, "clip": f"{bench.size.height}x{bench.size.width}x{bench.size.frames}",
    }
    rows: list[Measurement] = []
    for mode in plan.modes:
        training = _training(bench) if mode == FORWARD_BACKWARD else nullcontext()
        with training:
            for name in (dense_name, SLA2):
                on_step(f"{name} {mode}")
                row = _row(name, shape, bench, mode, plan, environment, common, error)
                dense_only = dense_processors(bench.model) if name != SLA2 else nullcontext()
                with backend(), dense_only:
                    _time_model(bench, mode, grad_out, plan, flusher, row)
                rows.append(row)
    fill_speedups(rows)
    _fill_speedup_vs_dense(rows)
    return rows


def _row(
    name: str, shape: AttentionShape, bench: BenchModel, mode: str, plan: ModelBenchPlan,
    environment: Environment, common: dict[str, object], error: float,
) -> Measurement:
    is_sla2 = name == SLA2
    quant, decision = _resolved_quant(bench, plan.device, shape, mode) if is_sla2 else (None, None)
    what = "training step (forward + backward)" if mode == FORWARD_BACKWARD else "forward"
    if is_sla2:
        attention = f"SLA2 self-attention at sparsity {bench.sparsity:g}, output {error:.3g} from dense (rel. L2)"
    else:
        attention = f"dense self-attention ({name})"
    return Measurement(
        provider=name,
        shape=shape.label,
        sparsity=bench.sparsity if is_sla2 else None,
        mode=mode,
        note="; ".join(filter(None, [f"{bench.description}: one transformer {what}, {attention}", decision])),
        **block_budget(shape, bench.sparsity if is_sla2 else None)._asdict(),
        dtype=str(plan.dtype).removeprefix("torch."),
        quant=quant,
        extra={
            **common,
            "checkpointing": mode == FORWARD_BACKWARD and uses_checkpointing(bench),
            "rel_error_vs_dense": error if is_sla2 else 0.0,
            "speedup_vs_dense": None,
        },
        environment=environment.as_dict(),
    )


def _resolved_quant(
    bench: BenchModel, device: torch.device, shape: AttentionShape, mode: str
) -> tuple[str, str | None]:
    """The sparse-branch mode the converted model runs here (a checkpoint may ask for a low-bit one), and for
    `auto` the line that says why."""
    request = model_quant(bench.model)
    if request == QUANT_AUTO:
        decision = choose_auto_quant(device, shape.dims, training=mode == FORWARD_BACKWARD)
        return decision.mode, decision.reason
    return resolve_quant_mode(request, device), None


def _fill_speedup_vs_dense(rows: list[Measurement]) -> None:
    dense = {r.mode: r.median_ms for r in rows if r.provider != SLA2 and r.status == OK}
    for row in rows:
        reference = dense.get(row.mode)
        if reference and row.median_ms:
            row.extra["speedup_vs_dense"] = reference / row.median_ms
