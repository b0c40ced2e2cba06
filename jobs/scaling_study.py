"""Scaling studies of the paper's dissemination results (and past them), then the report.

    python jobs/scaling_study.py table3 --jobs 2            # one study -> results/table3.h5 + .json
    python jobs/scaling_study.py paper --jobs 2             # table3, ablation, cover, schedulers, llm, privacy, report
    python jobs/scaling_study.py all --jobs 2               # the paper studies and `beyond`, then report
    python jobs/scaling_study.py report results/*.h5 --out docs/figures --markdown docs/RESULTS.md
    python jobs/scaling_study.py --list

Same as `fltorrent study ...` / `fltorrent report ...`; options after the study name are passed through
(--out, --jobs, --seeds, --mini, --traces, --only, --fresh, --check).  Every study resumes where it stopped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fltorrent_hpc.studies.cli import study_main
from fltorrent_hpc.studies.report import report_main

PAPER = ("table3", "ablation", "cover", "schedulers", "llm", "privacy")
GROUPS = {"paper": PAPER, "all": (*PAPER, "beyond")}


def _opt(argv: list[str], name: str, default: str) -> str:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def main(argv: list[str]) -> int:
    if argv and argv[0] == "report":
        return report_main(argv[1:])
    if argv and argv[0] in GROUPS:
        rest = argv[1:]
        out = Path(_opt(rest, "--out", "results"))
        suffix = "-mini" if "--mini" in rest else ""
        rc = 0
        for name in GROUPS[argv[0]]:
            t0 = time.perf_counter()
            rc |= study_main([name, *rest])
            print(f"== {name}: {time.perf_counter() - t0:.1f}s wall", flush=True)
        files = [str(out / f"{n}{suffix}.h5") for n in GROUPS[argv[0]] if (out / f"{n}{suffix}.h5").exists()]
        figs = out / "figures" if suffix else Path("docs/figures")
        md = out / "RESULTS.md" if suffix else Path("docs/RESULTS.md")
        return rc | report_main([*files, "--out", str(figs), "--markdown", str(md)])
    return study_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
