"""fltorrent_hpc: serverless federated averaging by BitTorrent-style chunk swarming over MPI (or, without an
MPI launcher, torch's gloo point-to-point).

`import fltorrent_hpc` registers the torch.distributed backend "fltorrent" and, under mpiexec/srun, fills in
the env:// rendezvous variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; see launch.py), so existing
torch code runs unchanged with `dist.init_process_group("fltorrent")`, under torchrun too.
FLTORRENT_RENDEZVOUS=0 skips the rendezvous (then set the variables yourself).
"""

from __future__ import annotations

from typing import Any

from .api.registration import register_backend as _register_backend
from .launch import prepare_env as _prepare_env

_register_backend()
_prepare_env()

__all__ = ["fedavg_", "aggregate_", "FedAvgReport"]


def __getattr__(name: str) -> Any:
    """fedavg_ and aggregate_ are imported on first use, so `import fltorrent_hpc` stays light."""
    if name in ("fedavg_", "aggregate_", "FedAvgReport"):
        from .api import fedavg

        return getattr(fedavg, name)
    raise AttributeError(f"module 'fltorrent_hpc' has no attribute {name!r}")
