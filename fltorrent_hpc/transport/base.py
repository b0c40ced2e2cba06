"""The Transport seam: the only way the runtime reaches the network.

A Transport is one communication context (an MPI communicator, a NCCL communicator, a fault-injecting
wrapper around either): nonblocking point-to-point sends and receives of contiguous numpy buffers,
a completion test, cancellation, small int64 control frames of unknown length, and one all-gather.
`dup(name)` opens an independent context whose tags cannot match the parent's (data, control and
neighbour frames each get one).  Nothing a peer sends is ever unpickled: frames are int64 arrays.

Requests are opaque handles owned by the transport that made them.  `test(reqs)` reports each request
once, when it completes; a request reported complete (or cancelled) must not be tested again.

The bounded waits below are written once over that interface, so every transport gets the same
deadline behaviour: each poll loop checks a monotonic deadline and raises `PeerTimeoutError` naming what
was outstanding; idle polls first yield the core (ranks may share cores, and MPI moves bytes only while
some rank polls), then back off to at most 1 ms.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import PeerTimeoutError, TransportError, UnsupportedError

MAGIC = 0x464C5452  # "FLTR": first word of every control frame
POLL_S = 20e-6
SPIN = int(os.environ.get("FLTORRENT_POLL_SPIN", "200"))  # idle polls with only a yield between them

ANY_SOURCE = -1  # post_recv_status from whichever rank sends first (MPI_ANY_SOURCE)
TAG_DATA = 22  # data tags: TAG_DATA + (round % 2) * 16000 + stage % 16000, all below 32767
Request = Any  # an opaque handle of the transport that made it
GRAVEYARD: list = []  # (transport, request, buffers...) of collectives abandoned on a timeout


def data_tag(round_id: int, stage: int) -> int:
    """Per-stage data tag: a late message of a cancelled receive cannot match a later stage's."""
    return TAG_DATA + (round_id % 2) * 16000 + stage % 16000


def stage_of_data_tag(tag: int) -> int:
    """The stage (mod 16000) a data tag was made for."""
    return (tag - TAG_DATA) % 16000


class Truncated(str):
    """A `failed` reason saying the message was longer than its receive (MPI_ERR_TRUNCATE), so a caller can
    classify the failure by type (the torch API's recv raises TruncationError) instead of by its text."""


class Transport(ABC):
    """One communication context between `size` ranks; this process is `rank`."""

    rank: int
    size: int
    name: str = "world"

    @abstractmethod
    def dup(self, name: str) -> Transport:
        """An independent context over the same ranks (collective: every rank calls it, in the same order)."""

    @abstractmethod
    def post_send(self, buf: np.ndarray, dest: int, tag: int) -> Request:
        """Start sending the bytes of contiguous `buf` to `dest`; `buf` must stay untouched until complete."""

    @abstractmethod
    def post_recv(self, buf: np.ndarray, source: int, tag: int) -> Request:
        """Start receiving into contiguous `buf` from `source`; a longer message is an error, never a write
        past `buf`."""

    @abstractmethod
    def test(self, reqs: Sequence[Request]) -> list[int]:
        """Indices of `reqs` that completed since they were last tested (each completion reported once)."""

    @abstractmethod
    def cancel(self, reqs: Sequence[Request]) -> None:
        """Cancel the unfinished requests among `reqs` and complete them: their buffers may then be reused."""

    @abstractmethod
    def poll_frame(self, source: int, tag: int) -> np.ndarray | None:
        """The next int64 control frame from `source` with `tag` if one has arrived, else None."""

    @abstractmethod
    def post_allgather(self, send: np.ndarray, recv: np.ndarray) -> Request:
        """Start gathering every rank's `send` bytes into `recv` ([size, ...], rank order)."""

    def flush(self) -> None:  # noqa: B027 - optional: host transports start each operation when posted
        """Start the operations posted so far.  A device transport (transport/nccl.NcclDataTransport) queues a
        stage's sends and receives and launches them as one group here, so that no rank's receive waits on a
        send queued behind it; the engine calls it once a stage's operations are all posted."""

    def failed(self, req: Request) -> str | None:
        """Why a request that `test` reported complete failed (e.g. a message longer than its receive buffer),
        or None when it succeeded.  Asked once per request."""
        return None

    def post_recv_status(self, buf: np.ndarray, source: int, tag: int) -> Request:
        """A `post_recv` whose sender and length `recv_status` reports once it completed; `source` may be
        ANY_SOURCE.  For receives whose sender or length the caller does not know (the torch API's recv and
        recv_anysource); the runtime never needs it.  Optional."""
        raise UnsupportedError(f"{type(self).__name__} cannot report the source and length of a receive")

    def recv_status(self, req: Request) -> tuple[int, int]:
        """(source, nbytes received) of a `post_recv_status` request that completed without failing."""
        raise UnsupportedError(f"{type(self).__name__} cannot report the source and length of a receive")

    def abandon(self, reqs: Sequence[Request]) -> None:  # noqa: B027 - optional
        """Ask the transport to cancel unfinished requests without waiting (sends to a peer gone for good);
        they stay pending until `test` reports them, so their buffers must stay referenced until then."""

    def local_size(self) -> int:
        """Ranks of this context on this node (they share its cores)."""
        return 1

    def close(self) -> None:  # noqa: B027 - optional for transports holding nothing
        """Release the context; no request of it may be pending."""


# ------------------------------------------------------------------------------------------ bounded waits
def pause(idle: int) -> None:
    """Between two polls that found nothing (`idle` in a row): yield, then back off to at most 1 ms."""
    if idle <= SPIN:
        time.sleep(0)
    else:
        time.sleep(min(1e-3, 1e-5 * 2 ** min(idle - SPIN, 7)))


def wait_until(
    t: Transport,
    reqs: Sequence[Request],
    deadline: float,
    done: np.ndarray | None = None,
    on_done: Callable[[list[int]], None] | None = None,
) -> np.ndarray:
    """Wait for requests until `deadline` (monotonic); return which completed (`done`: already known ones).

    `on_done(indices)` runs as requests complete, so work on what arrived overlaps what is still moving.
    """
    reqs = list(reqs)
    done = np.zeros(len(reqs), dtype=bool) if done is None else done
    if not reqs or done.all():
        return done
    live = np.flatnonzero(~done)
    idle = 0
    while True:
        got = t.test([reqs[i] for i in live])
        if got:
            idx = live[got].tolist()
            done[idx] = True
            live = np.flatnonzero(~done)
            if on_done is not None:
                on_done(idx)
        if not live.size or time.monotonic() > deadline:
            break
        idle = 0 if got else idle + 1
        if idle:
            pause(idle)
    return done


def wait_all(t: Transport, reqs: Sequence[Request], timeout: float, describe: Callable[[list[int]], str]) -> None:
    """Wait for every request, or raise PeerTimeoutError with `describe(pending indices)`."""
    done = wait_until(t, reqs, time.monotonic() + timeout)
    if not done.all():
        pending = np.flatnonzero(~done).tolist()
        raise PeerTimeoutError(f"timed out after {timeout:.1f}s waiting for {describe(pending)}")
    why = [w for w in (t.failed(r) for r in reqs) if w]
    if why:
        raise TransportError(f"{why[0]} ({describe([])})")


def recv_frame(t: Transport, source: int, tag: int, timeout: float, what: str) -> np.ndarray:
    """One int64 control frame from `source`, bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    idle = 0
    while True:
        msg = t.poll_frame(source, tag)
        if msg is not None:
            return msg
        if time.monotonic() > deadline:
            raise PeerTimeoutError(f"timed out after {timeout:.1f}s waiting for {what} from rank {source}")
        idle += 1
        pause(idle)


def send_frame(t: Transport, frame: np.ndarray, dest: int, tag: int, timeout: float, what: str) -> None:
    """Send one int64 control frame and wait (bounded) until its buffer is free again."""
    frame = np.ascontiguousarray(frame, dtype=np.int64)
    wait_all(t, [t.post_send(frame, dest, tag)], timeout, lambda _: f"{what} to rank {dest}")


def allgather(t: Transport, arr: np.ndarray, timeout: float, what: str) -> np.ndarray:
    """Every rank's `arr` (same shape and dtype everywhere) stacked in rank order, bounded by `timeout`."""
    arr = np.ascontiguousarray(arr)
    out = np.empty((t.size,) + arr.shape, dtype=arr.dtype)
    req = t.post_allgather(arr, out)
    try:
        wait_all(t, [req], timeout, lambda _: f"{what} (allgather over {t.size} ranks)")
    except PeerTimeoutError:
        # a collective cannot be cancelled: MPI may still write `out` when a late rank arrives, so the
        # buffers stay referenced for the life of the process, never handed back to numpy
        GRAVEYARD.append((t, req, arr, out))
        raise
    return out


class Pacer:
    """Token bucket at `rate` bytes/s (0 = unpaced): emulates a link on one machine at a scaled-down rate.

    Store-and-forward: a message is handed to the transport when its last byte would have left the
    emulated link, so it cannot arrive before start + nbytes/rate, and the next message queues behind it.
    """

    def __init__(self, rate: float):
        self.rate = float(rate)
        self.free = time.monotonic()  # when the emulated link is next idle

    def delay(self, nbytes: int) -> float:
        """Seconds to wait before posting a message of `nbytes`; books the link for it."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.free = max(self.free, now) + nbytes / self.rate
        return self.free - now


def post_paced(
    t: Transport,
    posts: list[tuple[Callable[[], Request], int]],
    pacer: Pacer,
    reqs: list,
    progress: Sequence[Request] = (),
    progress_done: np.ndarray | None = None,
) -> None:
    """Run post callables in order, each when the pacer lets its bytes go.

    Meanwhile `progress` requests keep moving; those that complete are marked in `progress_done` (a request
    reported here is not reported again, so the caller must learn of it from that mask).
    """
    progress = list(progress)
    for post, nbytes in posts:
        wait = pacer.delay(nbytes)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if progress and progress_done is not None:
                live = np.flatnonzero(~progress_done)
                if live.size:
                    got = t.test([progress[i] for i in live])
                    if got:
                        progress_done[live[got]] = True
            time.sleep(min(POLL_S * 50, max(0.0, end - time.monotonic())))
        reqs.append(post())
