"""Run a function in 2 processes joined in a gloo process group, as torchrun would start them."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    torch.set_num_threads(1)
    from memtune import distributed

    distributed.init_from_env()
    try:
        fn(rank, *args)
    finally:
        distributed.shutdown()


def run_ranks(fn: Callable, *args, world: int = 2) -> None:
    """fn(rank, *args) in `world` processes; fn must be importable (module level) and write its
    results to files. Raises if any process fails."""
    mp.start_processes(_worker, args=(world, free_port(), fn, args), nprocs=world, start_method="spawn")
