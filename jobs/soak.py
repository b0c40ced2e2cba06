"""Soak job: many swarm rounds on real MPI ranks, one rank silent every other round; RSS and orphans per rank.

    mpiexec -n 4 python jobs/soak.py --rounds 50 --json results/soak.json

Not a test: it measures whether a rank's state stays bounded over rounds (issue 17).  Every rank calls
`SwarmEngine.disseminate` every round; the silent rank (default: the last) runs its engine over
`FaultyTransport(MPITransport(COMM), faults)` with `Fault("silent", round_id=r, from_stage=1)` for every odd
round r, so in those rounds it stops sending from stage 1 on (it still listens and learns the round's end)
and the tracker excludes it.  Each round the ranks' participant masks are gathered (int64, never pickled):
the honest ranks must agree, an odd round must leave the silent rank out, an even round must hold everyone,
and every participant's update must be bit-exact.  Every `--every` rounds each rank's resident set size
(VmRSS from /proc/self/status; elsewhere getrusage's peak RSS, which is said in the header) and the length
of its engine's `_orphans` list (sends to silent peers kept alive with their buffers) are gathered to rank 0
and printed, one line per checkpoint; the last line gives the first and last figures and the growth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from mpi4py import MPI

from fltorrent_hpc.config import SwarmConfig, parse_bytes
from fltorrent_hpc.runtime.engine import SwarmEngine
from fltorrent_hpc.transport.faulty import Fault, FaultyTransport
from fltorrent_hpc.transport.mpi import MPITransport

COMM = MPI.COMM_WORLD
N, ME = COMM.Get_size(), COMM.Get_rank()
MIB = 2**20


def rss_kib() -> tuple[int, int, str]:
    """(current RSS KiB, peak RSS KiB, source).  Linux: VmRSS/VmHWM; elsewhere getrusage's peak for both."""
    try:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(val.split()[0])  # "kB"
        if "VmRSS" in fields:
            return fields["VmRSS"], fields.get("VmHWM", fields["VmRSS"]), "VmRSS (/proc/self/status)"
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere
    return peak, peak, "ru_maxrss (getrusage: PEAK RSS, not current)"


def base_pattern(nbytes: int) -> np.ndarray:
    """[N, nbytes] uint8: every rank's base payload, so any rank can check any update.  Round r sends base + r."""
    i = np.arange(nbytes, dtype=np.uint64)
    return np.stack(
        [((i * np.uint64(2654435761) + np.uint64(u * 97)) >> np.uint64(7)).astype(np.uint8) for u in range(N)]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--nbytes", default="1MiB", help="payload bytes per rank")
    ap.add_argument("--chunk-bytes", default="64KiB")
    ap.add_argument("--silent-rank", type=int, default=-1, help="rank silent in odd rounds (default: the last)")
    ap.add_argument("--stage-timeout", type=float, default=1.0, help="stage_timeout_s: bounds a silent round")
    ap.add_argument("--privacy", choices=("none", "full"), default="full")
    ap.add_argument("--paced", action="store_true", help="uplink/downlink 50 MB/s, slot 0.05 s")
    ap.add_argument("--every", type=int, default=10, help="checkpoint (RSS, orphans) every this many rounds")
    ap.add_argument("--timeout", type=float, default=120.0, help="timeout_s: bound on every distributed wait")
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="honest rounds first, on an engine of their own with a 30 s stage timeout (numba compiles its "
        "passes there; a first round slower than the stage timeout would exclude honest ranks), not counted",
    )
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    nbytes, C = parse_bytes(a.nbytes), parse_bytes(a.chunk_bytes)
    silent = a.silent_rank if a.silent_rank >= 0 else N - 1
    paced = dict(uplink=50e6, downlink=50e6, slot_seconds=0.05) if a.paced else {}
    cfg = SwarmConfig(chunk_bytes=C, privacy=a.privacy, stage_timeout_s=a.stage_timeout, timeout_s=a.timeout, **paced)
    if N < 2 or not 0 <= silent < N or silent == cfg.tracker_rank:
        if ME == 0:
            print(f"soak: needs >= 2 ranks and a silent rank other than the tracker ({cfg.tracker_rank})")
        return 2
    base = base_pattern(nbytes)
    out = np.empty((N, nbytes), dtype=np.uint8)
    pay = np.empty(nbytes, dtype=np.uint8)
    want = np.empty(nbytes, dtype=np.uint8)
    t_warm = time.monotonic()
    if a.warmup > 0:
        wnet = MPITransport(COMM)
        weng = SwarmEngine(wnet, cfg.replace(stage_timeout_s=max(30.0, a.stage_timeout)))
        for _ in range(a.warmup):
            weng.disseminate(base[ME], out=out)
        weng.close()
        wnet.close()
    t_warm = time.monotonic() - t_warm
    faults = [Fault("silent", round_id=r, from_stage=1) for r in range(1, a.rounds, 2)]
    net = MPITransport(COMM)
    if ME == silent:
        net = FaultyTransport(net, faults)
    eng = SwarmEngine(net, cfg)
    src = rss_kib()[2]
    lib = MPI.Get_library_version().splitlines()[0]
    if ME == 0:
        print(f"# fltorrent soak: {N} ranks, {a.rounds} rounds, {nbytes} B per rank, chunk {C} B, {lib}")
        print(
            f"# privacy {a.privacy}, paced {a.paced} {paced or ''}, stage_timeout_s {a.stage_timeout}, "
            f"silent rank {silent} from stage 1 of odd rounds, tracker {cfg.tracker_rank}"
        )
        print(f"# warm-up: {a.warmup} honest round(s) on an engine of their own, {t_warm:.1f} s, not counted")
        print(f"# rss: {src}; orphans: len(engine._orphans); last_s: the slowest rank's time of the last round")
        rss_h = " ".join(f"{'rss' + str(r):>8s}" for r in range(N))
        orp_h = " ".join(f"{'orph' + str(r):>6s}" for r in range(N))
        print(f"# {'round':>5s} {rss_h} {orp_h} {'last_s':>8s}   (rss in MiB)", flush=True)

    checkpoints, rounds = [], []
    bad: list[str] = []
    n_silent_flag = 0
    late = 0  # silent rounds whose silent rank was excluded but its update still averaged (all of it had arrived)
    idle = 0  # odd rounds in which the silent fault never fired (the round was over before stage 1)
    last_s = 0.0

    def checkpoint(r: int) -> None:
        cur, peak, _ = rss_kib()
        mine = np.array([cur, peak, len(eng._orphans)], dtype=np.int64)
        allv = np.empty((N, 3), dtype=np.int64)
        COMM.Gather(mine, allv if ME == 0 else None, root=0)
        if ME == 0:
            checkpoints.append(
                {
                    "round": r,
                    "rss_kib": allv[:, 0].tolist(),
                    "hwm_kib": allv[:, 1].tolist(),
                    "orphans": allv[:, 2].tolist(),
                    "last_round_s": last_s,
                }
            )
            rss = " ".join(f"{v / 1024:8.1f}" for v in allv[:, 0])
            orp = " ".join(f"{v:6d}" for v in allv[:, 2])
            print(f"  {r:>5d} {rss} {orp} {last_s:8.3f}", flush=True)

    checkpoint(0)
    dropped_before = 0
    t_all = time.monotonic()
    for r in range(a.rounds):
        np.add(base[ME], np.uint8(r & 0xFF), out=pay)
        t0 = time.monotonic()
        res = eng.disseminate(pay, out=out)
        dt = time.monotonic() - t0
        wrong = 0
        for u in res.participants.tolist():
            np.add(base[u], np.uint8(r & 0xFF), out=want)
            wrong += int(np.count_nonzero(res.updates[u] != want))
        # one row per rank: participant mask, stats["silent"], wrong bytes, round time (us), messages this
        # rank's fault dropped this round, the round's stages
        dropped = sum(net.injected.values()) if isinstance(net, FaultyTransport) else 0
        row = np.zeros(2 * N + 5, dtype=np.int64)
        row[res.participants] = 1
        row[N + 5 + np.array(res.stats["excluded"], dtype=np.int64)] = 1  # the ranks the tracker excluded
        row[N : N + 5] = int(res.stats["silent"]), wrong, int(dt * 1e6), dropped - dropped_before, res.stats["stages"]
        dropped_before = dropped
        allr = np.empty((N, 2 * N + 5), dtype=np.int64)
        COMM.Allgather(row, allr)
        last_s = float(allr[:, N + 2].max()) / 1e6
        if ME == 0:
            odd = r % 2 == 1
            honest = [p for p in range(N) if p != silent]
            masks, exm = allr[honest, :N], allr[honest, N + 5 :]
            part, excl = np.flatnonzero(masks[0]).tolist(), np.flatnonzero(exm[0]).tolist()
            if not all(np.array_equal(masks[0], m) for m in masks):
                bad.append(f"round {r}: honest ranks disagree on participants {masks.tolist()}")
            if not all(np.array_equal(exm[0], m) for m in exm):
                bad.append(f"round {r}: honest ranks disagree on the excluded ranks {exm.tolist()}")
            fired = bool(allr[silent, N + 3])
            if odd and not fired:
                idle += 1  # the round ended before stage 1: the silent rank had nothing to drop
            if odd and fired and excl != [silent]:
                bad.append(f"round {r}: silent rank {silent} dropped messages but the excluded ranks are {excl}")
            if odd and fired and silent in part:
                # excluded, yet its whole update had reached every live rank before it went silent: averaged
                late += 1
            if not odd and (part != list(range(N)) or excl):
                bad.append(f"round {r}: honest round: participants {part}, excluded {excl}")
            if allr[:, N + 1].any():
                bad.append(f"round {r}: wrong bytes per rank {allr[:, N + 1].tolist()}")
            n_silent_flag += int(allr[silent, N])
            rounds.append(
                {
                    "round": r,
                    "silent_round": odd,
                    "participants": part,
                    "excluded": excl,
                    "silent_rank_participants": np.flatnonzero(allr[silent, :N]).tolist(),
                    "silent_flag": bool(allr[silent, N]),
                    "dropped": int(allr[silent, N + 3]),
                    "stages": int(allr[cfg.tracker_rank, N + 4]),
                    "round_s": last_s,
                    "round_s_per_rank": (allr[:, N + 2] / 1e6).tolist(),
                }
            )
        if (r + 1) % a.every == 0 or r + 1 == a.rounds:
            checkpoint(r + 1)
    wall = time.monotonic() - t_all
    injected = np.array([sum(net.injected.values()) if isinstance(net, FaultyTransport) else 0], dtype=np.int64)
    inj = np.empty((N, 1), dtype=np.int64)
    COMM.Gather(injected, inj if ME == 0 else None, root=0)
    eng.close()
    net.close()
    if ME != 0:
        return 0

    first = next((c for c in checkpoints if c["round"] > 0), checkpoints[0])
    last = checkpoints[-1]
    growth = [b - f for f, b in zip(first["rss_kib"], last["rss_kib"])]
    growth0 = [b - f for f, b in zip(checkpoints[0]["rss_kib"], last["rss_kib"])]
    odd_rounds = sum(1 for r in rounds if r["silent_round"])
    silent_rounds = [r["round_s"] for r in rounds if r["silent_round"]]
    honest_rounds = [r["round_s"] for r in rounds if not r["silent_round"]]
    print(
        f"# rounds {a.rounds} in {wall:.1f} s (honest rounds median {np.median(honest_rounds or [0]):.3f} s, "
        f"silent rounds median {np.median(silent_rounds or [0]):.3f} s); silent rank {silent} flagged silent in "
        f"{n_silent_flag}/{odd_rounds} silent rounds; messages it dropped: {int(inj[silent, 0])}; "
        f"silent rounds over before stage 1 (fault idle): {idle}; excluded but its update delivered and "
        f"averaged: {late}; "
        f"checks: {'ok' if not bad else f'{len(bad)} FAILED'}"
    )
    if idle:
        print(
            f"# NOTE {idle} silent round(s) ended within stage 0, before the fault's window: nothing was dropped "
            "and the silent rank took part (not a failure; --paced or a larger --nbytes makes rounds longer)"
        )
    for b in bad[:20]:
        print(f"# FAILED {b}")
    mib = lambda xs: "[" + ", ".join(f"{x / 1024:.1f}" for x in xs) + "]"  # noqa: E731
    print(
        f"# rss MiB round {first['round']} {mib(first['rss_kib'])} -> round {last['round']} {mib(last['rss_kib'])}, "
        f"growth {mib(growth)} (from round 0: {mib(growth0)}); "
        f"orphans {first['orphans']} -> {last['orphans']}",
        flush=True,
    )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(
            json.dumps(
                {
                    "ranks": N,
                    "rounds": a.rounds,
                    "nbytes": nbytes,
                    "chunk_bytes": C,
                    "privacy": a.privacy,
                    "paced": paced,
                    "stage_timeout_s": a.stage_timeout,
                    "silent_rank": silent,
                    "tracker_rank": cfg.tracker_rank,
                    "rss_source": src,
                    "mpi": lib,
                    "python": sys.version.split()[0],
                    "host": platform.node(),
                    "cores": os.cpu_count(),
                    "wall_s": wall,
                    "warmup_rounds": a.warmup,
                    "warmup_s": t_warm,
                    "silent_flagged": n_silent_flag,
                    "silent_rounds": odd_rounds,
                    "silent_rounds_fault_idle": idle,
                    "silent_rounds_update_averaged": late,
                    "dropped_messages": int(inj[silent, 0]),
                    "checks_failed": bad,
                    "first": first,
                    "last": last,
                    "growth_kib": growth,
                    "growth_from_round0_kib": growth0,
                    "checkpoints": checkpoints,
                    "per_round": rounds,
                },
                indent=1,
            )
        )
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        rc = main()
    except SystemExit:
        raise
    except BaseException:  # one rank's error must not leave the others waiting in a collective
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        COMM.Abort(1)
    sys.exit(rc)
