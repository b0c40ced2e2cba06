"""All-gather benchmark: MPI_Allgather vs a ring vs the swarm (privacy none / full), nccl-tests columns + JSON.

    mpiexec -n 4 python jobs/bench_allgather.py --json results/bench_allgather.json

Every row is timed in the same run on the same ranks.  `time` is the median over iterations of the slowest
rank's time (a barrier before each iteration); algbw = n*size/time, busbw = algbw*(n-1)/n (nccl-tests).
The emulated section paces each rank's uplink with a token bucket (uplinks spread 4x across ranks), where
a ring is gated by the slowest link and the swarm is not.  It also prints two rows that are not measured:
`bound` (the capacity bound of the emulated links, runtime/sim_events.capacity_bound) and `sim_*` (the
simulators' predictions for the same n, size, chunk, links and privacy: the event model, with the message
latency and hash rate measured here, and the slotted model), with real/bound and sim/real ratios.
`--backend` adds `dist.all_gather_into_tensor` through the torch backend with its peak host memory per rank
(VmHWM reset per row), checked against baseline + n*size + 64 MiB.  `--pipelined` adds engine rows with
bt_decisions="pipelined" (skipped, with the reason, where SwarmConfig does not know that mode).
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

from fltorrent_hpc.chunks.digest import chunk_digests, round_key
from fltorrent_hpc.config import SwarmConfig, parse_bytes, parse_rate
from fltorrent_hpc.errors import ConfigError
from fltorrent_hpc.runtime.engine import SwarmEngine
from fltorrent_hpc.runtime.sim_events import capacity_bound, simulate_events
from fltorrent_hpc.swarm import SwarmRound
from fltorrent_hpc.swarm.budget import chunk_budgets
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


def line(size: int, name: str, t: float, nwrong: int | None) -> str:
    algbw = N * size / t / 1e9 if t > 0 else 0.0
    busbw = algbw * (N - 1) / N
    w = "-" if nwrong is None else str(nwrong)  # "-": a computed row (bound, sim), nothing was gathered
    return f"{size:>12d} {size:>12d} {'uint8':>6s} {name:>14s} {t * 1e6:>12.1f} {algbw:>8.3f} {busbw:>8.3f} {w:>7s}"


MEM_SLACK = 64 * 2**20  # peak host bytes per rank may exceed baseline + n*size by this much (chunks in flight)


def one_way_latency(iters: int = 200) -> float:
    """Half the round trip of an 8-byte message between ranks 0 and 1 (seconds), the event model's latency."""
    if N < 2:
        return 0.0
    buf = np.zeros(8, np.uint8)
    COMM.Barrier()
    t0 = time.perf_counter()
    for _ in range(iters if ME < 2 else 0):
        if ME == 0:
            COMM.Send(buf, 1, tag=7)
            COMM.Recv(buf, 1, tag=7)
        else:
            COMM.Recv(buf, 0, tag=7)
            COMM.Send(buf, 0, tag=7)
    return float(COMM.bcast((time.perf_counter() - t0) / iters / 2, root=0))


def hash_rate(chunk: int, reps: int = 8) -> float:
    """Bytes/s of one core verifying one chunk at a time (as a receiver does), measured on rank 0."""
    rate = 0.0
    if ME == 0:
        buf, key = pattern(0, chunk), round_key(0, 0, 0)
        chunk_digests(buf, chunk, key, threads=1)
        t0 = time.perf_counter()
        for _ in range(reps):
            chunk_digests(buf, chunk, key, threads=1)
        rate = chunk * reps / (time.perf_counter() - t0)
    return float(COMM.bcast(rate, root=0))


def slotted_round_s(cfg: SwarmConfig, up: np.ndarray, size: int) -> float:
    """The slotted simulator's round on exact per-rank uplinks (unpaced downlinks): stages x slot seconds."""
    K = -(-size // cfg.chunk_bytes)
    ub, db = chunk_budgets(up, cfg.chunk_bytes, cfg.slot_seconds), chunk_budgets(np.zeros(up.size), 1, 1.0)
    rnd = SwarmRound(cfg, up.size, K, ub, db, seed=cfg.seed)
    s_max = rnd.deadline()
    while not rnd.done and rnd.stage < s_max:
        rnd.complete(rnd.next_stage())
    return rnd.stage * cfg.slot_seconds


def pipelined(cfg: SwarmConfig) -> tuple[SwarmConfig | None, str]:
    """cfg with bt_decisions="pipelined", or None and why not (the mode is not in this SwarmConfig yet)."""
    try:
        return cfg.replace(bt_decisions="pipelined"), ""
    except ConfigError as e:
        return None, str(e)


def computed_row(rows: list, size: int, name: str, t: float, **extra) -> None:
    """A row that was computed, not measured (bound, simulator predictions)."""
    rows.append({"size": size, "op": name, "time_s": t, "wrong": None, "emulated": True, "computed": True, **extra})
    if ME == 0:
        print(line(size, name, t, None), flush=True)


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
    ap.add_argument(
        "--backend", action="store_true", help="add dist.all_gather_into_tensor via the backend, with peak memory"
    )
    ap.add_argument("--pipelined", action="store_true", help='add engine rows with bt_decisions="pipelined"')
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
    skipped = ""
    if a.pipelined:
        pipe, skipped = pipelined(base.replace(privacy="full"))
        if pipe is not None:
            engines["swarm_pipelined"] = SwarmEngine(COMM, pipe)
    rows, ratios = [], {}
    if ME == 0:
        print(f"# fltorrent all-gather benchmark: {N} ranks, chunk {C} B, {MPI.Get_library_version().splitlines()[0]}")
        print(
            f"# {'size':>10s} {'count':>12s} {'type':>6s} {'op':>14s} {'time(us)':>12s} {'algbw':>8s} {'busbw':>8s} "
            f"{'#wrong':>7s}"
        )
        if skipped:
            print(f"# skipped: swarm_pipelined rows: SwarmConfig rejects bt_decisions='pipelined' ({skipped})")
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
    ups = lo * (1 + 3 * np.arange(N) / max(N - 1, 1))
    up = float(ups[ME])
    emulate = [parse_bytes(s) for s in a.emulate_sizes.split(",") if s]
    EC = parse_bytes(a.emulate_chunk_bytes)
    lat, hrate = (one_way_latency(), hash_rate(EC)) if emulate else (0.0, 0.0)
    if emulate and ME == 0:
        print(
            f"# emulated: uplinks {np.round(ups / 1e6, 1).tolist()} MB/s, downlinks unpaced; event model with "
            f"latency {lat * 1e6:.1f} us (MPI one-way, measured), hash {hrate / 1e9:.2f} GB/s (one core, measured)"
        )
    for size in emulate:
        pay = pattern(ME, size)
        out = np.empty((N, size), dtype=np.uint8)
        paced = base.replace(uplink=up, slot_seconds=a.emulate_slot, chunk_bytes=EC)
        eng = SwarmEngine(COMM, paced.replace(privacy="full"))
        eng_none = SwarmEngine(COMM, paced.replace(privacy="none"))
        eng_nohash = SwarmEngine(COMM, paced.replace(privacy="none", integrity="none"))
        cases = {
            "ring_paced": partial(ring_allgather, WORLD, pay, out, 600, uplink=up),
            "swarm_none_paced": partial(eng_none.disseminate, pay, out=out),
            "swarm_full_paced": partial(eng.disseminate, pay, out=out),
            "swarm_none_nohash_paced": partial(eng_nohash.disseminate, pay, out=out),
        }
        extra = []
        if a.pipelined:
            for priv in ("none", "full"):
                pipe, _ = pipelined(paced.replace(privacy=priv))
                if pipe is not None:
                    extra.append(SwarmEngine(COMM, pipe))
                    cases[f"swarm_pipe_{priv}_paced"] = partial(extra[-1].disseminate, pay, out=out)
            if not extra and ME == 0:
                print(f"# skipped: swarm_pipe_*_paced: SwarmConfig rejects bt_decisions='pipelined' ({skipped})")
        res = run_cases(cases, out, size, a.emulate_iters, 0, True, rows)
        # computed rows: the capacity bound (downlinks unpaced: no downlink term) and the simulators' predictions
        bound = capacity_bound(ups, size)
        bound_hidden = capacity_bound(ups, size, hidden=True)  # privacy full's own transfers (two seed hops)
        sims = {}
        if ME == 0:
            for priv in ("none", "full"):
                cfg_p = paced.replace(privacy=priv, uplink=0.0)
                ev = simulate_events(cfg_p, ups, np.zeros(N), size, latency_s=lat, hash_rate=hrate)
                sims[f"sim_{priv}"] = (ev.round_s, {"warmup_s": ev.warmup_s, "bt_s": ev.bt_s, "model": "events"})
                sims[f"sim_slotted_{priv}"] = (slotted_round_s(cfg_p, ups, size), {"model": "slotted"})
        sims = COMM.bcast(sims, root=0)
        computed_row(rows, size, "bound", bound, uplinks=ups.tolist())
        computed_row(rows, size, "bound_hidden", bound_hidden, uplinks=ups.tolist())
        for name, (t, info) in sims.items():
            computed_row(rows, size, name, t, latency_s=lat, hash_rate=hrate, **info)
        r = ratios.setdefault(str(size), {})
        r.update(
            {
                "swarm_vs_ring_emulated": res["swarm_full_paced"] / res["ring_paced"],
                "swarm_none_vs_ring_emulated": res["swarm_none_paced"] / res["ring_paced"],
                # links, not cores, bound a paced round: chunk hashes are checked while later runs arrive
                "hash_cost_emulated": res["swarm_none_paced"] / res["swarm_none_nohash_paced"],
                "swarm_none_vs_bound": res["swarm_none_paced"] / bound,
                "swarm_full_vs_bound": res["swarm_full_paced"] / bound,
                "swarm_full_vs_bound_hidden": res["swarm_full_paced"] / bound_hidden,
            }
        )
        for priv in ("none", "full"):
            real = res[f"swarm_{priv}_paced"]
            r[f"sim_{priv}_vs_real"] = sims[f"sim_{priv}"][0] / real
            r[f"sim_slotted_{priv}_vs_real"] = sims[f"sim_slotted_{priv}"][0] / real
            if f"swarm_pipe_{priv}_paced" in res:
                r[f"sim_{priv}_vs_pipelined"] = sims[f"sim_{priv}"][0] / res[f"swarm_pipe_{priv}_paced"]
                r[f"swarm_pipe_{priv}_vs_bound"] = res[f"swarm_pipe_{priv}_paced"] / bound
                if priv == "full":
                    r["swarm_pipe_full_vs_bound_hidden"] = res["swarm_pipe_full_paced"] / bound_hidden
        for e in (eng, eng_none, eng_nohash, *extra):
            e.close()
    mem_ok = True
    if a.backend:
        from fltorrent_hpc.api.bench import measure_backend_allgather

        for size in sizes:  # the engine rows' config: the same chunk size, privacy "full" (the group default)
            b = measure_backend_allgather(size, a.iters, warmup=a.warmup, config=base, payload=pattern)
            ok = b.within(MEM_SLACK)
            mem_ok &= ok
            rows.append(
                {
                    "size": size,
                    "op": "dist.all_gather_into_tensor",
                    "time_s": b.time_s,
                    "times_s": b.times_s,
                    "wrong": b.wrong,
                    "emulated": False,
                    "algbw_GBps": N * size / b.time_s / 1e9,
                    "busbw_GBps": N * size / b.time_s / 1e9 * (N - 1) / N,
                    "chunk_bytes": base.chunk_bytes,
                    "peak_rss_bytes": b.peak_bytes,
                    "baseline_rss_bytes": b.base_bytes,
                    "growth_bytes": b.growth_bytes,
                    "output_bytes": b.output_bytes,
                    "hwm_reset": b.hwm_reset,
                    "mem_ok": ok,
                }
            )
            ratios.setdefault(str(size), {})["backend_vs_engine"] = b.time_s / next(
                r["time_s"] for r in rows if r["size"] == size and r["op"] == "swarm_full"
            )
            if ME == 0:
                print(line(size, "dist.all_gather", b.time_s, b.wrong), flush=True)
                mib = 2**20
                print(
                    f"#   memory per rank (max over ranks): peak {b.peak_bytes / mib:.0f} MiB, baseline "
                    f"{b.base_bytes / mib:.0f} MiB, n*size {b.output_bytes / mib:.0f} MiB, growth "
                    f"{b.growth_bytes / mib:.1f} MiB <= n*size + {MEM_SLACK // mib} MiB: {'ok' if ok else 'EXCEEDED'}"
                    + ("" if b.hwm_reset else " (VmHWM not resettable: peak since process start)"),
                    flush=True,
                )
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
    return 0 if mem_ok else 1  # a backend row over its memory budget fails the job


if __name__ == "__main__":
    sys.exit(main())
