"""Simulator speed benchmark: wall time and peak memory of a paper-default round as n grows.

    python jobs/bench_sim.py --peers 100,200,500 --json results/bench_sim.json

Each n runs in its own process (so peak RSS is per run).  Targets (issue 2): n = 100 in <= 30 s and
n = 500 in <= 5 min on 2 cores, peak memory <= 4 GB.  The fitted exponent says how cost grows with n.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fltorrent_hpc.swarm.bt_kernel import compile_note

ONE = """
import json, sys
from fltorrent_hpc.config import SwarmConfig, parse_rate
from fltorrent_hpc.runtime.simulator import simulate, PAPER_UPDATE, PAPER_UPLINK, PAPER_DOWNLINK
n, privacy, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = SwarmConfig(chunk_bytes=256 * 1024, privacy=privacy, seed=seed)
r = simulate(cfg, n, PAPER_UPDATE, tuple(map(parse_rate, PAPER_UPLINK)), tuple(map(parse_rate, PAPER_DOWNLINK)),
             trace=False)
print(json.dumps(r.summary))
"""


HEARTBEAT_S = 10.0


def run_row(n: int, privacy: str, seed: int) -> str:
    """One n in its own process; prints a heartbeat line every HEARTBEAT_S so logs show it is alive."""
    t0 = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-c", ONE, str(n), privacy, str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        while True:
            try:
                out, err = proc.communicate(timeout=HEARTBEAT_S)
                break
            except subprocess.TimeoutExpired:
                print(f"  ... n={n} running, {time.monotonic() - t0:.0f}s", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_sim: n={n} failed (exit {proc.returncode}):\n{err}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="100,200,500")
    ap.add_argument("--privacy", default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    rows = []
    note = compile_note()
    if note:
        print(note, flush=True)
    print(f"(one row per n; a line every {HEARTBEAT_S:.0f}s while a row runs; n=500 takes minutes)", flush=True)
    print(f"{'peers':>6} {'stages':>7} {'transfers':>11} {'wall_s':>8} {'peak_MiB':>9} {'us/transfer':>12}")
    for n in [int(x) for x in a.peers.split(",")]:
        s = json.loads(run_row(n, a.privacy, a.seed).strip().splitlines()[-1])
        rows.append(s)
        print(
            f"{n:>6} {s['stages']:>7} {s['transfers']:>11} {s['wall_s']:>8.1f} {s['peak_rss_bytes'] / 2**20:>9.0f} "
            f"{s['wall_s'] / s['transfers'] * 1e6:>12.2f}",
            flush=True,
        )
    if len(rows) >= 2:
        ns = np.log([r["peers"] for r in rows])
        ws = np.log([r["wall_s"] for r in rows])
        slope = float(np.polyfit(ns, ws, 1)[0])
        print(f"wall time grows as n^{slope:.2f} (transfers grow as n^2)")
    else:
        slope = float("nan")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"rows": rows, "wall_exponent": slope}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
