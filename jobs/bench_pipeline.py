"""Pipelined vs stage-clocked BitTorrent on emulated uneven uplinks, and a small round against MPI_Allgather.

    mpiexec -n 4 python jobs/bench_pipeline.py [--size 64MiB] [--windows 4,6,8] [--json out.json]

Paced section: rank r's uplink is lo * (1 + 3 r / (n - 1)) (lo = 400 Mbit/s: spread 4x), 1 MiB chunks, privacy none and
full, `bt_decisions` "pipelined" (one row per window) and "peers" (the stage-clocked default).  Each row prints the
median seconds of the slowest rank and bound/real, the bound being max(n (n-1) S / sum(U), S / min(U)): every rank
must receive (n-1) S bytes over the uplinks' sum, and the slowest uplink must send its own S once.  Unpaced section:
a small update (1 MiB a rank) through the pipelined engine and through MPI_Allgather.  Every row checks the bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from fltorrent_hpc.config import SwarmConfig, parse_bytes, parse_rate
from fltorrent_hpc.runtime.engine import SwarmEngine
from fltorrent_hpc.runtime.sim_events import capacity_bound
from fltorrent_hpc.transport.mpi import MPITransport, mpi_allgather

COMM = MPI.COMM_WORLD
N, ME = COMM.Get_size(), COMM.Get_rank()


def pattern(rank: int, nbytes: int) -> np.ndarray:
    return ((np.arange(nbytes, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(rank * 97)) >> np.uint64(7)).astype(
        np.uint8
    )


def timed(fn, out: np.ndarray, nbytes: int, iters: int, warmup: int) -> tuple[float, list[float], int]:
    """Median over iterations of the slowest rank's seconds, every time, and the wrong bytes over all ranks."""
    ts = []
    for i in range(warmup + iters):
        out[:] = 0
        COMM.Barrier()
        t0 = time.perf_counter()
        fn()
        mx = np.empty(1)
        COMM.Allreduce(np.array([time.perf_counter() - t0]), mx, op=MPI.MAX)
        if i >= warmup:
            ts.append(float(mx[0]))
    bad = sum(int(np.count_nonzero(out[u] != pattern(u, nbytes))) for u in range(N))
    tot = np.empty(1, dtype=np.int64)
    COMM.Allreduce(np.array([bad], dtype=np.int64), tot, op=MPI.SUM)
    return float(np.median(ts)), ts, int(tot[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64MiB", help="bytes per rank, paced section")
    ap.add_argument("--chunk-bytes", default="1MiB")
    ap.add_argument("--lo", default="400Mbps", help="slowest uplink; rank r gets lo * (1 + 3 r / (n - 1))")
    ap.add_argument("--slot", type=float, default=0.25, help="slot seconds (stage-clocked budgets)")
    ap.add_argument("--windows", default="8", help="bt_window values for the pipelined rows")
    ap.add_argument("--privacy", default="none,full")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (page faults, first use)")
    ap.add_argument("--small", default="1MiB", help="bytes per rank, unpaced section")
    ap.add_argument("--small-iters", type=int, default=20)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    S, C = parse_bytes(a.size), parse_bytes(a.chunk_bytes)
    lo = parse_rate(a.lo)
    ups = np.array([lo * (1 + 3 * r / max(N - 1, 1)) for r in range(N)])
    bound = capacity_bound(ups, S)
    bound_hidden = capacity_bound(ups, S, hidden=True)  # privacy full: the hidden protocol's two seed hops too
    base = SwarmConfig(chunk_bytes=C, timeout_s=600, stage_timeout_s=120, seed=1)
    paced = base.replace(uplink=float(ups[ME]), slot_seconds=a.slot)
    rows: list[dict] = []

    def row(section: str, name: str, privacy: str, t: float, ts: list, wrong: int, ref: float, ref2=None) -> None:
        """ref2: the hidden protocol's own bound (privacy full rows)."""
        rows.append(
            dict(section=section, op=name, privacy=privacy, time_s=t, times_s=ts, wrong=wrong, ref_s=ref, ref2_s=ref2)
        )
        if ME == 0:
            extra = f"   hidden bound/real {ref2 / t:6.3f}" if ref2 else ""
            print(
                f"{section:>8s} {name:>22s} {privacy:>5s} {t:10.3f} s   ref/real {ref / t:6.3f}   #wrong {wrong}{extra}"
            )

    if ME == 0:
        print(f"# {N} ranks, {S} B a rank, chunk {C} B, uplinks {[f'{u * 8 / 1e6:.0f}' for u in ups]} Mbit/s")
        print(f"# capacity bound max(n(n-1)S/sum U, S/min U) = {bound:.3f} s")
        print(f"# hidden protocol (n+1 uploads a chunk): max(n(n+1)S/sum U, S/min U) = {bound_hidden:.3f} s")
    pay = pattern(ME, S)
    out = np.empty((N, S), dtype=np.uint8)
    for privacy in a.privacy.split(","):
        cases = [
            (f"pipelined W={w}", paced.replace(bt_decisions="pipelined", bt_window=int(w)))
            for w in a.windows.split(",")
        ]
        cases.append(("peers (stages)", paced.replace(bt_decisions="peers")))
        for name, cfg in cases:
            eng = SwarmEngine(COMM, cfg.replace(privacy=privacy))
            t, ts, wrong = timed(lambda e=eng: e.disseminate(pay, out=out), out, S, a.iters, a.warmup)
            eng.close()
            row("paced", name, privacy, t, ts, wrong, bound, bound_hidden if privacy == "full" else None)
    del out
    small = parse_bytes(a.small)
    pay = pattern(ME, small)
    out = np.empty((N, small), dtype=np.uint8)
    world = MPITransport(COMM)
    t_mpi, ts, wrong = timed(lambda: mpi_allgather(world, pay, out, 600), out, small, a.small_iters, 2)
    row("unpaced", "MPI_Allgather", "-", t_mpi, ts, wrong, t_mpi)
    for privacy in a.privacy.split(","):
        for mode in ("pipelined", "peers"):
            eng = SwarmEngine(COMM, base.replace(bt_decisions=mode, privacy=privacy))
            t, ts, wrong = timed(lambda e=eng: e.disseminate(pay, out=out), out, small, a.small_iters, 2)
            eng.close()
            row("unpaced", mode, privacy, t, ts, wrong, t_mpi)
    world.close()
    if ME == 0 and a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(
            json.dumps(
                {"ranks": N, "bytes": S, "chunk": C, "bound_s": bound, "bound_hidden_s": bound_hidden, "rows": rows},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
