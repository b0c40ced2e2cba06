"""Named scaling studies: grids of simulated rounds, run in parallel, resumable, one HDF5 file per study.

    fltorrent study table3 --jobs 2              # Table III: n = 100..500, full privacy, GFF
    fltorrent study ablation --seeds 3           # Fig. 4 with three seeds per configuration
    fltorrent study beyond --out runs/ --traces runs/traces
    fltorrent report results/*.h5 --out docs/figures --markdown docs/RESULTS.md

A study is a list of points; a point is (name, params) and one run of `runtime.simulator.simulate` (or of a
"module:function" runner).  Workers (one process per point, so each point's peak RSS is its own) return
results; only this parent process writes the study file, and each point is committed by an atomic file replace
with a `done` attribute, so an interrupted study resumes where it stopped and a crash never leaves a
half-written point behind.  Layout of STUDY.h5 (and the JSON summary beside it) is in docs/STUDIES.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from .driver import run_study
from .grids import studies
from .registry import GridArgs
from .store import dumps


def parse_seeds(text: str) -> tuple[int, ...]:
    """'3' -> (0, 1, 2); '0,5,7' -> (0, 5, 7)."""
    t = text.strip()
    if "," in t:
        return tuple(int(x) for x in t.split(",") if x.strip())
    n = int(t)
    if n < 1:
        raise argparse.ArgumentTypeError("--seeds needs a count >= 1 or a comma list")
    return tuple(range(n))


def study_main(argv: list[str] | None = None) -> int:
    """`fltorrent study NAME [--out DIR] [--jobs N] [--seeds S] [--mini] [--traces DIR]`."""
    reg = studies()
    ap = argparse.ArgumentParser(
        prog="fltorrent study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("name", nargs="?", help="study: " + ", ".join(sorted(reg)))
    ap.add_argument("--out", default="results", help="directory of STUDY.h5 and STUDY.json (default results/)")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="worker processes")
    ap.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        help="a count (3 = seeds 0,1,2) or a list 0,4,7 (default: the study's, seed 0 for the paper studies)",
    )
    ap.add_argument("--mini", action="store_true", help="miniature grid (n <= 30, 24-chunk updates): smoke test")
    ap.add_argument("--traces", default=None, metavar="DIR", help="also write each point's full trace here")
    ap.add_argument("--only", default=None, help="comma list of point or group names to run")
    ap.add_argument("--fresh", action="store_true", help="discard the study file and start over")
    ap.add_argument("--check", action="store_true", help="exit 1 when one of the study's claims fails")
    ap.add_argument("--list", action="store_true", help="list the studies and their points, run nothing")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.list or not a.name:
        for s in sorted(reg.values(), key=lambda s: s.name):
            pts = s.grid(GridArgs(mini=a.mini, seeds=a.seeds or s.default_seeds))
            print(f"{s.name:11s} {s.paper:10s} {len(pts):3d} points  {s.title}")
            if a.name == s.name:
                print("\n".join(f"    {p.name}  {dumps(p.params)}" for p in pts))
        return 0 if a.list else 2
    if a.name not in reg:
        print(f"fltorrent study: unknown study {a.name!r}; known: {', '.join(sorted(reg))}", file=sys.stderr)
        return 2
    if a.seeds is None:
        a.seeds = reg[a.name].default_seeds
    # the command that reproduces the whole study (without --only/--fresh, which only steer one invocation)
    cmd = f"fltorrent study {a.name} --out {a.out} --jobs {a.jobs}"
    seeds = ",".join(map(str, a.seeds)) + ("," if len(a.seeds) == 1 else "")  # "5," is seed 5, "5" is 5 seeds
    cmd += (f" --seeds {seeds}" if a.seeds != (0,) else "") + (" --mini" if a.mini else "")
    cmd += f" --traces {a.traces}" if a.traces else ""
    st = run_study(
        a.name, a.out, a.jobs, a.seeds, a.mini, a.traces, a.fresh, a.only.split(",") if a.only else None, a.quiet, cmd
    )
    if not a.quiet:
        print(
            f"{st.path}: {len(st.ran)} point(s) run, {len(st.skipped)} skipped, {len(st.failed)} failed "
            f"in {st.wall_s:.1f}s; summary {st.path.with_suffix('.json')}"
        )
        for c in st.derived.get("claims", []):
            print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['claim']}: {c['value']}")
    if st.failed:
        return 1
    if a.check and not all(c["ok"] for c in st.derived.get("claims", [])):
        return 1
    return 0
