"""Rank, world size, process group, and main-process helpers.

The only module that reads launcher environment variables. torchrun, `accelerate launch` and the
`deepspeed` CLI all export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain
`python -m dpkit.train` (no launcher) runs as a single process on a free local port.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher; (0, 0, 1) when started directly."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return rank, local_rank, world_size


def is_main_process() -> bool:
    """Before the process group exists too: rank 0 prints user errors, the others stay quiet."""
    return launcher_env()[0] == 0


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


_ENV: DistEnv | None = None


def setup(timeout_s: int) -> DistEnv:
    """Start the process group once per process (safe to call again: runs share it)."""
    global _ENV
    if _ENV is not None:
        return _ENV
    import deepspeed

    rank, local_rank, world_size = launcher_env()
    if "MASTER_ADDR" not in os.environ:  # started without a launcher: one process
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE="1")
    backend = backend_for_device()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                               verbose=False)
    _ENV = DistEnv(rank, local_rank, world_size, backend, device)
    return _ENV


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (float64: exact for token counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()
