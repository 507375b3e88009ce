"""Running under torchrun: process group, FSDP2 sharding, data sharding, full state dicts.

A single process (no WORLD_SIZE, or WORLD_SIZE=1) needs no launcher and no process group; every
function here then degenerates to the plain single-device operation, so the trainer has one code
path. Under torchrun each decoder layer of the student and of the teacher is its own FSDP2 unit;
see `shard_objective` for where the embeddings and heads go and why.
"""

from __future__ import annotations

import itertools
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor


_GLOO_SETTLE_SECONDS = 0.25  # see _leave_process_group


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1


def init_world() -> World:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); pick the device.

    A job that joins should also leave: see `joined_world`, which does both.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return World(rank, size, device)


@contextmanager
def joined_world() -> Iterator[World]:
    """This process's `World` for the length of a job. A job that joins the process group here leaves
    it when it returns normally; after an error it does not wait for the other ranks, which torchrun
    stops."""
    joined_before = dist.is_initialized()
    world = init_world()
    yield world
    if not joined_before and dist.is_initialized():
        _leave_process_group()


def _leave_process_group() -> None:
    """Wait for every rank to finish, then destroy the process group.

    With gloo, a worker thread releases each finished collective, and the tensors Python handed it,
    a moment after the caller's wait has returned; releasing a Python tensor takes the GIL. A thread
    that asks for the GIL while the interpreter shuts down is ended by Python, which aborts a process
    whose run has finished (pytorch/pytorch#117762). Gloo has no call that waits for its workers, so
    the main thread sleeps, without the GIL, long enough for them to release the last collectives.
    """
    dist.barrier()
    if dist.get_backend() == "gloo":
        time.sleep(_GLOO_SETTLE_SECONDS)
    dist.destroy_process_group()


def current_world(device: torch.device) -> World:
    """The world of an already initialised process group, or a single process on `device`."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return World(dist.get_rank(), dist.get_world_size(), device)
    return World(0, 1, device)


def shard_batches(batches: Iterable, world: World) -> Iterator:
    """This rank's share of a stream that every rank reads in the same order: every size-th item."""
    return itertools.islice(iter(batches), world.rank, None, world.size)


def shard_objective(objective: nn.Module) -> None:
    """Apply FSDP2 to a module holding `.student` and optionally `.teacher` (Hugging Face causal LMs).

    Each decoder layer of both models becomes its own unit. The teacher's remaining parameters
    (embeddings, final norm, lm_head) form one more unit, and the student's remaining ones go to
    the root unit, `objective` itself. Why not shard the heads separately: the chunked loss reads
    the *full* lm_head weights directly rather than calling lm_head. Inside the root's forward its
    unit is gathered (and FSDP keeps the root gathered through backward, then reduce-scatters the
    head's gradient like any other); the teacher's unit is gathered explicitly with `unshard()`
    around its use (see the objective's forward), because only its `.model` is called, never its
    own forward. The teacher keeps its own unit so its dtype may differ from the student's.

    Parameters are gathered in the dtype they are stored in (fp32 master weights for the student)
    and bf16 compute comes from autocast, exactly as on one GPU, rather than from FSDP's
    mixed-precision policy: that policy would also round the Mamba decay parameters (A_log, dt
    bias, D) and the embeddings, hence the whole residual stream, to bf16, so a sharded run would
    drift from a single-GPU one by more than reduction order. The price is fp32 all-gathers.

    Gradients are summed over ranks, not averaged: the loss is already divided by the token
    count of the whole global batch.
    """
    models = [objective.student] + ([objective.teacher] if objective.teacher is not None else [])
    for model in models:
        for layer in model.model.layers:
            if any(True for _ in layer.parameters()):  # identity layers hold nothing
                fully_shard(layer)
    if objective.teacher is not None:
        fully_shard(objective.teacher)
    fully_shard(objective)
    for module in objective.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.sharded:
        dist.all_reduce(tensor)
    return tensor


def barrier(world: World) -> None:
    if world.sharded:
        dist.barrier()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (e.g. a grad norm reduced over shards); plain tensors pass through."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """(model state, optimizer state) gathered to full CPU tensors on rank 0 ({} elsewhere).

    A collective under FSDP: every rank must call it. Optimizer state is keyed by parameter name,
    so it does not depend on how the model was sharded.
    """
    model_state = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL) if optimizer is not None else None
    return model_state, optim_state


def load_full_state(model: nn.Module, model_state: dict, optimizer=None, optim_state=None) -> None:
    """Inverse of `full_state`: every rank passes the full dicts and keeps its own shards."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
