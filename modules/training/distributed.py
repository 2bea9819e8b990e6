"""Distributed training plumbing: the process-group context and the samplers that fix the data order.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised from the environment (gloo on
CPU, nccl on CUDA); otherwise every method is a no-op for a single process. The training order is a
pure function of (seed, epoch), never of how often the process restarted.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from modules.core.processes import DieWithParent
from modules.core.errors import PipelineError
from modules.core.stage import env_int


@dataclass
class DistributedContext:
    """This process's place in a (possibly single-process) training job.

    ``rank`` / ``world_size`` / ``local_rank`` come from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``;
    ``owns_process_group`` is True when ``from_env`` initialised the group, so ``shutdown`` destroys
    only what it created. Collectives (``barrier``, ``all_reduce_sum``, ``all_gather_object``) are
    pass-throughs when ``world_size`` is 1; only the main rank (0) logs and writes files.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_process_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> "DistributedContext":
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; initialise the process group when ``WORLD_SIZE > 1``.
        A variable that is not a valid integer (or ``RANK`` missing or outside ``0..WORLD_SIZE - 1``)
        is a one-line ``PipelineError`` naming it."""
        env = os.environ
        world_size = env_int(env, "WORLD_SIZE", default=1, minimum=1)
        if world_size <= 1:
            return cls()
        rank = env_int(env, "RANK")
        if rank is None:
            raise PipelineError(f"environment variable RANK is not set but WORLD_SIZE={world_size} is: "
                                "set both (torchrun does)")
        if rank >= world_size:
            raise PipelineError(f"environment variable RANK={rank}: outside 0..{world_size - 1} "
                                f"(WORLD_SIZE={world_size})")
        local_rank = env_int(env, "LOCAL_RANK", default=rank)
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
            owns = True
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, owns_process_group=owns)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def shutdown(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


# --------------------------------------------------------------------------- samplers


class EpochSeededSampler(Sampler[int]):
    """A random permutation of ``range(num_samples)`` that is a pure function of (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardedSequentialSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: every sample on exactly one rank, no padding."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int) -> None:
    """Derive NumPy's and Python's seeds from a DataLoader worker's torch seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


@dataclass(frozen=True)
class TrainingWorkerInit:
    """The ``worker_init_fn`` of the training DataLoaders: the worker dies with the process that built
    the loader (``core.processes.DieWithParent``), then seeds NumPy and Python (``seed_worker``)."""

    die_with_parent: DieWithParent = field(default_factory=DieWithParent)

    def __call__(self, worker_id: int) -> None:
        self.die_with_parent(worker_id)
        seed_worker(worker_id)

