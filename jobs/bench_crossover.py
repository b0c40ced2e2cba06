"""Where one direct exchange stops paying on uneven links: direct vs swarm, privacy none, by size.

    mpiexec -n 4 python jobs/bench_crossover.py [--sizes 256KiB,1MiB,4MiB,16MiB,64MiB] [--json out.json]

Each rank's uplink is paced at lo * (1 + 3 r / (n - 1)) (spread 4x, as bench_allgather's emulated section).  Per
size, in the same run: the ring (gated by the slowest uplink); the engine forced to one direct exchange (every
rank sends its update to every other, (n-1)S over its own uplink: `direct_bytes` and the uneven-links cap
swarm.budget.UNEVEN_DIRECT_BYTES lifted for that row); forced to the swarm (`direct_bytes=0`, the pipelined
BitTorrent phase: fast uplinks relay the slow ones' chunks); the engine's own choice (`auto`, the defaults);
and the capacity bound max(n(n-1)S/sum U, S/min U) as a computed row.  Chunks are the size / 16 (at least
64 KiB, at most `--chunk-bytes`), so even small rounds have chunks to relay.  The last line names the smallest
size from which the swarm beats the direct exchange: UNEVEN_DIRECT_BYTES should sit below it.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_allgather import COMM, ME, WORLD, N, line, pattern, timed, wrong  # noqa: E402

from fltorrent_hpc.config import SwarmConfig, parse_bytes, parse_rate  # noqa: E402
from fltorrent_hpc.runtime.engine import SwarmEngine  # noqa: E402
from fltorrent_hpc.runtime.sim_events import capacity_bound  # noqa: E402
from fltorrent_hpc.swarm import budget  # noqa: E402
from fltorrent_hpc.transport.mpi import ring_allgather  # noqa: E402


def forced_direct(eng: SwarmEngine, pay: np.ndarray, out: np.ndarray) -> None:
    """One round of `eng` with the uneven-links cap lifted (every rank the same), so it is a direct exchange."""
    cap = budget.UNEVEN_DIRECT_BYTES
    budget.UNEVEN_DIRECT_BYTES = 1 << 62
    try:
        eng.disseminate(pay, out=out)
    finally:
        budget.UNEVEN_DIRECT_BYTES = cap


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256KiB,1MiB,4MiB,16MiB,64MiB", help="bytes per rank")
    ap.add_argument("--lo", default="400Mbps", help="slowest uplink; rank r gets lo * (1 + 3 r / (n - 1))")
    ap.add_argument("--chunk-bytes", default="1MiB", help="largest chunk (size / 16 below it)")
    ap.add_argument("--slot", type=float, default=0.25, help="slot seconds (the swarm's stage budgets)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    ups = parse_rate(a.lo) * (1 + 3 * np.arange(N) / max(N - 1, 1))
    cmax = parse_bytes(a.chunk_bytes)
    rows, crossover = [], None
    if ME == 0:
        print(f"# crossover: {N} ranks, uplinks {np.round(ups * 8 / 1e6).astype(int).tolist()} Mbit/s, privacy none")
        cols = ("count", "type", "op", "time(us)", "algbw", "busbw")
        print(f"# {'size':>10s} " + " ".join(f"{c:>{w}s}" for c, w in zip(cols, (12, 6, 14, 12, 8, 8))) + " #wrong")
    for size in (parse_bytes(s) for s in a.sizes.split(",") if s):
        C = int(min(cmax, max(64 * 2**10, size // 16)))
        cfg = SwarmConfig(
            chunk_bytes=C,
            privacy="none",
            uplink=float(ups[ME]),
            slot_seconds=a.slot,
            bt_decisions="pipelined",
            timeout_s=600,
            stage_timeout_s=120,
        )
        direct = SwarmEngine(COMM, cfg.replace(direct_bytes=size))
        swarm = SwarmEngine(COMM, cfg.replace(direct_bytes=0))
        auto = SwarmEngine(COMM, cfg)  # the engine's own choice (swarm.budget.direct_round, small_round)
        pay = pattern(ME, size)
        out = np.empty((N, size), dtype=np.uint8)
        cases = {
            "ring_paced": partial(ring_allgather, WORLD, pay, out, 600, uplink=float(ups[ME])),
            "direct_paced": partial(forced_direct, direct, pay, out),
            "swarm_paced": partial(swarm.disseminate, pay, out=out),
            "auto_paced": partial(auto.disseminate, pay, out=out),
        }
        res = {}
        for name, fn in cases.items():
            out[:] = 0
            t, ts = timed(fn, a.iters, a.warmup)
            bad = COMM.allreduce(wrong(out, size))
            res[name] = t
            rows.append({"size": size, "op": name, "chunk_bytes": C, "time_s": t, "times_s": ts, "wrong": bad})
            if ME == 0:
                print(line(size, name, t, bad), flush=True)
        bound = capacity_bound(ups, size)
        rows.append({"size": size, "op": "bound", "time_s": bound, "computed": True})
        if ME == 0:
            print(line(size, "bound", bound, None))
            print(
                f"#   swarm/direct {res['swarm_paced'] / res['direct_paced']:.3f}, auto/best "
                f"{res['auto_paced'] / min(res['swarm_paced'], res['direct_paced']):.3f}, bound/swarm "
                f"{bound / res['swarm_paced']:.3f}, bound/direct {bound / res['direct_paced']:.3f}",
                flush=True,
            )
        if crossover is None and res["swarm_paced"] < res["direct_paced"]:
            crossover = size
        for e in (direct, swarm, auto):
            e.close()
    if ME == 0:
        print(f"# the swarm beats one direct exchange from {crossover} B a rank" if crossover else "# never crossed")
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(
                json.dumps({"ranks": N, "uplinks": ups.tolist(), "crossover_bytes": crossover, "rows": rows}, indent=1)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
