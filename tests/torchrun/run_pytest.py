"""One torchrun worker's pytest session: `FLTORRENT_TORCHRUN_LOG=PREFIX torchrun ... run_pytest.py PYTEST_ARGS`.

Each rank writes its pytest output to PREFIX.rankR.log (default /tmp/fltorrent-torchrun; the ranks' outputs
would interleave on one terminal) and prints one line `fltorrent-rank R: rc=.. passed=.. failed=.. errors=..
skipped=..` that tests/test_torchrun.py reads.  pytest-mpi is left out: these tests run without MPI (its `mpi`
marks only tag them).
"""

from __future__ import annotations

import os
import sys

import pytest


class _Count:
    """Outcome counts of this rank's session."""

    def __init__(self) -> None:
        self.counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.counts["failed" if report.when == "call" else "errors"] += 1
        elif report.skipped:
            self.counts["skipped"] += 1
        elif report.passed and report.when == "call":
            self.counts["passed"] += 1


def main() -> int:
    args = sys.argv[1:]
    prefix = os.environ.get("FLTORRENT_TORCHRUN_LOG", "/tmp/fltorrent-torchrun")
    rank = int(os.environ.get("RANK", "0"))
    out = os.dup(1)
    with open(f"{prefix}.rank{rank}.log", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        count = _Count()
        quiet = ["-q", "-p", "no:pytest_mpi", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
        rc = pytest.main([*quiet, *args], plugins=[count])
        sys.stdout.flush()
    line = f"fltorrent-rank {rank}: rc={int(rc)} " + " ".join(f"{k}={v}" for k, v in count.counts.items())
    os.write(out, (line + "\n").encode())
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
