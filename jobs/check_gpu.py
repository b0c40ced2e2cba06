"""The device data plane's GPU check (run it through jobs/check_gpu.sh, which first makes sure there is a GPU).

Steps (each bounded, each recorded pass/fail/skipped with why):
  tests     pytest tests/test_kernels.py tests/test_nccl.py tests/test_arena.py tests/test_device_plane.py
  loopback  a 1-rank NCCL communicator: NcclDataTransport sends a run to itself, bytes and GB/s
  round     mpiexec -n 2 on one GPU, data over a CUDA-aware MPI (probed in a subprocess: a non-CUDA-aware MPI
            crashes on device buffers); fedavg_ must copy no update byte host<->device and match the host path
  bench     jobs/bench_kernels.py: blake3, pack, accumulate GB/s against the device-to-device copy (goal >= 90%)
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GOAL = 0.90


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        return p.returncode, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout:.0f}s: {e}"


def step_tests() -> dict:
    files = ["tests/test_kernels.py", "tests/test_nccl.py", "tests/test_arena.py", "tests/test_device_plane.py"]
    rc, out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], 180)
    last = [ln for ln in out.strip().splitlines() if "passed" in ln or "failed" in ln or "error" in ln][-1:]
    return {"ok": rc == 0, "summary": last[0] if last else out[-400:]}


def step_loopback(nbytes: int) -> dict:
    from fltorrent_hpc.transport.nccl import NcclDataTransport, NcclTransport, _nccl, nccl_unavailable_reason

    why = nccl_unavailable_reason()
    if why:
        return {"ok": None, "skipped": why}

    class _One:
        rank, size = 0, 1

        def local_size(self) -> int:
            return 1

    nccl = _nccl()
    from fltorrent_hpc.transport.nccl import encode_unique_id

    t = NcclDataTransport(NcclTransport(encode_unique_id(nccl.get_unique_id()), 0, 1, 0, timeout_s=60), _One())
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        reqs = [t.post_recv(dst, 0, 1), t.post_send(src, 0, 1)]
        t.flush()
        got: list[int] = []
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            got += t.test(reqs)
        best = min(best, time.perf_counter() - t0)
    ok = len(got) == 2 and torch.equal(src, dst)
    t.close()
    return {"ok": ok, "bytes": nbytes, "GBps": nbytes / best / 1e9}


_PROBE = (
    "import torch; from mpi4py import MPI; c = MPI.COMM_SELF; a = torch.arange(64, dtype=torch.uint8, device='cuda'); "
    "b = torch.zeros_like(a); r = c.Irecv([b, MPI.BYTE], 0, 3); c.Send([a, MPI.BYTE], 0, 3); r.Wait(); "
    "torch.cuda.synchronize(); print('cuda-aware' if torch.equal(a, b) else 'wrong bytes')"
)

_ROUND = r"""
import sys, torch, numpy as np
from mpi4py import MPI
import fltorrent_hpc
from fltorrent_hpc.api.group import FLTorrentProcessGroup
from fltorrent_hpc.chunks.plane import COPIES, TorchPlane
from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.transport.mpi import MPITransport
comm = MPI.COMM_WORLD; rank = comm.Get_rank()
cfg = SwarmConfig(chunk_bytes=1 << 20, privacy="full", timeout_s=120.0, stage_timeout_s=30.0)
host = FLTorrentProcessGroup(comm.Dup(), timeout_s=120, config=cfg, owns_comm=True)
dev = FLTorrentProcessGroup(comm.Dup(), timeout_s=120, config=cfg, owns_comm=True)
dev.set_device_plane(TorchPlane("cuda:0", MPITransport(comm.Dup(), "cuda-aware", dup=False, owned=True)))
g = torch.Generator().manual_seed(rank)
a = [torch.randn(1 << 20, generator=g), torch.randn(4097, generator=g).to(torch.bfloat16)]
b = [t.to("cuda:0") for t in a]
fltorrent_hpc.fedavg_(a, weight=rank + 1.0, group=host)
COPIES.reset()
rep = fltorrent_hpc.fedavg_(b, weight=rank + 1.0, group=dev)
same = all(torch.equal(x, y.cpu()) for x, y in zip(a, b))
ok = comm.allreduce(int(COPIES.total == 0 and same and rep.participants == list(range(comm.Get_size()))), MPI.MIN)
if rank == 0:
    print(f"ROUND copies={COPIES.total} same={same} bytes_recv={rep.bytes_recv} round_s={rep.round_s:.3f} ok={ok}")
host.shutdown(); dev.shutdown()
sys.exit(0 if ok else 1)
"""


def step_round() -> dict:
    mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
    if not Path(mpiexec).exists():
        return {"ok": None, "skipped": "no mpiexec"}
    rc, out = _run([mpiexec, "-n", "1", sys.executable, "-c", _PROBE], 30)
    if rc != 0 or "cuda-aware" not in out:
        return {
            "ok": None,
            "skipped": "this MPI is not CUDA-aware (probe: "
            + (out.strip().splitlines() or ["crashed"])[-1][:160]
            + "); "
            "NCCL refuses two ranks on one GPU, and CUDA IPC is not built: no multi-rank device round here",
        }
    rc, out = _run([mpiexec, "-n", "2", sys.executable, "-c", _ROUND], 100, env=dict(os.environ))
    line = [ln for ln in out.splitlines() if ln.startswith("ROUND")]
    return {"ok": rc == 0, "via": "CUDA-aware MPI", "ranks": 2, "summary": line[0] if line else out[-600:]}


def step_bench(nbytes: str, out_json: Path) -> dict:
    rc, out = _run(
        [sys.executable, str(ROOT / "jobs" / "bench_kernels.py"), "--bytes", nbytes, "--json", str(out_json)], 120
    )
    if not out_json.exists():
        return {"ok": False, "error": out[-600:]}
    rows = json.loads(out_json.read_text())["rows"]
    copy = max(r["busbw_GBps"] for r in rows if r["op"] == "copy")
    ops = {}
    for r in rows:
        key = f"{r['op']}:{r['type']}"
        ops[key] = {"busbw_GBps": r["busbw_GBps"], "of_copy": r["busbw_GBps"] / copy, "wrong": r["wrong"]}
    main = [k for k in ops if k.split(":")[0] in ("blake3", "pack", "accumulate")]
    return {
        "ok": rc == 0 and all(ops[k]["wrong"] == 0 for k in ops),
        "copy_busbw_GBps": copy,
        "ops": ops,
        "at_goal": {k: ops[k]["of_copy"] >= GOAL for k in main},
        "backend": json.loads(out_json.read_text()).get("backend"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/check_gpu.json")
    ap.add_argument("--bytes", default="256MiB", help="payload of the bandwidth runs")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("check_gpu: no GPU here (torch.cuda.is_available() is False): nothing checked", file=sys.stderr)
        return 3
    from fltorrent_hpc.config import parse_bytes

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "time": time.strftime("%FT%T%z")}
    t0 = time.monotonic()
    steps = {
        "tests": step_tests,
        "loopback": lambda: step_loopback(min(parse_bytes(a.bytes), 256 << 20)),
        "round": step_round,
        "bench": lambda: step_bench(a.bytes, out.with_name(out.stem + ".kernels.json")),
    }
    for name, step in steps.items():  # each bounded (180 + 30 + 130 + 120 s at most); the JSON after each
        try:
            res[name] = step()
        except Exception as e:  # noqa: BLE001 - a step that raises is a failed check, the others still run
            res[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        res["wall_s"] = time.monotonic() - t0
        out.write_text(json.dumps(res, indent=1))
    print(f"# check_gpu on {res['device']} ({res['wall_s']:.0f} s) -> {out}")
    for k in ("tests", "loopback", "round"):
        r = res[k]
        state = "skipped" if r.get("ok") is None else ("ok" if r["ok"] else "FAILED")
        info = (
            r.get("summary") or r.get("skipped") or r.get("error") or (f"{r['GBps']:.1f} GB/s" if "GBps" in r else "")
        )
        print(f"{k:>10s}  {state:>7s}  {info}")
    b = res["bench"]
    if "ops" in b:
        state = "ok" if b["ok"] else "FAILED"
        print(f"{'bench':>10s}  {state:>7s}  copy {b['copy_busbw_GBps']:.0f} GB/s ({b['backend']})")
        for k, v in b["ops"].items():
            print(f"{'':>10s}  {k:>24s} {v['busbw_GBps']:8.1f} GB/s  {100 * v['of_copy']:5.1f}% of copy")
    else:
        print(f"{'bench':>10s}   FAILED  {b.get('error', '')[:300]}")
    failed = [k for k in ("tests", "loopback", "round", "bench") if res[k].get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
