"""jobs/fedavg_train.py end to end on real ranks: swarm FedAvg == central FedAvg bit for bit, resume == uninterrupted,
and median beats FedAvg with a poisoned peer.

.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_train.py
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.mpi(min_size=2),
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[2]
# small and quick; the swarm still cuts every ~19 KB update into 10 chunks of 2 KiB
COMMON = ["--quiet", "--no-plot", "--no-trace", "--timeout", "60", "--chunk-bytes", "2KiB", "--degree", "2"]


def _job():
    if "fedavg_train" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fedavg_train", ROOT / "jobs" / "fedavg_train.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fedavg_train"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["fedavg_train"]


def _comm():
    from mpi4py import MPI

    return MPI, MPI.COMM_WORLD


def shared_dir() -> Path:
    """A fresh directory made by rank 0, its path broadcast as fixed-width bytes (no pickle)."""
    MPI, comm = _comm()
    buf = np.zeros(1024, dtype=np.uint8)
    if comm.Get_rank() == 0:
        p = tempfile.mkdtemp(prefix="fltorrent-train-").encode()
        buf[: len(p)] = np.frombuffer(p, dtype=np.uint8)
    comm.Bcast(buf, root=0)
    return Path(bytes(buf).rstrip(b"\0").decode())


def cleanup(d: Path) -> None:
    _, comm = _comm()
    comm.Barrier()
    if comm.Get_rank() == 0:
        shutil.rmtree(d, ignore_errors=True)


def all_agree(check) -> None:
    """Run `check` on every rank; assert only after all ranks agreed on pass/fail (Allreduce MIN of a flag)."""
    MPI, comm = _comm()
    try:
        check()
        ok, msg = 1, ""
    except Exception:
        ok, msg = 0, traceback.format_exc()
    flag = np.array([ok], dtype=np.int64)
    every = np.empty_like(flag)
    comm.Allreduce(flag, every, op=MPI.MIN)
    assert every[0] == 1, f"rank {comm.Get_rank()}: {msg or 'another rank failed'}"


def run(out: Path, *args: str) -> dict:
    job = _job()
    return job.train(job.parse_args([*COMMON, "--out", str(out), *args]))


def params(model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _job().fl_tensors(model)]


def test_swarm_fedavg_equals_central_fedavg_bit_for_bit():
    d = shared_dir()
    box: dict = {}

    def check():
        s = run(d / "bitexact", "--rounds", "3", "--epochs", "1", "--baseline", "central")
        box["s"] = s
        assert s["rounds"] == 3 and s["complete_rounds"] == 3, s["participants_by_round"]
        assert s["bitexact_rounds"] == 3, s["bitexact_by_round"]
        sw, ce = params(s["models"]["swarm"]), params(s["models"]["central"])
        assert all(torch.equal(a, b) for a, b in zip(sw, ce))
        assert s["accuracy_by_round"] == s["baseline_accuracy_by_round"]

    all_agree(check)
    # and every rank holds the same averaged parameters (gathered as raw bytes)
    MPI, comm = _comm()
    mine = torch.cat([t.reshape(-1) for t in params(box["s"]["models"]["swarm"])]).numpy()
    everyone = np.empty((comm.Get_size(), mine.size), dtype=mine.dtype)
    comm.Allgather(mine, everyone)
    all_agree(lambda: None if all(np.array_equal(everyone[0], r) for r in everyone) else 1 / 0)
    cleanup(d)


def test_resume_after_stop_gives_the_uninterrupted_parameters():
    d = shared_dir()

    def check():
        full = run(d / "full", "--rounds", "4", "--baseline", "central")
        part = run(d / "cut", "--rounds", "4", "--baseline", "central", "--stop-after", "2")
        assert part["rounds"] == 2
        ck = sorted((d / "cut" / "ckpt").glob("round_*.rank0.pt"))
        assert ck and ck[-1].name == "round_0002.rank0.pt"
        resumed = run(d / "cut", "--rounds", "4", "--baseline", "central", "--resume")
        assert resumed["rounds"] == 4
        for name in ("swarm", "central"):
            a, b = params(full["models"][name]), params(resumed["models"][name])
            assert all(torch.equal(x, y) for x, y in zip(a, b)), name
        assert full["accuracy_by_round"] == resumed["accuracy_by_round"]
        assert full["final_params_sha"] == resumed["final_params_sha"]

    all_agree(check)
    cleanup(d)


def test_median_beats_fedavg_with_one_poisoned_peer():
    d = shared_dir()
    _, comm = _comm()
    if comm.Get_size() < 4:
        pytest.skip("needs >= 4 ranks so that one poisoned peer is a minority")

    def check():
        kw = ["--rounds", "6", "--poison", "1", "--poison-mode", "scale", "--baseline", "central"]
        fa = run(d / "fedavg", *kw, "--rule", "fedavg")
        md = run(d / "median", *kw, "--rule", "median")
        assert md["bitexact_rounds"] == 6 and fa["bitexact_rounds"] == 6  # the rules agree with the server too
        assert md["final_accuracy"] >= 0.85, md["accuracy_by_round"]
        assert fa["final_accuracy"] <= 0.5, fa["accuracy_by_round"]

    all_agree(check)
    cleanup(d)
