"""The Transport contract, on real MPI ranks: the MPI transport and the fault-injecting wrapper (with no
fault to inject) must behave alike; then each fault the wrapper injects, seen from the receiving side.

.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_transport.py   (any world size)
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from mpi4py import MPI

from fltorrent_hpc.errors import PeerTimeoutError, ProtocolError, TransportError
from fltorrent_hpc.transport.base import MAGIC, allgather, data_tag, recv_frame, wait_all, wait_until
from fltorrent_hpc.transport.faulty import Fault, FaultyTransport
from fltorrent_hpc.transport.mpi import MPITransport

pytestmark = [pytest.mark.mpi(min_size=1), pytest.mark.timeout(60)]

COMM = MPI.COMM_WORLD
R, N = COMM.Get_rank(), COMM.Get_size()
RIGHT, LEFT = (R + 1) % N, (R - 1) % N


def agree(flag: bool) -> bool:
    """True only if every rank's flag is True (assert after all ranks agree, so no rank hangs)."""
    v = np.array([1 if flag else 0], dtype=np.int32)
    out = np.empty(1, dtype=np.int32)
    COMM.Allreduce(v, out, op=MPI.MIN)
    return bool(out[0])


def make(kind: str):
    net = MPITransport(COMM)
    return FaultyTransport(net) if kind == "faulty" else net


KINDS = ["mpi", "faulty"]


@pytest.mark.parametrize("kind", KINDS)
def test_messages_between_a_pair_arrive_in_order(kind):
    t = make(kind)
    sends = [np.full(64, R * 10 + i, dtype=np.uint8) for i in range(3)]
    bufs = [np.zeros(64, dtype=np.uint8) for _ in range(3)]
    reqs = [t.post_recv(b, LEFT, 5) for b in bufs] + [t.post_send(s, RIGHT, 5) for s in sends]
    wait_all(t, reqs, 10.0, lambda p: f"pending {p}")
    ok = all(np.all(b == LEFT * 10 + i) for i, b in enumerate(bufs))
    t.close()
    assert agree(ok)


@pytest.mark.parametrize("kind", KINDS)
def test_waits_are_bounded_and_name_what_was_outstanding(kind):
    t = make(kind)
    buf = np.zeros(8, dtype=np.uint8)
    req = t.post_recv(buf, LEFT, 7)  # nobody sends on tag 7
    t0 = time.monotonic()
    try:
        wait_all(t, [req], 0.3, lambda p: f"the tag-7 receive {p}")
        ok = False
    except PeerTimeoutError as e:
        ok = "tag-7 receive [0]" in str(e) and time.monotonic() - t0 < 2.0
    t.cancel([req])
    ok &= not t.test([req])  # a cancelled request is complete and never reported as arrived
    t.close()
    assert agree(ok)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cancelled_receive_frees_its_buffer(kind):
    t = make(kind)
    old = np.zeros(16, dtype=np.uint8)
    req = t.post_recv(old, LEFT, 9)
    t.cancel([req])
    COMM.Barrier()  # every receive on tag 9 is cancelled before anybody sends on it
    new = np.zeros(16, dtype=np.uint8)
    reqs = [t.post_recv(new, LEFT, 9), t.post_send(np.full(16, 1 + R, np.uint8), RIGHT, 9)]
    wait_all(t, reqs, 10.0, lambda p: f"pending {p}")
    ok = np.all(old == 0) and np.all(new == 1 + LEFT)
    t.close()
    assert agree(ok)


@pytest.mark.parametrize("kind", KINDS)
def test_each_completion_is_reported_once(kind):
    t = make(kind)
    buf = np.zeros(4, dtype=np.uint8)
    reqs = [t.post_recv(buf, LEFT, 11), t.post_send(np.ones(4, np.uint8), RIGHT, 11)]
    seen: list[int] = []
    done = wait_until(t, reqs, time.monotonic() + 10.0, on_done=seen.extend)
    ok = done.all() and sorted(seen) == [0, 1]
    t.close()
    assert agree(ok)


@pytest.mark.parametrize("kind", KINDS)
def test_frames_polls_and_lengths(kind):
    t = make(kind)
    ok = t.poll_frame(LEFT, 13) is None  # nothing sent yet
    COMM.Barrier()
    frame = np.array([MAGIC, 0, 3, 1, R], dtype=np.int64)
    s = t.post_send(frame, RIGHT, 13)
    got = recv_frame(t, LEFT, 13, 10.0, "a frame")
    wait_all(t, [s], 10.0, lambda p: "frame send")
    ok &= got.dtype == np.int64 and got.tolist() == [MAGIC, 0, 3, 1, LEFT]
    # a message that is not whole int64 words is a protocol error, and it is consumed, not left behind
    s = t.post_send(np.zeros(12, dtype=np.uint8), RIGHT, 15)
    try:
        recv_frame(t, LEFT, 15, 10.0, "a ragged frame")
        ok = False
    except ProtocolError as e:
        ok &= "12-byte frame" in str(e)
    wait_all(t, [s], 10.0, lambda p: "ragged send")
    ok &= t.poll_frame(LEFT, 15) is None
    t.close()
    assert agree(ok)


@pytest.mark.parametrize("kind", KINDS)
def test_a_longer_message_is_an_error_not_an_overrun(kind):
    t = make(kind)
    guard = np.zeros(32, dtype=np.uint8)
    buf = guard[:8]  # the receive may write 8 bytes; the 24 after them must stay zero
    reqs = [t.post_recv(buf, LEFT, 17), t.post_send(np.full(32, 7, np.uint8), RIGHT, 17)]
    try:
        wait_all(t, reqs, 10.0, lambda p: f"pending {p}")
        ok = False
    except TransportError as e:
        ok = "MPI failed a request" in str(e)
    wait_until(t, reqs[1:], time.monotonic() + 5.0)
    ok &= np.all(guard[8:] == 0)
    t.close()
    assert agree(ok)


@pytest.mark.parametrize("kind", KINDS)
def test_contexts_are_independent_and_allgather_orders_by_rank(kind):
    t = make(kind)
    d = t.dup("data")
    a, b = np.zeros(4, np.uint8), np.zeros(4, np.uint8)
    reqs = [t.post_recv(a, LEFT, 19), d.post_recv(b, LEFT, 19)]
    reqs += [d.post_send(np.full(4, 2, np.uint8), RIGHT, 19), t.post_send(np.full(4, 1, np.uint8), RIGHT, 19)]
    wait_all(t, [reqs[0], reqs[3]], 10.0, lambda p: "parent context")
    wait_all(d, [reqs[1], reqs[2]], 10.0, lambda p: "dup context")
    ok = np.all(a == 1) and np.all(b == 2)
    g = allgather(d, np.array([R, R * R], dtype=np.int64), 10.0, "ranks")
    ok &= g.tolist() == [[r, r * r] for r in range(N)]
    d.close()
    t.close()
    try:
        t.post_send(a, RIGHT, 19)
        ok = False
    except TransportError as e:
        ok &= "closed" in str(e)
    assert agree(ok)


# ------------------------------------------------------------------------------------------- faults
def _one_message(fault: Fault | None, nbytes: int = 4096, timeout: float = 5.0, tag: int | None = None):
    """Rank 0 sends one data message to rank 1 through a FaultyTransport holding `fault`; rank 1 returns
    (received bytes or None, seconds waited, extra message or None)."""
    base = MPITransport(COMM)
    t = FaultyTransport(base, [fault] if fault else []) if R == 0 else base
    d = t.dup("data")
    tag = data_tag(0, 2) if tag is None else tag
    out = (None, 0.0, None)
    payload = np.arange(nbytes, dtype=np.int64).astype(np.uint8)
    COMM.Barrier()
    if R == 0:
        s = d.post_send(payload, 1, tag)
        wait_all(d, [s], 10.0, lambda p: "fault send")
    elif R == 1:
        buf = np.zeros(nbytes, np.uint8)
        req = d.post_recv(buf, 0, tag)
        t0 = time.monotonic()
        got = wait_until(d, [req], t0 + timeout)
        if not got[0]:
            d.cancel([req])
        extra = np.zeros(nbytes, np.uint8)
        req2 = d.post_recv(extra, 0, tag)
        more = wait_until(d, [req2], time.monotonic() + 0.5)
        if not more[0]:
            d.cancel([req2])
        out = (buf if got[0] else None, time.monotonic() - t0, extra if more[0] else None)
    COMM.Barrier()
    injected = dict(t.injected) if isinstance(t, FaultyTransport) else {}
    d.close()
    base.close()
    return out, payload, injected


@pytest.mark.mpi(min_size=2)
def test_fault_drop_and_silent_never_deliver():
    ok = True
    for action in ("drop", "silent"):
        (got, _, extra), _, inj = _one_message(Fault(action, channel="data"), timeout=0.5)
        ok &= got is None and extra is None if R == 1 else True
        ok &= inj.get(action) == 1 if R == 0 else True
    assert agree(ok)


@pytest.mark.mpi(min_size=2)
def test_fault_delay_holds_a_message_back():
    (got, waited, _), payload, inj = _one_message(Fault("delay", channel="data", delay_s=0.4))
    ok = (got is not None and np.array_equal(got, payload) and waited >= 0.35) if R == 1 else True
    ok &= inj.get("delay") == 1 if R == 0 else True
    assert agree(ok)


@pytest.mark.mpi(min_size=2)
def test_fault_duplicate_sends_twice():
    (got, _, extra), payload, _ = _one_message(Fault("duplicate", channel="data"))
    ok = (np.array_equal(got, payload) and np.array_equal(extra, payload)) if R == 1 else True
    assert agree(ok)


@pytest.mark.mpi(min_size=2)
def test_fault_corrupt_flips_a_byte_per_stride_and_keeps_the_senders_copy():
    (got, _, _), payload, _ = _one_message(Fault("corrupt", channel="data", stride=1024))
    ok = True
    if R == 1:
        diff = np.flatnonzero(got != payload)
        ok = diff.tolist() == [0, 1024, 2048, 3072]
    assert agree(ok)


@pytest.mark.mpi(min_size=2)
def test_fault_window_picks_the_stage_and_the_channel():
    # a fault for stage 5 leaves a stage-2 data message alone; one for the ctrl context leaves data alone
    for f in (Fault("drop", channel="data", from_stage=5), Fault("drop", channel="ctrl")):
        (got, _, _), payload, inj = _one_message(f)
        ok = np.array_equal(got, payload) if R == 1 else True
        ok &= not inj if R == 0 else True
        assert agree(ok)


@pytest.mark.mpi(min_size=2)
def test_fault_code_picks_one_kind_of_control_frame():
    """A fault with a `code` drops only control frames of that kind (here neighbour code 0, the bitfield);
    the next frame, of another code, goes through."""
    base = MPITransport(COMM)
    t = FaultyTransport(base, [Fault("drop", channel="nbr", code=0)]) if R == 0 else base
    d = t.dup("nbr")
    ok = True
    frames = [np.array([MAGIC, 0, 3, code, 40 + code], dtype=np.int64) for code in (0, 1)]
    COMM.Barrier()
    if R == 0:
        for f in frames:
            wait_all(d, [d.post_send(f, 1, 31)], 10.0, lambda p: "frame send")
        ok = t.injected == {"drop": 1}
    elif R == 1:
        got = recv_frame(d, 0, 31, 10.0, "the frame that was not dropped")
        ok = got.tolist() == frames[1].tolist()
        time.sleep(0.2)
        ok &= d.poll_frame(0, 31) is None
    COMM.Barrier()
    d.close()
    base.close()
    assert agree(ok)
