"""MPI launcher detection, the torch rendezvous that rides on it, and the choice of transport.

`dist.init_process_group("fltorrent")` uses torch's `env://` rendezvous, which needs RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT.  `mpiexec` and `srun` set none of them, so `prepare_env()` (called by
`import fltorrent_hpc`) fills them in from MPI: torch rank r is MPI rank r of COMM_WORLD, and rank 0
picks its host and a free port and shares them with one bounded broadcast.  Variables that are already
set are left alone, so torchrun-style setups and explicit sbatch exports keep working.

`transport_choice()` picks the backend's data plane: MPI under an MPI launcher, torch's own point-to-point
(gloo, transport/torch_p2p.py) otherwise, e.g. under torchrun; FLTORRENT_TRANSPORT=mpi|torch overrides it.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from .errors import LaunchError

# (launcher, rank variable, size variable, local-rank variable); first match wins.
_LAUNCHER_ENV = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("pmix", "PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
_ADDR_BYTES = 256  # fixed-width broadcast record: host (utf-8, NUL padded) + port


@dataclass(frozen=True)
class LauncherInfo:
    """What the launcher told this process about itself (no MPI call needed to learn it)."""

    name: str
    rank: int
    size: int
    local_rank: int


def detect_launcher(environ: dict | None = None) -> LauncherInfo | None:
    """The MPI launcher (mpiexec/mpirun/srun) this process runs under, or None for a plain `python`.

    srun without a task step (plain `python` inside `salloc`) has SLURM_PROCID but no SLURM_STEP_ID; it
    is not a launch.
    """
    env = os.environ if environ is None else environ
    for name, rk, sz, lr in _LAUNCHER_ENV:
        if rk not in env:
            continue
        if name == "slurm" and "SLURM_STEP_ID" not in env:
            continue
        try:
            rank = int(env[rk])
            size = int(env.get(sz, "0")) or _size_from_slurm(env)
            local = int(env.get(lr, "0") or 0)
        except ValueError:
            continue
        if size <= 0:
            continue
        return LauncherInfo(name, rank, size, local)
    return None


def _size_from_slurm(env) -> int:
    try:
        return int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NPROCS", "0")))
    except ValueError:
        return 0


TRANSPORTS = ("auto", "mpi", "torch")


def transport_choice(environ: dict | None = None) -> str:
    """ "mpi" under mpiexec/srun, "torch" without an MPI launcher (torchrun, a plain env:// launch); the
    FLTORRENT_TRANSPORT variable (auto, mpi, torch) overrides the detection."""
    env = os.environ if environ is None else environ
    want = env.get("FLTORRENT_TRANSPORT", "auto").strip().lower() or "auto"
    if want not in TRANSPORTS:
        raise LaunchError(f"FLTORRENT_TRANSPORT={want!r}: choose one of {', '.join(TRANSPORTS)}")
    if want != "auto":
        return want
    return "mpi" if detect_launcher(env) is not None else "torch"


def env_store(timeout_s: float, environ: dict | None = None) -> tuple[Any, int, int]:
    """(store, rank, world size) for a launch without MPI: the default group's store once torch.distributed is
    initialised, else the env:// rendezvous that torchrun's variables describe, else (a plain `python`, no RANK
    nor WORLD_SIZE) a private store of one rank.  Bounded by `timeout_s`."""
    from datetime import timedelta

    import torch.distributed as dist

    env = os.environ if environ is None else environ
    if dist.is_initialized():
        return dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size()
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return dist.HashStore(), 0, 1
    try:
        store, rank, size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    except (ValueError, RuntimeError) as e:  # a missing variable, an unreachable MASTER_ADDR:MASTER_PORT
        raise LaunchError(f"fltorrent: no MPI launcher and no usable env:// rendezvous: {e}") from e
    return store, int(rank), int(size)


def free_port(host: str = "") -> int:
    """A TCP port that is free right now (the OS picks it); small race window, as with torchrun."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bounded_bcast(comm, buf, root: int, timeout_s: float) -> None:
    """Ibcast + Test loop, so a rank that never joins cannot hang the others forever."""
    req = comm.Ibcast(buf, root=root)
    deadline = time.monotonic() + timeout_s
    delay = 0.0
    while not req.Test():
        if time.monotonic() > deadline:
            raise LaunchError(
                f"fltorrent rendezvous: rank {comm.Get_rank()} waited {timeout_s:.0f}s for rank {root}'s "
                "address broadcast; did every rank `import fltorrent_hpc`?"
            )
        time.sleep(delay)
        delay = min(2 * delay + 1e-5, 1e-3)


def rendezvous(comm=None, *, timeout_s: float | None = None, environ: dict | None = None) -> dict[str, str]:
    """Collective over `comm` (default COMM_WORLD): set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.

    Rank 0's view decides the address: its MASTER_ADDR/MASTER_PORT if it has them, else its host name and
    a free port.  Ranks on rank 0's host use 127.0.0.1 (robust in containers whose host name does not
    resolve).  Returns the variables this rank ended up with.
    """
    import numpy as np
    from mpi4py import MPI

    env = os.environ if environ is None else environ
    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    if timeout_s is None:
        timeout_s = float(env.get("FLTORRENT_TIMEOUT_S", "300"))
    for var, want in (("RANK", rank), ("WORLD_SIZE", size)):
        if var in env and env[var] != str(want):
            raise LaunchError(
                f"{var}={env[var]} but MPI says {want}: fltorrent maps torch rank r to MPI rank r; "
                f"unset {var} or launch with mpiexec/srun only (not torchrun)"
            )
    host = socket.gethostname()
    buf = np.zeros(_ADDR_BYTES, dtype=np.uint8)
    if rank == 0:
        addr = env.get("MASTER_ADDR") or host
        port = int(env.get("MASTER_PORT") or free_port())
        rec = f"{addr}\0{port}\0{host}".encode()
        if len(rec) > _ADDR_BYTES:
            raise LaunchError(f"MASTER_ADDR {addr!r} is too long for the rendezvous record")
        buf[: len(rec)] = np.frombuffer(rec, dtype=np.uint8)
    _bounded_bcast(comm, buf, 0, timeout_s)
    addr, port_s, host0 = bytes(buf).rstrip(b"\0").decode().split("\0")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = "127.0.0.1" if (host0 == host and addr == host0) else addr
    env.setdefault("MASTER_PORT", port_s)
    env.setdefault("RANK", str(rank))
    env.setdefault("WORLD_SIZE", str(size))
    launcher = detect_launcher(env)
    env.setdefault("LOCAL_RANK", str(launcher.local_rank if launcher else 0))
    return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def prepare_env(environ: dict | None = None) -> dict[str, str] | None:
    """Import-time hook: under mpiexec/srun run `rendezvous()`; under a plain `python` do nothing.

    Set FLTORRENT_RENDEZVOUS=0 to skip it (then provide the env:// variables yourself).  Returns what
    `rendezvous` returned, or None when it did not run.
    """
    env = os.environ if environ is None else environ
    if env.get("FLTORRENT_RENDEZVOUS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if detect_launcher(env) is None:
        return None
    return rendezvous(environ=env)


def check_world(torch_rank: int, torch_size: int) -> None:
    """Raise LaunchError unless torch's default group is exactly MPI's COMM_WORLD (rank r == MPI rank r)."""
    from mpi4py import MPI

    mrank, msize = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    if (mrank, msize) == (torch_rank, torch_size):
        return
    if msize == 1 and detect_launcher() is None:
        raise LaunchError(
            f"fltorrent: torch asked for world_size={torch_size} but this process was not started by an MPI "
            f"launcher; run `mpiexec -n {torch_size} python ...` or `srun -n {torch_size} python ...`"
        )
    raise LaunchError(
        f"fltorrent: torch rank/world ({torch_rank}/{torch_size}) differ from MPI COMM_WORLD ({mrank}/{msize}); "
        "fltorrent needs torch rank r == MPI rank r: launch with mpiexec/srun and leave RANK/WORLD_SIZE unset"
    )
