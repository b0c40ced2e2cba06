"""The device data plane without mpiexec: buffer planes, copy accounting, the fake device at one rank, the NCCL
data transport's stage grouping (over a stand-in communicator), the host-staging warning, jobs/check_gpu.sh
on a machine without a GPU, and (skipped without CUDA) a CUDA fedavg_ that copies no update byte to the host.

.venv/bin/python -m pytest -q tests/test_device_plane.py
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fltorrent_hpc
from fltorrent_hpc.api import fedavg as fedavg_mod
from fltorrent_hpc.api.group import FLTorrentProcessGroup
from fltorrent_hpc.chunks.digest import chunk_digests, round_key
from fltorrent_hpc.chunks.plane import COPIES, HOST, TorchPlane, to_device, to_host
from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.errors import ShapeMismatchError, TransportError
from fltorrent_hpc.transport.nccl import NcclDataTransport

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_device import HOST_COPIES, CountingTensor, FakeDeviceTransport, FakePlane, on_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def _model(device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ts = [torch.randn(300, generator=g), torch.randn(17, generator=g).to(torch.bfloat16)]
    return [t.to(device) for t in ts]


# ------------------------------------------------------------------------------------------------ planes
def test_host_plane_is_numpy():
    pay = np.arange(1000, dtype=np.uint8)
    assert np.shares_memory(HOST.adopt(pay), pay)
    assert HOST.nbytes(pay) == 1000
    key = round_key(3, 1, 0)
    assert np.array_equal(HOST.digests(pay, 256, key), chunk_digests(pay, 256, key))
    assert HOST.zeros(5).tolist() == [0] * 5 and HOST.scratch(pay[:10]).shape == (10,)
    with pytest.raises(ShapeMismatchError):
        HOST.adopt(np.zeros((4, 4), np.uint8)[:, 1])


def test_torch_plane_digests_match_the_host_and_check_their_input():
    plane = TorchPlane("cpu")
    pay = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    key = round_key(9, 2, 1)
    assert np.array_equal(plane.digests(pay, 256, key), chunk_digests(pay.numpy(), 256, key))
    assert plane.nbytes(pay[10:20]) == 10
    with pytest.raises(ShapeMismatchError):
        plane.adopt(pay.numpy())
    with pytest.raises(ShapeMismatchError):
        plane.adopt(pay.view(torch.int8))


def test_copies_are_counted_only_across_host_and_device():
    COPIES.reset()
    to_host(torch.zeros(64, dtype=torch.uint8))  # a CPU tensor: no copy
    to_device(np.zeros(64, np.uint8), torch.device("cpu"))
    assert COPIES.total == 0
    to_device(np.zeros(64, np.uint8), torch.device("meta"))  # a device that is not the host: counted
    assert COPIES.h2d_bytes == 64 and COPIES.d2h_bytes == 0
    COPIES.reset()


def test_counting_tensor_sees_every_host_conversion():
    HOST_COPIES.reset()
    t = on_device(torch.zeros(100, dtype=torch.uint8))
    v = t[10:20]
    assert isinstance(v, CountingTensor)  # views stay fake device memory
    v.numpy()
    np.asarray(t[:30])
    t.cpu()
    assert HOST_COPIES.bytes == 10 + 30 + 100
    HOST_COPIES.reset()


def test_fake_transport_takes_only_fake_device_buffers():
    from mpi4py import MPI

    from fltorrent_hpc.transport.mpi import MPITransport

    fake = FakeDeviceTransport(MPITransport(MPI.COMM_SELF))
    with pytest.raises(TypeError, match="fake device buffers only"):
        fake.post_send(np.zeros(8, np.uint8), 0, 1)
    with pytest.raises(TypeError, match="fake device buffers only"):
        fake.post_recv(torch.zeros(8, dtype=torch.uint8), 0, 1)
    fake.close()


# ------------------------------------------------------------------------------------------ run accumulator
def test_run_accumulator_in_any_arrival_order_equals_fedavg_packed():
    from fltorrent_hpc.api.aggregate import fedavg_packed_
    from fltorrent_hpc.chunks.kernels import finalize_fedavg_, pack_segments
    from fltorrent_hpc.chunks.layout import Layout
    from fltorrent_hpc.chunks.plane import RunAccumulator

    g = torch.Generator().manual_seed(3)
    n, C = 4, 64
    models = [[torch.randn(100, generator=g), torch.randn(21, generator=g).to(torch.float16)] for _ in range(n)]
    layout = Layout.from_tensors([(str(i), t) for i, t in enumerate(models[0])])
    rows = [pack_segments(m, layout) for m in models]
    w = np.array([1.0, 2.5, 0.3, 7.0])
    K = layout.n_chunks(C)
    ref = [t.clone() for t in models[0]]
    fedavg_packed_(ref, layout, rows, list(w))
    order = [(u, c) for u in range(1, n) for c in range(K)]
    rng = np.random.default_rng(5)
    rng.shuffle(order)
    acc = RunAccumulator(layout, C, "cpu")
    acc.start(rows, w, skip=[])
    acc.add(0, np.arange(K))
    for u, c in order:
        assert acc.result(list(range(n))) is None or (u, c) == order[-1]
        acc.add(u, np.array([c]))
    assert acc.launches < n * K  # consecutive chunks whose turn came together went in one launch
    out = [t.clone() for t in models[0]]
    finalize_fedavg_(acc.result(list(range(n))), float(sum(np.float64(x) for x in w)), out, layout)
    assert all(torch.equal(x, y) for x, y in zip(out, ref))
    assert acc.result([0, 1, 3]) is None  # an owner left the agreed set: the caller sums the rows again


# ------------------------------------------------------------------------------------------ fedavg_ at one rank
def test_fake_device_fedavg_one_rank_no_host_copies():
    from mpi4py import MPI

    cfg = SwarmConfig(chunk_bytes=256, privacy="none", timeout_s=20.0)
    host = FLTorrentProcessGroup(MPI.COMM_SELF, timeout_s=20, config=cfg)
    dev = FLTorrentProcessGroup(MPI.COMM_SELF, timeout_s=20, config=cfg)
    dev.set_device_plane(FakePlane())
    try:
        a, b = _model(), _model()
        fltorrent_hpc.fedavg_(a, weight=3.0, group=host)
        COPIES.reset()
        HOST_COPIES.reset()
        rep = fltorrent_hpc.fedavg_(b, weight=3.0, group=dev)
        assert HOST_COPIES.bytes == 0, HOST_COPIES.calls
        assert COPIES.total == 0
        assert rep.participants == [0]
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    finally:
        host.shutdown()
        dev.shutdown()


def test_group_device_plane_choice():
    from mpi4py import MPI

    pg = FLTorrentProcessGroup(MPI.COMM_SELF, timeout_s=10)
    try:
        assert pg.device_plane(torch.device("cpu")) is None  # CPU tensors: host rows
        p = pg.device_plane(torch.device("cuda", 0))  # a group of one moves nothing: no transport needed
        assert isinstance(p, TorchPlane) and p.data is None and pg.plane_why == ""
        assert pg.device_plane(torch.device("cuda", 0)) is p
        closed = []

        class Data:
            def close(self):
                closed.append(True)

        fake = FakePlane(Data())
        pg.set_device_plane(fake)
        assert pg.device_plane(torch.device("cpu")) is fake  # an installed plane serves its own device
    finally:
        pg.shutdown()
    assert closed == [True]  # the group closes its plane's transport


def test_cuda_without_a_device_plane_warns_once(monkeypatch):
    class Stub:
        plane_why = "no CUDA device is visible"

        def device_plane(self, device):
            return None

    monkeypatch.setattr(fedavg_mod, "_WARNED", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert fedavg_mod._plane_for(Stub(), torch.device("cuda", 0)) is None
        assert fedavg_mod._plane_for(Stub(), torch.device("cuda", 0)) is None
        assert fedavg_mod._plane_for(Stub(), torch.device("cpu")) is None
    msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "staged through host memory" in msgs[0] and "no CUDA device" in msgs[0]


# ------------------------------------------------------------------------ NCCL data transport, stand-in comm
class _Handle:
    def __init__(self):
        self.finished = False

    def done(self):
        return self.finished


class _StandInNccl:
    """What NcclDataTransport uses of NcclTransport: device, stage(), check_async_error(), abort(), close()."""

    def __init__(self):
        self.device = torch.device("cpu")
        self._aborted = False
        self.stages: list = []

    def stage(self, sends, recvs, *, round_id=0, stage_id=0):
        h = _Handle()
        self.stages.append(([p for p, _ in sends], [p for p, _ in recvs], h))
        return h

    def check_async_error(self):
        pass

    def abort(self):
        self._aborted = True

    def close(self):
        pass


class _Host:
    rank, size = 0, 3

    def local_size(self):
        return 1


def test_nccl_data_transport_launches_a_stage_as_one_group_at_flush():
    nccl = _StandInNccl()
    t = NcclDataTransport(nccl, _Host())
    buf = torch.zeros(64, dtype=torch.uint8)
    reqs = [t.post_recv(buf[:16], 1, 5), t.post_recv(buf[16:32], 2, 5), t.post_send(buf[32:], 1, 5)]
    assert t.test(reqs) == [] and nccl.stages == []  # queued, not launched: a receive cannot block a send
    t.flush()
    assert [(s, r) for s, r, _ in nccl.stages] == [([1], [1, 2])]
    assert t.test(reqs) == []
    nccl.stages[0][2].finished = True
    assert t.test(reqs) == [0, 1, 2] and t.test(reqs) == []  # each completion once
    with pytest.raises(ShapeMismatchError):
        t.post_send(buf, 3, 5)  # outside the world


def test_nccl_data_transport_cancel_of_a_launched_receive_aborts():
    nccl = _StandInNccl()
    t = NcclDataTransport(nccl, _Host())
    buf = torch.zeros(32, dtype=torch.uint8)
    queued = t.post_recv(buf[:8], 1, 5)
    t.cancel([queued])  # never launched: dropped, the communicator lives
    assert not nccl._aborted and t.test([queued]) == [0] and t.failed(queued) is None
    late = t.post_recv(buf[8:], 2, 5)
    t.flush()
    t.cancel([late])
    assert nccl._aborted
    with pytest.raises(TransportError, match="aborted"):
        t.post_recv(buf, 1, 5)


# ------------------------------------------------------------------------------------------ jobs/check_gpu.sh
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_check_gpu_says_no_gpu_and_exits_3(tmp_path):
    p = subprocess.run(
        ["bash", str(ROOT / "jobs" / "check_gpu.sh"), "--out", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)},
    )
    assert p.returncode == 3, p.stdout + p.stderr
    assert "no GPU" in p.stdout + p.stderr
    assert not (tmp_path / "gpu.json").exists()


# --------------------------------------------------------------------------------------------- real CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fedavg_one_rank_copies_no_update_bytes():
    from mpi4py import MPI

    cfg = SwarmConfig(chunk_bytes=4096, privacy="none", timeout_s=60.0)
    pg = FLTorrentProcessGroup(MPI.COMM_SELF, timeout_s=60, config=cfg)
    try:
        ref = _model()
        fltorrent_hpc.fedavg_(ref, weight=3.0, group=pg)
        b = _model("cuda")
        COPIES.reset()
        rep = fltorrent_hpc.fedavg_(b, weight=3.0, group=pg)
        assert COPIES.total == 0
        assert rep.participants == [0]
        assert all(torch.equal(x, y.cpu()) for x, y in zip(ref, b))
    finally:
        pg.shutdown()


def _nccl_ok() -> bool:
    from fltorrent_hpc.transport.nccl import nccl_available

    return nccl_available()


@pytest.mark.skipif(not _nccl_ok(), reason="needs a CUDA device and CuPy's NCCL")
def test_nccl_data_transport_loopback_on_gpu():
    """A 1-rank communicator: a run sent to itself lands in its receive row, launched at flush."""
    import time

    from fltorrent_hpc.transport.nccl import NcclTransport, _nccl, encode_unique_id

    t = NcclDataTransport(NcclTransport(encode_unique_id(_nccl().get_unique_id()), 0, 1, 0, timeout_s=60), _Host1())
    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    reqs = [t.post_recv(dst[: 1 << 19], 0, 1), t.post_recv(dst[1 << 19 :], 0, 1)]
    reqs += [t.post_send(src[: 1 << 19], 0, 1), t.post_send(src[1 << 19 :], 0, 1)]  # matched in posting order
    t.flush()
    got: list[int] = []
    deadline = time.monotonic() + 60
    while len(got) < 4 and time.monotonic() < deadline:
        got += t.test(reqs)
    assert sorted(got) == [0, 1, 2, 3]
    assert torch.equal(src, dst)
    t.close()


class _Host1:
    rank, size = 0, 1

    def local_size(self):
        return 1
