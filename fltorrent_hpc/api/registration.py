"""Registration of the torch.distributed backend "fltorrent" and the creator torch calls for each group.

`import fltorrent_hpc` calls `register_backend()`; torch then calls `_create_process_group` for the default
group and for every `dist.new_group(..., backend="fltorrent")` member.  Under an MPI launcher it maps the torch
group onto an MPI communicator (COMM_WORLD or a sub-communicator of exactly those world ranks); without one
(torchrun, a plain env:// launch) it connects the members with torch's own gloo point-to-point, bootstrapped
from the Store torch hands the creator (a store of the group's own, so sub-groups work the same way).
"""

from __future__ import annotations

import threading
import zlib
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..config import SwarmConfig
from ..errors import LaunchError, PeerTimeoutError, UnsupportedError
from .group import BACKEND_NAME, FLTorrentProcessGroup

_REG_LOCK = threading.Lock()


def register_backend() -> None:
    """Register "fltorrent" with torch.distributed once (devices cpu and cuda, extended API); idempotent."""
    with _REG_LOCK:
        if BACKEND_NAME.upper() in dist.Backend._plugins:
            return
        dist.Backend.register_backend(BACKEND_NAME, _create_process_group, extended_api=True, devices=["cpu", "cuda"])


register = register_backend


def _create_process_group(dist_opts: Any, backend_options: Any = None) -> FLTorrentProcessGroup:
    """Creator called by torch for the default group and for every `new_group` member (non-members never are)."""
    from ..launch import check_world, transport_choice

    if backend_options is not None and not isinstance(backend_options, SwarmConfig):
        raise UnsupportedError(f"fltorrent pg_options must be a SwarmConfig, got {type(backend_options).__name__}")
    config = backend_options if backend_options is not None else SwarmConfig.from_env()
    torch_timeout: timedelta = dist_opts.timeout
    explicit = torch_timeout != dist.constants.default_pg_timeout
    timeout_s = torch_timeout.total_seconds() if explicit else config.timeout_s
    rank, size = int(dist_opts.group_rank), int(dist_opts.group_size)
    ranks = [int(r) for r in dist_opts.global_ranks_in_group]
    if transport_choice() == "torch":
        from ..transport.torch_p2p import connect

        net = connect(dist_opts.store, rank, size, timeout_s=timeout_s)
        members = ranks or list(range(size))
        return FLTorrentProcessGroup(
            net, timeout_s=timeout_s, config=config, global_ranks=members, name=str(dist_opts.group_id)
        )
    from mpi4py import MPI

    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise LaunchError("fltorrent needs MPI_THREAD_MULTIPLE; unset MPI4PY_RC_THREAD_LEVEL or set it to 'multiple'")
    if not ranks:  # the default group: torch's world must be MPI's world
        check_world(rank, size)
        comm = MPI.COMM_WORLD
        ranks = list(range(size))
    else:
        world = MPI.COMM_WORLD
        if dist.is_initialized() and dist.get_rank() != world.Get_rank():
            raise LaunchError(
                f"fltorrent subgroup: torch global rank {dist.get_rank()} != MPI rank {world.Get_rank()}; "
                "launch with mpiexec/srun so torch rank r == MPI rank r"
            )
        _store_presence_barrier(dist_opts.store, rank, size, timeout_s)
        tag = zlib.crc32(str(dist_opts.group_id).encode()) % 30000
        comm = world.Create_group(world.Get_group().Incl(ranks), tag)
        if comm.Get_rank() != rank or comm.Get_size() != size:
            raise LaunchError(f"fltorrent subgroup {ranks}: MPI placed this rank at {comm.Get_rank()}, torch at {rank}")
    return FLTorrentProcessGroup(
        comm,
        timeout_s=timeout_s,
        config=config,
        global_ranks=ranks,
        name=str(dist_opts.group_id),
        owns_comm=comm != MPI.COMM_WORLD,
    )


def _store_presence_barrier(store: Any, rank: int, size: int, timeout_s: float) -> None:
    """Bounded check that every member arrived before the (unbounded) MPI_Comm_create_group."""
    store.set(f"fltorrent/arrived/{rank}", "1")
    keys = [f"fltorrent/arrived/{r}" for r in range(size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as e:  # torch raises DistStoreError/RuntimeError on timeout
        missing = [r for r in range(size) if not store.check([keys[r]])]
        raise PeerTimeoutError(
            f"fltorrent new_group: group ranks {missing} did not arrive within {timeout_s:.0f}s"
        ) from e
