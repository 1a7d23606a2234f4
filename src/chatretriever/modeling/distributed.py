"""The processes of a launched run (torchrun, accelerate): whether an accelerator is visible,
the check that a launcher's processes form one group, gathering a tensor over them, this process's
rank, and closing the group once training is done. Without a process group: one process, rank 0.
"""

from __future__ import annotations

import os

import torch
from transformers import TrainingArguments


def check_one_process_group(args: TrainingArguments) -> None:
    """Raise when a launcher started several processes that do not train together (each would
    train alone on the whole data, its in-batch negatives its own batch, and overwrite the
    others' output)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise ValueError(
            f"launched as {launched} processes but training in a group of {args.world_size}: "
            f"use_cpu={args.use_cpu} where a GPU is {'' if accelerator_visible() else 'not '}"
            "visible (set training.use_cpu to match the launcher)"
        )


def accelerator_visible() -> bool:
    """Whether this process sees a GPU (or another torch accelerator) to train on."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator else torch.cuda.is_available()


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor over all processes (rank order), keeping gradients for the local
    part; needs an initialised process group."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    if t.requires_grad:
        return torch.cat(all_gather(t))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def close_process_group() -> bool:
    """Destroys the process group of a launched run (torchrun, accelerate) once training is done
    (call it on success only: it waits for every rank); a no-op without one. Left to interpreter
    exit, gloo's threads can abort a process that already saved ("terminate called without an
    active exception"). Returns whether a group was closed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()  # no rank tears down while another still talks
    dist.destroy_process_group()
    return True


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
