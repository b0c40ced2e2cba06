"""The Transport contract, written once over a `Harness`, so every transport runs the same checks.

tests/mpi/test_transport.py runs it on MPITransport under mpiexec; tests/torchrun/test_torch_transport.py runs it
on the torch-native (gloo) transport under torchrun.  Each check builds its transports with `h.make(kind)`
("plain": the transport itself; "faulty": a FaultyTransport around it with nothing to inject), returns this
rank's verdict, and the caller asserts only after every rank agreed (`h.agree`), so no rank hangs.  The fault
checks wrap rank 0's transport and look at what rank 1 receives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fltorrent_hpc.errors import PeerTimeoutError, ProtocolError, TransportError
from fltorrent_hpc.transport.base import MAGIC, Transport, Truncated, allgather, data_tag, recv_frame, wait_all
from fltorrent_hpc.transport.base import wait_until as _wait_until
from fltorrent_hpc.transport.faulty import Fault, FaultyTransport


@dataclass
class Harness:
    """What the checks need from a launcher: this rank, a fresh transport (collective), agreement, a barrier."""

    rank: int
    size: int
    new: Callable[[], Transport]  # a fresh root transport over every rank (called by all ranks in step)
    agree: Callable[[bool], bool]  # True only if every rank's flag is True
    barrier: Callable[[], None]

    @property
    def right(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def left(self) -> int:
        return (self.rank - 1) % self.size

    def make(self, kind: str) -> Transport:
        net = self.new()
        return FaultyTransport(net) if kind == "faulty" else net


KINDS = ["plain", "faulty"]


def messages_between_a_pair_arrive_in_order(h: Harness, kind: str) -> bool:
    t = h.make(kind)
    sends = [np.full(64, h.rank * 10 + i, dtype=np.uint8) for i in range(3)]
    bufs = [np.zeros(64, dtype=np.uint8) for _ in range(3)]
    reqs = [t.post_recv(b, h.left, 5) for b in bufs] + [t.post_send(s, h.right, 5) for s in sends]
    wait_all(t, reqs, 10.0, lambda p: f"pending {p}")
    ok = all(np.all(b == h.left * 10 + i) for i, b in enumerate(bufs))
    t.close()
    return ok


def messages_of_different_lengths_share_a_tag(h: Harness, kind: str) -> bool:
    """One tag carries a short, a long (rendezvous-sized) and an empty message, in order, each into its own
    receive, also when the sender posts before the receiver (the messages wait for their receives)."""
    t = h.make(kind)
    sizes = [3, 200_000, 0, 17]
    sends = [np.full(n, (h.rank + i) % 251, dtype=np.uint8) for i, n in enumerate(sizes)]
    sreqs = [t.post_send(s, h.right, 21) for s in sends]
    h.barrier()  # every message is announced before any receive is posted
    bufs = [np.zeros(n, dtype=np.uint8) for n in sizes]
    rreqs = [t.post_recv(b, h.left, 21) for b in bufs]
    wait_all(t, rreqs + sreqs, 20.0, lambda p: f"pending {p}")
    ok = all(np.all(b == (h.left + i) % 251) for i, b in enumerate(bufs))
    t.close()
    return ok


def waits_are_bounded_and_name_what_was_outstanding(h: Harness, kind: str) -> bool:
    t = h.make(kind)
    buf = np.zeros(8, dtype=np.uint8)
    req = t.post_recv(buf, h.left, 7)  # nobody sends on tag 7
    t0 = time.monotonic()
    try:
        wait_all(t, [req], 0.3, lambda p: f"the tag-7 receive {p}")
        ok = False
    except PeerTimeoutError as e:
        ok = "tag-7 receive [0]" in str(e) and time.monotonic() - t0 < 2.0
    t.cancel([req])
    ok &= not t.test([req])  # a cancelled request is complete and never reported as arrived
    t.close()
    return ok


def a_cancelled_receive_frees_its_buffer(h: Harness, kind: str) -> bool:
    t = h.make(kind)
    old = np.zeros(16, dtype=np.uint8)
    req = t.post_recv(old, h.left, 9)
    t.cancel([req])
    h.barrier()  # every receive on tag 9 is cancelled before anybody sends on it
    new = np.zeros(16, dtype=np.uint8)
    reqs = [t.post_recv(new, h.left, 9), t.post_send(np.full(16, 1 + h.rank, np.uint8), h.right, 9)]
    wait_all(t, reqs, 10.0, lambda p: f"pending {p}")
    ok = np.all(old == 0) and np.all(new == 1 + h.left)
    t.close()
    return ok


def each_completion_is_reported_once(h: Harness, kind: str) -> bool:
    t = h.make(kind)
    buf = np.zeros(4, dtype=np.uint8)
    reqs = [t.post_recv(buf, h.left, 11), t.post_send(np.ones(4, np.uint8), h.right, 11)]
    seen: list[int] = []
    done = _wait_until(t, reqs, time.monotonic() + 10.0, on_done=seen.extend)
    ok = done.all() and sorted(seen) == [0, 1] and not t.test(reqs)
    t.close()
    return ok


def frames_polls_and_lengths(h: Harness, kind: str) -> bool:
    t = h.make(kind)
    ok = t.poll_frame(h.left, 13) is None  # nothing sent yet
    h.barrier()
    frame = np.array([MAGIC, 0, 3, 1, h.rank], dtype=np.int64)
    s = t.post_send(frame, h.right, 13)
    got = recv_frame(t, h.left, 13, 10.0, "a frame")
    wait_all(t, [s], 10.0, lambda p: "frame send")
    ok &= got.dtype == np.int64 and got.tolist() == [MAGIC, 0, 3, 1, h.left]
    # a message that is not whole int64 words is a protocol error, and it is consumed, not left behind
    s = t.post_send(np.zeros(12, dtype=np.uint8), h.right, 15)
    try:
        recv_frame(t, h.left, 15, 10.0, "a ragged frame")
        ok = False
    except ProtocolError as e:
        ok &= "12-byte frame" in str(e)
    wait_all(t, [s], 10.0, lambda p: "ragged send")
    ok &= t.poll_frame(h.left, 15) is None
    # a frame larger than any eager limit still arrives whole
    big = np.arange(40_000, dtype=np.int64) * (h.rank + 1)
    s = t.post_send(big, h.right, 16)
    got = recv_frame(t, h.left, 16, 20.0, "a large frame")
    wait_all(t, [s], 10.0, lambda p: "large frame send")
    ok &= np.array_equal(got, np.arange(40_000, dtype=np.int64) * (h.left + 1))
    t.close()
    return ok


def a_longer_message_is_an_error_not_an_overrun(h: Harness, kind: str) -> bool:
    t = h.make(kind)
    guard = np.zeros(32, dtype=np.uint8)
    buf = guard[:8]  # the receive may write 8 bytes; the 24 after them must stay zero
    reqs = [t.post_recv(buf, h.left, 17), t.post_send(np.full(32, 7, np.uint8), h.right, 17)]
    done = _wait_until(t, reqs, time.monotonic() + 10.0)
    ok = bool(done[0]) and isinstance(t.failed(reqs[0]), Truncated)  # typed: the torch API raises TruncationError
    ok &= np.all(guard[8:] == 0)
    # the pair's next message on the same tag still arrives intact (the long one was consumed)
    nxt = np.zeros(4, dtype=np.uint8)
    more = [t.post_recv(nxt, h.left, 17), t.post_send(np.full(4, 9, np.uint8), h.right, 17)]
    wait_all(t, more, 10.0, lambda p: f"after the long message {p}")
    ok &= np.all(nxt == 9)
    t.close()
    return ok


def receive_status_names_source_and_length(h: Harness, kind: str) -> bool:
    from fltorrent_hpc.transport.base import ANY_SOURCE

    t = h.make(kind)
    buf = np.zeros(64, dtype=np.uint8)
    n = 10 + h.left  # shorter than the buffer: the status says how much came
    reqs = [t.post_recv_status(buf, ANY_SOURCE, 23), t.post_send(np.full(10 + h.rank, 5, np.uint8), h.right, 23)]
    wait_all(t, reqs, 10.0, lambda p: f"pending {p}")
    ok = t.recv_status(reqs[0]) == (h.left, n) and np.all(buf[:n] == 5) and np.all(buf[n:] == 0)
    t.close()
    return ok


def contexts_are_independent_and_allgather_orders_by_rank(h: Harness, kind: str) -> bool:
    t = h.make(kind)
    d = t.dup("data")
    a, b = np.zeros(4, np.uint8), np.zeros(4, np.uint8)
    reqs = [t.post_recv(a, h.left, 19), d.post_recv(b, h.left, 19)]
    reqs += [d.post_send(np.full(4, 2, np.uint8), h.right, 19), t.post_send(np.full(4, 1, np.uint8), h.right, 19)]
    wait_all(t, [reqs[0], reqs[3]], 10.0, lambda p: "parent context")
    wait_all(d, [reqs[1], reqs[2]], 10.0, lambda p: "dup context")
    ok = np.all(a == 1) and np.all(b == 2)
    g = allgather(d, np.array([h.rank, h.rank * h.rank], dtype=np.int64), 10.0, "ranks")
    ok &= g.tolist() == [[r, r * r] for r in range(h.size)]
    g = allgather(d, np.array([h.rank + 100], dtype=np.int64), 10.0, "ranks again")  # a second one matches too
    ok &= g.ravel().tolist() == [r + 100 for r in range(h.size)]
    d.close()
    t.close()
    try:
        t.post_send(a, h.right, 19)
        ok = False
    except TransportError as e:
        ok &= "closed" in str(e)
    return ok


CONTRACT = [
    messages_between_a_pair_arrive_in_order,
    messages_of_different_lengths_share_a_tag,
    waits_are_bounded_and_name_what_was_outstanding,
    a_cancelled_receive_frees_its_buffer,
    each_completion_is_reported_once,
    frames_polls_and_lengths,
    a_longer_message_is_an_error_not_an_overrun,
    receive_status_names_source_and_length,
    contexts_are_independent_and_allgather_orders_by_rank,
]


# ------------------------------------------------------------------------------------------- faults
def _one_message(h: Harness, fault: Fault | None, nbytes: int = 4096, timeout: float = 5.0, tag: int | None = None):
    """Rank 0 sends one data message to rank 1 through a FaultyTransport holding `fault`; rank 1 returns
    (received bytes or None, seconds waited, extra message or None)."""
    base = h.new()
    t = FaultyTransport(base, [fault] if fault else []) if h.rank == 0 else base
    d = t.dup("data")
    tag = data_tag(0, 2) if tag is None else tag
    out = (None, 0.0, None)
    payload = np.arange(nbytes, dtype=np.int64).astype(np.uint8)
    h.barrier()
    if h.rank == 0:
        s = d.post_send(payload, 1, tag)
        wait_all(d, [s], 10.0, lambda p: "fault send")
    elif h.rank == 1:
        buf = np.zeros(nbytes, np.uint8)
        req = d.post_recv(buf, 0, tag)
        t0 = time.monotonic()
        got = _wait_until(d, [req], t0 + timeout)
        if not got[0]:
            d.cancel([req])
        extra = np.zeros(nbytes, np.uint8)
        req2 = d.post_recv(extra, 0, tag)
        more = _wait_until(d, [req2], time.monotonic() + 0.5)
        if not more[0]:
            d.cancel([req2])
        out = (buf if got[0] else None, time.monotonic() - t0, extra if more[0] else None)
    h.barrier()
    injected = dict(t.injected) if isinstance(t, FaultyTransport) else {}
    d.close()
    base.close()
    return out, payload, injected


def fault_drop_and_silent_never_deliver(h: Harness) -> bool:
    ok = True
    for action in ("drop", "silent"):
        (got, _, extra), _, inj = _one_message(h, Fault(action, channel="data"), timeout=0.5)
        ok &= got is None and extra is None if h.rank == 1 else True
        ok &= inj.get(action) == 1 if h.rank == 0 else True
    return ok


def fault_delay_holds_a_message_back(h: Harness) -> bool:
    (got, waited, _), payload, inj = _one_message(h, Fault("delay", channel="data", delay_s=0.4))
    ok = (got is not None and np.array_equal(got, payload) and waited >= 0.35) if h.rank == 1 else True
    ok &= inj.get("delay") == 1 if h.rank == 0 else True
    return ok


def fault_duplicate_sends_twice(h: Harness) -> bool:
    (got, _, extra), payload, _ = _one_message(h, Fault("duplicate", channel="data"))
    return (np.array_equal(got, payload) and np.array_equal(extra, payload)) if h.rank == 1 else True


def fault_corrupt_flips_a_byte_per_stride_and_keeps_the_senders_copy(h: Harness) -> bool:
    (got, _, _), payload, _ = _one_message(h, Fault("corrupt", channel="data", stride=1024))
    if h.rank != 1:
        return True
    return got is not None and np.flatnonzero(got != payload).tolist() == [0, 1024, 2048, 3072]


def fault_window_picks_the_stage_and_the_channel(h: Harness) -> bool:
    # a fault for stage 5 leaves a stage-2 data message alone; one for the ctrl context leaves data alone
    ok = True
    for f in (Fault("drop", channel="data", from_stage=5), Fault("drop", channel="ctrl")):
        (got, _, _), payload, inj = _one_message(h, f)
        ok &= np.array_equal(got, payload) if h.rank == 1 else True
        ok &= not inj if h.rank == 0 else True
    return ok


def fault_code_picks_one_kind_of_control_frame(h: Harness) -> bool:
    """A fault with a `code` drops only control frames of that kind (here neighbour code 0, the bitfield);
    the next frame, of another code, goes through."""
    base = h.new()
    t = FaultyTransport(base, [Fault("drop", channel="nbr", code=0)]) if h.rank == 0 else base
    d = t.dup("nbr")
    ok = True
    frames = [np.array([MAGIC, 0, 3, code, 40 + code], dtype=np.int64) for code in (0, 1)]
    h.barrier()
    if h.rank == 0:
        for f in frames:
            wait_all(d, [d.post_send(f, 1, 31)], 10.0, lambda p: "frame send")
        ok = t.injected == {"drop": 1}
    elif h.rank == 1:
        got = recv_frame(d, 0, 31, 10.0, "the frame that was not dropped")
        ok = got.tolist() == frames[1].tolist()
        time.sleep(0.2)
        ok &= d.poll_frame(0, 31) is None
    h.barrier()
    d.close()
    base.close()
    return ok


FAULTS = [
    fault_code_picks_one_kind_of_control_frame,
    fault_drop_and_silent_never_deliver,
    fault_delay_holds_a_message_back,
    fault_duplicate_sends_twice,
    fault_corrupt_flips_a_byte_per_stride_and_keeps_the_senders_copy,
    fault_window_picks_the_stage_and_the_channel,
]
