"""Every command of README.md's "Using it" shell block, run at reduced size, each within a time bound.

The commands are parsed from the README (so the test follows it), shrunk by the REDUCE table, and run in a
scratch directory where `.venv` is this interpreter's environment and `jobs/` the repository's.  Each must exit
0 and write the files its --json/--trace/--out options name.  Full-size wall times are in the issue-21 report.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOUND_S = 150.0  # per reduced command, with room for a loaded 2-core machine
# (pattern, replacement): the full-size knobs each command uses, shrunk; every pattern must match somewhere
REDUCE = [
    (r"mpiexec -n 4 ", "mpiexec -n 2 "),
    (r"--nproc_per_node=4 ", "--nproc_per_node=2 "),
    (r"--rounds 10\b", "--rounds 2"),
    (r"--peers 100 ", "--peers 12 --update-bytes 2MiB "),
    (r"--peers 100,200,500\b", "--peers 10,14"),
    (r"study table3 --jobs 2\b", "study table3 --jobs 2 --mini"),
    (r"results/table3\.h5", "results/table3-mini.h5"),
    (r"(jobs/bench_allgather\.py)", r"\1 --sizes 64KiB --iters 1 --emulate-sizes 256KiB --emulate-iters 1"),
    (r"(jobs/bench_kernels\.py)", r"\1 --bytes 4MiB --chunk 1MiB --tensors 8 --iters 1"),
]


def readme_commands() -> list[str]:
    """The lines of the first untagged fenced block after the "## Using it" heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    blocks, cur, tag = [], None, ""
    for line in section.splitlines():
        if line.startswith("```"):
            if cur is None:
                cur, tag = [], line[3:].strip()
            else:
                blocks.append((tag, cur))
                cur = None
        elif cur is not None:
            cur.append(line)
    shell = [lines for tag, lines in blocks if tag in ("", "sh", "bash", "shell")]
    assert shell, "README.md: no shell block under 'Using it'"
    return [ln.strip() for ln in shell[0] if ln.strip() and not ln.strip().startswith("#")]


def reduce(cmd: str) -> str:
    for pat, rep in REDUCE:
        cmd = re.sub(pat, rep, cmd)
    return cmd


def outputs(cmd: str) -> list[str]:
    """Files and directories a command promises: the values of its --json, --trace and --out options."""
    words = shlex.split(cmd.replace("&&", " "))
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--json", "--trace", "--out")]


def test_every_reduction_applies():
    """A README edit that drops a knob the table shrinks would make a full-size run sneak into the tests."""
    joined = "\n".join(readme_commands())
    for pat, _ in REDUCE:
        assert re.search(pat, joined), f"README 'Using it' no longer matches {pat!r}; update REDUCE"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    (d / "jobs").symlink_to(REPO / "jobs")
    (d / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return d


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_commands_at_reduced_size(scratch):
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "mpiexec").exists() or not (venv_bin / "fltorrent").exists():
        pytest.skip("needs the venv's mpiexec and fltorrent script (make env)")
    env = dict(
        os.environ,
        PATH=f"{venv_bin}:{os.environ['PATH']}",
        PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    times = []
    for full in readme_commands():  # in order: `attack` reads the trace `simulate` wrote
        cmd = reduce(full)
        t0 = time.monotonic()
        p = subprocess.run(
            ["bash", "-c", cmd], cwd=scratch, env=env, capture_output=True, text=True, timeout=BOUND_S * 2
        )
        wall = time.monotonic() - t0
        times.append((wall, cmd))
        assert p.returncode == 0, f"{cmd}\nexit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        assert wall <= BOUND_S, f"{cmd} took {wall:.0f}s > {BOUND_S:.0f}s"
        for out in outputs(cmd):
            assert (scratch / out).exists(), f"{cmd} did not write {out}"
    print("\n".join(f"{w:6.1f}s  {c}" for w, c in times))
