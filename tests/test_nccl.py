"""NCCL transport: bootstrap and validation everywhere; real send/recv only with CuPy + CUDA."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from fltorrent_hpc.errors import ConfigError, PeerTimeoutError, ShapeMismatchError
from fltorrent_hpc.transport import nccl as N


def test_imports_without_cupy_and_fails_clearly_when_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if CuPy were not installed
    monkeypatch.delitem(sys.modules, "cupy.cuda", raising=False)
    monkeypatch.delitem(sys.modules, "cupy.cuda.nccl", raising=False)
    assert not N.nccl_available()
    with pytest.raises(ConfigError, match="needs CuPy with NCCL"):
        N.NcclTransport(b"\0" * N.UID_BYTES, 0, 1, 0)
    with pytest.raises(ConfigError, match="cupy-cuda12x"):
        N.NcclTransport.from_store(dist.HashStore(), 0, 1)


@settings(max_examples=50, deadline=None)
@given(uid=st.lists(st.integers(-128, 127), min_size=128, max_size=128))
def test_unique_id_round_trips_in_both_cupy_forms(uid):
    raw = N.encode_unique_id(tuple(uid))  # CuPy < 13: tuple of signed chars
    assert len(raw) == N.UID_BYTES
    assert N.decode_unique_id(raw, as_bytes=False) == tuple(uid)
    assert N.encode_unique_id(raw) == raw  # CuPy >= 13: bytes
    assert N.decode_unique_id(raw, as_bytes=True) == raw


def test_unique_id_length_checked():
    with pytest.raises(ConfigError, match="128 bytes"):
        N.encode_unique_id(b"\1" * 127)
    with pytest.raises(ConfigError, match="128 bytes"):
        N.decode_unique_id(b"\1" * 129, as_bytes=True)


def test_store_bootstrap_reaches_every_rank():
    store = dist.HashStore()
    uid = bytes(range(128))
    got: dict[int, bytes] = {}

    def rank_main(r: int) -> None:
        got[r] = N.exchange_unique_id_store(store, r, lambda: uid, key="t/uid", timeout_s=30)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (3, 2, 1)]  # waiters start first
    for t in threads:
        t.start()
    rank_main(0)
    for t in threads:
        t.join(30)
    assert got == {r: uid for r in range(4)}


def test_store_bootstrap_times_out_naming_rank0_and_key():
    with pytest.raises(PeerTimeoutError, match=r"rank 1 waited .*rank 0.*'t/missing'"):
        N.exchange_unique_id_store(dist.HashStore(), 1, lambda: b"", key="t/missing", timeout_s=0.2)


class _FakeRequest:
    def __init__(self, done: bool):
        self.done = done

    def Test(self) -> bool:
        return self.done


class _FakeComm:
    """Rank 0 completes its broadcast at once; other ranks never hear from rank 0."""

    def __init__(self, rank: int):
        self.rank = rank

    def Get_rank(self) -> int:
        return self.rank

    def Ibcast(self, buf, root: int):
        assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.size == N.UID_BYTES and root == 0
        return _FakeRequest(self.rank == 0)


def test_mpi_bootstrap_fixed_buffer_and_bound():
    uid = tuple(range(-64, 64))
    assert N.exchange_unique_id_mpi(_FakeComm(0), lambda: uid) == N.encode_unique_id(uid)
    with pytest.raises(PeerTimeoutError, match="rank 1 waited"):
        N.exchange_unique_id_mpi(_FakeComm(1), lambda: uid, timeout_s=0.1)


def test_local_device_from_launcher_env():
    assert N.local_device_index({"LOCAL_RANK": "3"}, 4) == 3
    assert N.local_device_index({"SLURM_LOCALID": "5"}, 4) == 1
    assert N.local_device_index({"OMPI_COMM_WORLD_LOCAL_RANK": "2", "SLURM_LOCALID": "1"}, 8) == 1
    assert N.local_device_index({}, 2) == 0
    with pytest.raises(ConfigError, match="no CUDA device"):
        N.local_device_index({"LOCAL_RANK": "0"}, 0)


def test_transfer_validation():
    dev = torch.device("cuda", 0)
    with pytest.raises(ShapeMismatchError, match="contiguous tensor on cuda:0"):
        N.check_transfers([(1, torch.zeros(4, dtype=torch.uint8))], dev, 4, "send")
    with pytest.raises(ShapeMismatchError, match=r"peer 4 outside \[0, 4\)"):
        N.check_transfers([(4, torch.zeros(4, device="meta"))], torch.device("meta"), 4, "recv")
    ok = N.check_transfers([(2, torch.zeros(4, device="meta"))], torch.device("meta"), 4, "recv")
    assert [p for p, _ in ok] == [2]


# ------------------------------------------------------------------------------------------------------
# on GPUs
# ------------------------------------------------------------------------------------------------------
cuda_nccl = pytest.mark.skipif(not N.nccl_available(), reason="needs CuPy with NCCL and a CUDA device")


@pytest.mark.cuda
@cuda_nccl
def test_self_send_recv_round_trip_orders_with_kernels():
    from fltorrent_hpc.chunks import kernels as K
    from fltorrent_hpc.chunks.layout import Layout

    dev = torch.device("cuda", 0)
    with N.NcclTransport.from_store(dist.HashStore(), 0, 1, dev, timeout_s=60) as tr:
        ts = [torch.randn(1 << 20, device=dev), torch.randn(999, device=dev).bfloat16()]
        lay = Layout.from_tensors(ts)
        C = 1 << 18
        flat = K.pack_segments(ts, lay)
        runs = [flat[c * C : (c + 1) * C] for c in range(lay.n_chunks(C))]
        recv = [torch.empty_like(r) for r in runs]
        h = tr.stage([(0, r) for r in runs], [(0, r) for r in recv], round_id=1, stage_id=2)
        h.wait()  # the accumulate below queues behind the transfer, no host sync
        acc = torch.zeros(lay.numel, device=dev)
        K.accumulate_(acc, range(len(recv)), recv, 1.0, lay, C)
        h.synchronize(60)
        assert h.done()
        assert all(torch.equal(a, b) for a, b in zip(recv, runs))
        assert torch.equal(acc[: 1 << 20], ts[0])


def _two_rank_main(rank: int, path: str) -> None:
    store = dist.FileStore(path, 2)
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    with N.NcclTransport.from_store(store, rank, 2, dev, timeout_s=60) as tr:
        mine = torch.full((3 << 20,), rank + 1, dtype=torch.uint8, device=dev)
        theirs = torch.empty_like(mine)
        small = [torch.full((17,), 10 * rank + i, dtype=torch.uint8, device=dev) for i in range(3)]
        small_in = [torch.empty(17, dtype=torch.uint8, device=dev) for _ in range(3)]
        other = 1 - rank
        h = tr.stage([(other, mine), *[(other, s) for s in small]], [(other, theirs), *[(other, s) for s in small_in]])
        h.synchronize(60)
        assert torch.all(theirs == other + 1)
        assert [int(s[0]) for s in small_in] == [10 * other + i for i in range(3)]  # same-peer order kept


@pytest.mark.cuda
@pytest.mark.skipif(not N.nccl_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs, CuPy and NCCL")
def test_two_ranks_exchange_runs(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_main, args=(str(tmp_path / "store"),), nprocs=2, join=True)
