"""All-gather benchmark: MPI_Allgather vs a ring vs the swarm (privacy none / full), nccl-tests columns + JSON.

    mpiexec -n 4 python jobs/bench_allgather.py --json results/bench_allgather.json

Every row is timed in the same run on the same ranks.  `time` is the median over iterations of the slowest
rank's time (a barrier before each iteration); algbw = n*size/time, busbw = algbw*(n-1)/n (nccl-tests).
The emulated section paces each rank's uplink with a token bucket (uplinks spread 4x across ranks), where
a ring is gated by the slowest link and the swarm is not.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
from mpi4py import MPI

from fltorrent_hpc.config import SwarmConfig, parse_bytes, parse_rate
from fltorrent_hpc.runtime.engine import SwarmEngine
from fltorrent_hpc.transport.mpi import MPITransport, mpi_allgather, ring_allgather

COMM = MPI.COMM_WORLD
N, ME = COMM.Get_size(), COMM.Get_rank()
WORLD = MPITransport(COMM)  # the baselines run over the same Transport seam as the engine


def pattern(rank: int, nbytes: int) -> np.ndarray:
    """A payload every rank can regenerate for checking (#wrong)."""
    return ((np.arange(nbytes, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(rank * 97)) >> np.uint64(7)).astype(
        np.uint8
    )


def wrong(out: np.ndarray, nbytes: int) -> int:
    return int(sum(int(np.count_nonzero(out[u] != pattern(u, nbytes))) for u in range(N)))


def timed(fn, iters: int, warmup: int) -> tuple[float, list[float]]:
    ts = []
    for i in range(warmup + iters):
        COMM.Barrier()
        t0 = time.perf_counter()
        fn()
        dt = np.array([time.perf_counter() - t0])
        mx = np.empty(1)
        COMM.Allreduce(dt, mx, op=MPI.MAX)
        if i >= warmup:
            ts.append(float(mx[0]))
    return float(np.median(ts)), ts


def line(size: int, name: str, t: float, nwrong: int) -> str:
    algbw = N * size / t / 1e9
    busbw = algbw * (N - 1) / N
    return (
        f"{size:>12d} {size:>12d} {'uint8':>6s} {name:>14s} {t * 1e6:>12.1f} {algbw:>8.3f} {busbw:>8.3f} {nwrong:>7d}"
    )


def run_cases(cases: dict, out: np.ndarray, size: int, iters: int, warmup: int, emulated: bool, rows: list) -> dict:
    """Time each case, count wrong bytes over all ranks, append a row each and print it; returns op -> time."""
    res = {}
    for name, fn in cases.items():
        out[:] = 0
        t, ts = timed(fn, iters, warmup)
        nw = np.array([wrong(out, size)], dtype=np.int64)
        tot = np.empty(1, dtype=np.int64)
        COMM.Allreduce(nw, tot, op=MPI.SUM)
        res[name] = t
        algbw = N * size / t / 1e9
        rows.append(
            {
                "size": size,
                "op": name,
                "time_s": t,
                "times_s": ts,
                "algbw_GBps": algbw,
                "busbw_GBps": algbw * (N - 1) / N,
                "wrong": int(tot[0]),
                "emulated": emulated,
            }
        )
        if ME == 0:
            print(line(size, name, t, int(tot[0])), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1MiB,4MiB,16MiB,64MiB,256MiB", help="bytes per rank")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk-bytes", default="4MiB")
    ap.add_argument("--emulate-sizes", default="64MiB", help="sizes for the paced heterogeneous-link section")
    ap.add_argument("--emulate-base", default="400Mbps", help="slowest uplink; others up to 4x")
    ap.add_argument("--emulate-iters", type=int, default=3)
    ap.add_argument("--emulate-slot", type=float, default=0.25, help="slot seconds of the paced swarm")
    ap.add_argument("--emulate-chunk-bytes", default="1MiB", help="finer chunks balance uneven links")
    ap.add_argument("--backend", action="store_true", help="add dist.all_gather_into_tensor via the backend")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    C = parse_bytes(a.chunk_bytes)
    sizes = [parse_bytes(s) for s in a.sizes.split(",") if s]
    base = SwarmConfig.from_env(SwarmConfig(chunk_bytes=C, timeout_s=600, stage_timeout_s=120))
    engines = {
        "swarm_none": SwarmEngine(COMM, base.replace(privacy="none")),
        "swarm_full": SwarmEngine(COMM, base.replace(privacy="full")),
        "swarm_none_nohash": SwarmEngine(COMM, base.replace(privacy="none", integrity="none")),
    }
    rows, ratios = [], {}
    if ME == 0:
        print(f"# fltorrent all-gather benchmark: {N} ranks, chunk {C} B, {MPI.Get_library_version().splitlines()[0]}")
        print(
            f"# {'size':>10s} {'count':>12s} {'type':>6s} {'op':>14s} {'time(us)':>12s} {'algbw':>8s} {'busbw':>8s} "
            f"{'#wrong':>7s}"
        )
    for size in sizes:
        pay = pattern(ME, size)
        out = np.empty((N, size), dtype=np.uint8)
        cases = {
            "mpi_allgather": partial(mpi_allgather, WORLD, pay, out, 600),
            "ring": partial(ring_allgather, WORLD, pay, out, 600),
        }
        for name, eng in engines.items():
            cases[name] = partial(eng.disseminate, pay, out=out)
        res = run_cases(cases, out, size, a.iters, a.warmup, False, rows)
        ratios[str(size)] = {
            "swarm_none_vs_mpi": res["swarm_none"] / res["mpi_allgather"],
            "swarm_full_vs_none": res["swarm_full"] / res["swarm_none"],
            "swarm_none_nohash_vs_mpi": res["swarm_none_nohash"] / res["mpi_allgather"],
            "swarm_none_vs_ring": res["swarm_none"] / res["ring"],
        }
        del out
    # emulated heterogeneous uplinks: rank r gets base * (1 + 3 r / (N - 1)), spread 4x
    lo = parse_rate(a.emulate_base)
    up = lo * (1 + 3 * ME / max(N - 1, 1))
    for size in [parse_bytes(s) for s in a.emulate_sizes.split(",") if s]:
        pay = pattern(ME, size)
        out = np.empty((N, size), dtype=np.uint8)
        paced = base.replace(uplink=up, slot_seconds=a.emulate_slot, chunk_bytes=parse_bytes(a.emulate_chunk_bytes))
        eng = SwarmEngine(COMM, paced.replace(privacy="full"))
        eng_none = SwarmEngine(COMM, paced.replace(privacy="none"))
        eng_nohash = SwarmEngine(COMM, paced.replace(privacy="none", integrity="none"))
        cases = {
            "ring_paced": partial(ring_allgather, WORLD, pay, out, 600, uplink=up),
            "swarm_none_paced": partial(eng_none.disseminate, pay, out=out),
            "swarm_full_paced": partial(eng.disseminate, pay, out=out),
            "swarm_none_nohash_paced": partial(eng_nohash.disseminate, pay, out=out),
        }
        res = run_cases(cases, out, size, a.emulate_iters, 0, True, rows)
        ratios.setdefault(str(size), {}).update(
            {
                "swarm_vs_ring_emulated": res["swarm_full_paced"] / res["ring_paced"],
                "swarm_none_vs_ring_emulated": res["swarm_none_paced"] / res["ring_paced"],
                # links, not cores, bound a paced round: chunk hashes are checked while later runs arrive
                "hash_cost_emulated": res["swarm_none_paced"] / res["swarm_none_nohash_paced"],
            }
        )
        for e in (eng, eng_none, eng_nohash):
            e.close()
    if a.backend:
        from fltorrent_hpc.api.bench import bench_backend_allgather

        for size in sizes:
            t = bench_backend_allgather(size, a.iters)
            rows.append(
                {
                    "size": size,
                    "op": "dist.all_gather_into_tensor",
                    "time_s": t,
                    "emulated": False,
                    "algbw_GBps": N * size / t / 1e9,
                    "busbw_GBps": N * size / t / 1e9 * (N - 1) / N,
                }
            )
            ratios.setdefault(str(size), {})["backend_vs_engine"] = t / next(
                r["time_s"] for r in rows if r["size"] == size and r["op"] == "swarm_full"
            )
            if ME == 0:
                print(line(size, "dist.all_gather", t, 0), flush=True)
    if ME == 0:
        print("# ratios:", json.dumps(ratios, indent=1))
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(
                json.dumps(
                    {
                        "ranks": N,
                        "chunk_bytes": C,
                        "mpi": MPI.Get_library_version().splitlines()[0],
                        "python": sys.version.split()[0],
                        "host": platform.node(),
                        "cores": __import__("os").cpu_count(),
                        "thread_level": MPI.Query_thread(),
                        "rows": rows,
                        "ratios": ratios,
                    },
                    indent=1,
                )
            )
    for e in engines.values():
        e.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
