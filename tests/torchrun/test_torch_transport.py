"""The Transport contract on the torch-native (gloo) transport, under torchrun: the same checks as
tests/mpi/test_transport.py runs on MPI (transport_contract.py), plus what only this transport has to show.

    python -m torch.distributed.run --standalone --nproc_per_node=4 tests/torchrun/run_pytest.py \
        tests/torchrun/test_torch_transport.py            (tests/test_torchrun.py does this)
"""

from __future__ import annotations

import itertools
import time
from datetime import timedelta

import numpy as np
import pytest
import torch.distributed as dist
from dist_harness import gather
from transport_contract import CONTRACT, FAULTS, KINDS, Harness

from fltorrent_hpc.errors import PeerTimeoutError
from fltorrent_hpc.transport.base import wait_all
from fltorrent_hpc.transport.torch_p2p import TorchTransport, connect

pytestmark = pytest.mark.timeout(120)
_COUNT = itertools.count()


def _init() -> None:
    if not dist.is_initialized():
        dist.init_process_group("fltorrent", timeout=timedelta(seconds=60))


def new() -> TorchTransport:
    """A fresh root transport over the world (collective: its store keys are numbered in step on all ranks)."""
    _init()
    store = dist.distributed_c10d._get_default_store()
    return connect(store, dist.get_rank(), dist.get_world_size(), timeout_s=30.0, name=f"contract-{next(_COUNT)}")


def agree(flag: bool) -> bool:
    return all(gather(bool(flag)))


def barrier() -> None:
    gather(None)


@pytest.fixture(scope="module")
def h() -> Harness:
    _init()
    return Harness(dist.get_rank(), dist.get_world_size(), new, agree, barrier)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
def test_contract(h, check, kind):
    assert h.agree(check(h, kind))


@pytest.mark.parametrize("check", FAULTS, ids=lambda f: f.__name__)
def test_fault(h, check):
    if h.size < 2:
        pytest.skip("needs two ranks")
    assert h.agree(check(h))


def test_a_rank_that_never_comes_is_a_bounded_error(h):
    """connect() waits for every rank a bounded time and names the ones missing."""
    store = dist.distributed_c10d._get_default_store()
    name = f"absent-{next(_COUNT)}"
    ok = True
    if h.rank == 0:  # only rank 0 tries: the others never arrive
        t0 = time.monotonic()
        try:
            connect(store, 0, h.size, timeout_s=1.0, name=name)
            ok = h.size == 1
        except PeerTimeoutError as e:
            ok = f"{list(range(1, h.size))}" in str(e) and time.monotonic() - t0 < 10
    assert h.agree(ok)


def test_unexpected_large_message_waits_at_its_sender(h):
    """A large message nobody has asked for yet is not copied at the receiver: its send completes only once
    the receive is posted, and then the bytes land straight in the receive's buffer."""
    if h.size < 2:
        pytest.skip("needs two ranks")
    t = new()
    n = 1 << 20
    ok = True
    if h.rank == 0:
        s = t.post_send(np.full(n, 3, np.uint8), 1, 8)
        time.sleep(0.5)
        ok = not t.test([s])  # still at the sender: rank 1 has not asked
        h.barrier()
        wait_all(t, [s], 10.0, lambda p: "the large send")
    elif h.rank == 1:
        time.sleep(0.5)
        h.barrier()
        buf = np.zeros(n, np.uint8)
        wait_all(t, [t.post_recv(buf, 0, 8)], 10.0, lambda p: "the large receive")
        ok = bool(np.all(buf == 3))
    else:
        h.barrier()
    t.close()
    assert h.agree(ok)


def test_one_rank_runs_without_gloo():
    """A world of one (a plain `python`) needs no gloo group: messages to itself are delivered in process."""
    t = connect(dist.HashStore(), 0, 1, timeout_s=5.0, name="solo")
    buf = np.zeros(5, np.uint8)
    reqs = [t.post_recv(buf, 0, 1), t.post_send(np.arange(5, dtype=np.uint8), 0, 1)]
    wait_all(t, reqs, 5.0, lambda p: "self messages")
    assert buf.tolist() == [0, 1, 2, 3, 4] and t.local_size() == 1
    t.close()
