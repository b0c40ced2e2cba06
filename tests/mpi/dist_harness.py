"""Cross-rank agreement for the backend tests, under mpiexec (MPI) or under torchrun (a gloo group).

The tests of test_backend.py and test_fedavg.py check the "fltorrent" backend the same way whichever transport
it runs on; only how the ranks compare their verdicts depends on the launcher: MPI's COMM_WORLD under an MPI
launcher, a gloo group of torch.distributed otherwise (tests/test_torchrun.py runs them under torchrun).
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from fltorrent_hpc.launch import detect_launcher

_GLOO: list = []


def gather(obj: Any) -> list:
    """Every rank's `obj`, in rank order (collective over the world)."""
    if detect_launcher() is not None:
        from mpi4py import MPI

        return MPI.COMM_WORLD.allgather(obj)
    import torch.distributed as dist

    if not _GLOO:
        _GLOO.append(dist.new_group(backend="gloo"))
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_GLOO[0])
    return out


def all_ok(fn) -> None:
    """Run fn on every rank (it returns a list of failure strings); assert once all ranks reported."""
    try:
        errs = list(fn() or [])
    except Exception:
        errs = [traceback.format_exc()]
    reports = gather([e[-1500:] for e in errs[:4]])
    bad = {r: e for r, e in enumerate(reports) if e}
    assert not bad, "\n".join(f"rank {r}: {e}" for r, e in bad.items())


def group_sizes(world: int) -> list[int]:
    """The group sizes k (groups of ranks 0..k-1) the collective tests cover: all of 1..world, or those that
    FLTORRENT_TEST_GROUP_SIZES lists (the world's is always kept: fedavg's tests use it)."""
    want = os.environ.get("FLTORRENT_TEST_GROUP_SIZES", "")
    if not want.strip():
        return list(range(1, world + 1))
    return sorted({int(k) for k in want.split(",") if 0 < int(k) < world} | {world})
