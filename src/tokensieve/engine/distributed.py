"""`torch.distributed` setup for `torchrun`, and nothing when run as one process.

`torchrun --nproc-per-node N -m tokensieve eval ...` sets RANK / WORLD_SIZE / LOCAL_RANK; `setup`
then joins the process group (gloo on CPU, NCCL with CUDA). A plain `python` run has no WORLD_SIZE
and stays single-process: no group, no barrier, no extra dependency.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import InputError

__all__ = ["World", "barrier", "epoch_batches", "gather", "on_main", "setup"]

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the run: `rank` of `size` processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device | None = None) -> World:
    """Join the process group torchrun describes in the environment (once), or run alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        # Leave the group before the interpreter tears down: a gloo group still alive at exit
        # destroys its worker threads unjoined, and the process aborts ("terminate called without
        # an active exception") after its work is done, which torchrun reports as a failure.
        atexit.register(_leave)
    return World(rank=dist.get_rank(), size=dist.get_world_size())


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every process (nothing to wait for when alone)."""
    if world.size > 1:
        dist.barrier()


def gather(world: World, value: Any) -> list[Any]:
    """Every process's `value` (picklable), in rank order, on every process."""
    if world.size == 1:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def on_main(world: World, fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 alone; its result there, None elsewhere. Every process waits for it, and
    an error of rank 0 is raised on every process (the same `InputError` or `OSError`, other
    errors as a RuntimeError naming it), so no process waits forever for one that failed."""
    if world.size == 1:
        return fn()
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except (InputError, OSError) as err:
            error = err
        except Exception as err:
            error = RuntimeError(f"process 0 failed: {type(err).__name__}: {err}")
            box = [error]
            dist.broadcast_object_list(box, src=0)
            raise
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    return result


def epoch_batches(num: int, *, batch_size: int, world: World, seed: int, epoch: int) -> Tensor:
    """This process's indices for every step of `epoch`: (steps, batch_size) long.

    The epoch's permutation (the same on every process) is cut into global batches of
    world.size * batch_size (the last incomplete one dropped); process r takes rows r, r + world, ...
    """
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed + epoch))  # (num,)
    size = batch_size * world.size
    steps = num // size
    batches = perm[: steps * size].view(steps, size)  # (steps, world * batch_size)
    return batches[:, world.rank :: world.size]  # (steps, batch_size)
