"""`make demo`: federated training of digits on local MPI ranks, every round swarmed and averaged in place.

    python jobs/demo.py --np 4                 # what `make demo` runs
    python jobs/demo.py --np 4 -- --split dirichlet --alpha 0.1     # extra options go to fedavg_train.py

Launches `mpiexec -n NP python jobs/fedavg_train.py <demo defaults>` with the mpiexec next to this Python
(the venv's mpich), then prints where the outputs went.  Demo defaults: 10 rounds, IID split, FedAvg over the
swarm with the central (server FedAvg, bit-exact check) and gossip baselines in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_ARGS = ["--rounds", "10", "--split", "iid", "--baseline", "central,gossip"]


def find_mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if not found:
        raise SystemExit(f"no mpiexec next to {sys.executable} or on PATH; install mpich (pip install mpich)")
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--np", type=int, default=4, help="MPI ranks = FL peers (default 4)")
    ap.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    cmd = [
        find_mpiexec(),
        "-n",
        str(a.np),
        sys.executable,
        str(ROOT / "jobs" / "fedavg_train.py"),
        *DEMO_ARGS,
        "--progress",
        "bar" if sys.stdout.isatty() else "lines",
        "--out",
        str(out),
        *extra,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env, cwd=str(ROOT))
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"demo FAILED: mpiexec exited with {rc} after {wall:.1f}s", file=sys.stderr)
        return rc
    summary = (ROOT / out if not out.is_absolute() else out) / "summary.json"
    s = json.loads(summary.read_text()) if summary.exists() else {}
    print(f"\ndemo finished in {wall:.1f}s wall on {a.np} ranks")
    if s:
        print(f"  final accuracy        {s['final_accuracy']:.4f} (swarm FedAvg, {s['rounds']} rounds)")
        if s.get("baseline_final_accuracy") is not None:
            print(f"  central FedAvg        {s['baseline_final_accuracy']:.4f}")
        if s.get("bitexact_rounds") is not None:
            print(f"  bit-exact rounds      {s['bitexact_rounds']}/{s['rounds']} (swarm vs central parameters)")
        if s.get("gossip_final_accuracy") is not None:
            print(f"  gossip (mean of peers) {s['gossip_final_accuracy']:.4f}")
        o = s.get("outputs", {})
        print("outputs:")
        print(f"  summary     {o.get('json')}")
        print(f"  plot        {o.get('png')}")
        print(f"  traces      {o.get('traces')}/round_NNN.h5")
        print(f"  checkpoints {o.get('checkpoints')}  (resume: add -- --resume)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
