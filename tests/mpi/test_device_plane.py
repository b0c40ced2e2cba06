"""The device data plane at several ranks: a real fedavg_ round through the engine with update rows on a
"device" moves no update byte between host and device, and averages the same bits as the host path.

.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_device_plane.py

On CPU the device is tests/fake_device.py's (rows that count every host conversion, a data transport that
takes only them and launches a stage at flush, like NCCL).  With one GPU per rank and CuPy's NCCL, the last
test runs the real plane (transport/nccl.NcclDataTransport) and counts chunks/plane.COPIES.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fltorrent_hpc
from fltorrent_hpc.api.group import FLTorrentProcessGroup
from fltorrent_hpc.chunks.plane import COPIES
from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.transport.mpi import MPITransport
from fltorrent_hpc.transport.nccl import local_device_index, nccl_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_device import HOST_COPIES, FakeDeviceTransport, FakePlane  # noqa: E402
from kernel_emu import build_emu  # noqa: E402

pytestmark = [pytest.mark.mpi(min_size=1), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """kernels/*.cu in host emulation (None without g++: the fake device then digests with the blake3 package)."""
    from mpi4py import MPI

    return build_emu(tmp_path_factory.mktemp(f"emu{MPI.COMM_WORLD.Get_rank()}"))


def _model(rank: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ts = [
        torch.randn(700, generator=g),
        torch.randn(37, generator=g).to(torch.bfloat16),
        torch.randn(3, 5, generator=g).to(torch.float16),
    ]
    return [t.to(device) for t in ts]


def _groups(privacy: str, comm, **kw):
    cfg = SwarmConfig(chunk_bytes=256, privacy=privacy, timeout_s=60.0, stage_timeout_s=5.0, **kw)
    host = FLTorrentProcessGroup(comm.Dup(), timeout_s=60.0, config=cfg, owns_comm=True, name="host-plane")
    dev = FLTorrentProcessGroup(comm.Dup(), timeout_s=60.0, config=cfg, owns_comm=True, name="fake-device")
    return host, dev


@pytest.mark.parametrize("swarm", [False, True])
@pytest.mark.parametrize("privacy", ["none", "full"])
def test_fake_device_round_moves_no_update_bytes_to_host(privacy, swarm, emu):
    """`swarm`: direct_bytes=0, so the round is not small: the host group runs the pipelined BitTorrent phase (the
    default), the device group the peer-decided stages (the pipelined phase moves host rows only)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    host, dev = _groups(privacy, comm, **(dict(direct_bytes=0) if swarm else {}))
    fake = FakeDeviceTransport(MPITransport(comm.Dup(), "fake-device", dup=False, owned=True))
    dev.set_device_plane(FakePlane(fake, emu))
    try:
        a, b = _model(rank), _model(rank)
        rep_h = fltorrent_hpc.fedavg_(a, weight=rank + 1.0, group=host)
        COPIES.reset()
        HOST_COPIES.reset()
        rep_d = fltorrent_hpc.fedavg_(b, weight=rank + 1.0, group=dev)
        assert HOST_COPIES.bytes == 0, HOST_COPIES.calls[:5]
        assert COPIES.total == 0
        assert rep_d.participants == rep_h.participants == list(range(size))
        assert rep_d.stats["streamed_fedavg"] == (size > 1)  # summed run by run during the round
        assert not rep_h.stats["streamed_fedavg"]
        assert not rep_d.stats["pipelined"]
        if swarm and size > 2:  # (two ranks with privacy full: the warm-up may already deliver everything)
            assert rep_h.stats["pipelined"]
            assert rep_d.stats["peer_decided_stages"] > 0
        if size > 1:  # the runs really went through the fake device's wire, stage by stage
            assert fake.recv_bytes >= (size - 1) * sum(t.numel() * t.element_size() for t in a)
            assert fake.flushes > 0
            assert rep_d.bytes_recv == fake.recv_bytes
            assert emu is None or {"flt_blake3_leaves", "flt_accumulate"} <= set(emu.launched)  # the .cu code ran
        for x, y in zip(a, b):
            assert torch.equal(
                x.view(torch.uint8) if x.dtype != torch.float32 else x.view(torch.int32),
                y.view(torch.uint8) if y.dtype != torch.float32 else y.view(torch.int32),
            )
        mine = np.concatenate([t.view(torch.uint8).reshape(-1).numpy() for t in b]).tobytes()
        assert len(set(comm.allgather(mine))) == 1  # every rank holds the same average
    finally:
        host.shutdown()
        dev.shutdown()


@pytest.mark.mpi(min_size=4)
def test_fake_device_digests_refuse_a_corrupting_rank(emu):
    """Rank 1 flips a byte of every run it sends: the device-side digests refuse them, rank 1 is banned and left
    out, the run-by-run sum is dropped (A is not every rank) and the others average the rest from their rows."""
    from mpi4py import MPI

    from fltorrent_hpc.api.aggregate import fedavg_packed_
    from fltorrent_hpc.chunks.layout import Layout
    from fltorrent_hpc.transport.faulty import Fault, FaultyTransport

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    cfg = SwarmConfig(chunk_bytes=256, privacy="none", timeout_s=60.0, stage_timeout_s=3.0)
    dev = FLTorrentProcessGroup(comm.Dup(), timeout_s=60.0, config=cfg, owns_comm=True, name="fake-device")
    inner = MPITransport(comm.Dup(), "data", dup=False, owned=True)
    if rank == 1:
        inner = FaultyTransport(inner, [Fault("corrupt", channel="data", stride=1 << 20)])
    dev.set_device_plane(FakePlane(FakeDeviceTransport(inner), emu))
    try:
        b = _model(rank)
        HOST_COPIES.reset()
        rep = fltorrent_hpc.fedavg_(b, weight=rank + 1.0, group=dev)
        assert HOST_COPIES.bytes == 0, HOST_COPIES.calls[:5]
        if rank != 1:
            assert 1 not in rep.participants and rep.participants
            assert not rep.stats["streamed_fedavg"]
            want = _model(rank)
            layout = Layout.from_tensors([(str(i), t) for i, t in enumerate(want)])
            from fltorrent_hpc.chunks.kernels import pack_segments

            rows = [pack_segments(_model(r), layout) for r in rep.participants]
            fedavg_packed_(want, layout, rows, [r + 1.0 for r in rep.participants])
            assert all(torch.equal(x, y) for x, y in zip(want, b))
        banned = comm.allgather(list(rep.banned))
        assert any(1 in x for i, x in enumerate(banned) if i != 1)
        assert rank != 1 or inner.injected.get("corrupt", 0) > 0
    finally:
        dev.shutdown()


def _cuda_ranks_ok() -> bool:
    from mpi4py import MPI

    return torch.cuda.is_available() and torch.cuda.device_count() >= MPI.COMM_WORLD.Get_size() and nccl_available()


@pytest.mark.skipif(not _cuda_ranks_ok(), reason="needs one CUDA device per rank and CuPy's NCCL")
def test_cuda_nccl_round_moves_no_update_bytes_to_host():
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dev_name = f"cuda:{local_device_index()}"
    torch.cuda.set_device(torch.device(dev_name))
    host, dev = _groups("full", comm)
    try:
        a, b = _model(rank), _model(rank, dev_name)
        fltorrent_hpc.fedavg_(a, weight=rank + 1.0, group=host)
        fltorrent_hpc.fedavg_(b, weight=rank + 1.0, group=dev)  # builds the NCCL communicator
        b = _model(rank, dev_name)
        COPIES.reset()
        rep = fltorrent_hpc.fedavg_(b, weight=rank + 1.0, group=dev)
        assert COPIES.total == 0
        assert rep.participants == list(range(size))
        assert rep.bytes_recv > 0 or size == 1
        for x, y in zip(a, b):
            assert torch.equal(x, y.cpu())  # the check reads back the parameters, after the round
    finally:
        host.shutdown()
        dev.shutdown()
