"""A real round's merged trace, attacked over the whole round by every registered attack (4 and 7 ranks).

.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_privacy_engine.py
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.privacy.attacks import ATTACKS
from fltorrent_hpc.privacy.audit import audit_trace
from fltorrent_hpc.privacy.cli import evaluate_trace
from fltorrent_hpc.privacy.observations import bt_start, public_holdings
from fltorrent_hpc.runtime.engine import SwarmEngine
from fltorrent_hpc.trace import merge_round

pytestmark = [pytest.mark.mpi(min_size=4), pytest.mark.timeout(180)]

COMM = MPI.COMM_WORLD
C = 1024
PACED = dict(uplink=400e3, downlink=400e3, slot_seconds=0.01)  # a few chunks per slot: multi-stage rounds


def agree(flag: bool) -> bool:
    v = np.array([1 if flag else 0], dtype=np.int32)
    out = np.empty(1, dtype=np.int32)
    COMM.Allreduce(v, out, op=MPI.MIN)
    return bool(out[0])


def shared_path(tmp_path_factory) -> str:
    buf = np.zeros(512, dtype=np.uint8)
    if COMM.rank == 0:
        raw = str(tmp_path_factory.mktemp("priv") / "round.h5").encode()
        buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    COMM.Bcast(buf, root=0)
    return bytes(buf).rstrip(b"\0").decode()


def payload(rank: int, nbytes: int) -> np.ndarray:
    return np.random.default_rng(rank + 11).integers(0, 256, nbytes, dtype=np.uint8)


@pytest.mark.parametrize("privacy", ["none", "full"])
def test_real_round_trace_under_every_attack(tmp_path_factory, privacy):
    """privacy none: the owner is the only holder of its update at BitTorrent start, and the bitfield attack
    names it for every update (U = 100%); privacy full (hidden protocol): owners announce no more of their own
    update at BitTorrent start than the peer that holds most of it, the bitfield attack is at or below chance,
    and the tracker's log passes the hidden protocol's audit."""
    cfg = SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=2.0, degree=2, **PACED)
    eng = SwarmEngine(COMM, cfg)
    path = shared_path(tmp_path_factory)
    nb = 10 * C + 7
    res = eng.disseminate(payload(COMM.rank, nb), privacy=privacy, seed=5, trace=path)
    ok = all(np.array_equal(res.updates[u], payload(u, nb)) for u in range(COMM.size))
    eng.close()
    COMM.Barrier()
    if COMM.rank == 0:
        tr = merge_round(path)
        r = evaluate_trace(tr)
        ok &= set(r["u"]) == set(ATTACKS)
        ok &= all(0.0 <= v["mean"] <= 1.0 for v in r["u"].values())
        base = r["u_baseline_mean"]
        if privacy == "none":
            ok &= r["protocol"] == "paper" and r["u"]["bitfield"]["mean"] == pytest.approx(1.0)
        else:
            K = tr.chunks_per_peer
            bt = bt_start(tr)
            pub = public_holdings(tr)
            held = pub.count_by_update(bt)  # [peer, update]: chunks of each update each peer announces
            own_at_bt = np.diag(held)
            others = np.where(np.eye(held.shape[0], dtype=bool), -1, held).max(axis=0)
            # an owner got its own chunks back only as any peer gets them (BitTorrent in the seed stages): it
            # announces no more of its update than the peer holding most of it
            ok &= r["protocol"] == "hidden" and bool(np.all(own_at_bt <= others)) and K > 0
            ok &= r["u"]["bitfield"]["mean"] <= base + 1e-9
            ok &= audit_trace(tr).ok
    assert agree(ok)
