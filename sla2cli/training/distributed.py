"""One process or many (torchrun): process group, FSDP2 sharding, collectives, full state dicts.

Under `torchrun --nproc-per-node N sla2 finetune ...` every process loads the model, shards it with
FSDP2 (`fully_shard` on each transformer block, then on the root; each rank keeps 1/N of the weights,
gradients and optimizer state) and trains on its share of the global batch. NCCL on GPUs, gloo on
CPUs, so the same code runs in CI. Saving gathers full state dicts on rank 0, which alone writes.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from sla2cli.errors import UserError

GATHER_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over every process (the value itself when alone)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any(self, flag: bool) -> bool:
        """True on every process when any process says True (e.g. a stop request seen by one of them)."""
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order (on every process)."""
        if not self.distributed:
            return [value]
        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, value)
        return found


def start_processes(device: torch.device) -> Processes:
    """Join the process group torchrun describes in the environment; alone when there is none.

    On CUDA each process takes the GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                            "start at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=(
            device if device.type == "cuda" else None))
    return Processes(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def stop_processes(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard_model(model: nn.Module) -> None:
    """FSDP2 in place: each transformer block is one unit (gathered for its forward and backward), then
    the root holds the rest (embeddings, output head)."""
    blocks = getattr(model, "blocks", None) or getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise UserError(f"{type(model).__name__} has no transformer blocks to shard over processes")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    # diffusers returns the output as a view of the last projection; the losses only read it (no in-place op
    # on it), which is the case FSDP2's warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient reduce-scatter on all but the last accumulation step (sharded models only)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU of rank 0 (empty elsewhere); call on every process."""
    return get_model_state_dict(model, options=GATHER_OPTIONS)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter names, on the CPU of rank 0; call on every process."""
    return get_optimizer_state_dict(model, optimizer, options=GATHER_OPTIONS)


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], processes: Processes
) -> None:
    """Load a full optimizer state (read on rank 0 only when sharded: it is broadcast to the others)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=processes.distributed)
    set_optimizer_state_dict(model, optimizer, state, options=options)
