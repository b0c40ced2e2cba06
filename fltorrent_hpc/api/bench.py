"""Benchmark hook: the time of one all_gather through the "fltorrent" backend (jobs/bench_allgather.py)."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from .group import BACKEND_NAME
from .registration import register_backend


def bench_backend_allgather(nbytes: int, iters: int = 20, *, warmup: int = 1, group: Any = None) -> float:
    """Seconds per `dist.all_gather_into_tensor` through the fltorrent backend (max over ranks, mean of iters).

    nbytes is the per-rank input size (MPI_Allgather's sendcount in bytes; nccl-tests' size = nbytes * world).
    Collective; initialises the default group with "fltorrent" when torch.distributed is not initialised.
    """
    if not dist.is_initialized():
        register_backend()
        dist.init_process_group(BACKEND_NAME)
    pg = group if group is not None else dist.group.WORLD
    if dist.get_backend(pg) != BACKEND_NAME:
        pg = dist.new_group(backend=BACKEND_NAME)
    n = dist.get_world_size(pg)
    inp = torch.full((int(nbytes),), dist.get_rank(pg) % 251, dtype=torch.uint8)
    out = torch.empty(n * int(nbytes), dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # 2.13 prefers the name all_gather_single
        for _ in range(warmup):
            dist.all_gather_into_tensor(out, inp, group=pg)
        dist.barrier(group=pg)
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_gather_into_tensor(out, inp, group=pg)
    dt = torch.tensor([(time.perf_counter() - t0) / max(iters, 1)], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=pg)
    return float(dt.item())
