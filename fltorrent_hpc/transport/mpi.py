"""mpi4py transport pieces: bounded waits, link pacing, control framing, and baseline collectives.

Only upper-case (buffer) mpi4py calls touch peer data; nothing a peer sends is ever unpickled.
Every wait polls with Test* against a deadline and raises `PeerTimeoutError` naming what was outstanding,
so a silent peer turns into an error or an exclusion, never a hang.  MPICH progresses nonblocking
transfers only while some thread is inside MPI, so the polls also drive progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import LaunchError, PeerTimeoutError, ProtocolError

MAGIC = 0x464C5452  # "FLTR"
TAG_DIRECTIVE, TAG_REPORT, TAG_END, TAG_META = 11, 12, 13, 14
TAG_DATA, TAG_RING = 21, 22
POLL_S = 20e-6
SPIN = int(os.environ.get("FLTORRENT_POLL_SPIN", "200"))  # idle polls with only a yield between them


def pause(idle: int) -> None:
    """Between two MPI polls that found nothing (`idle` in a row): yield the core first (ranks may share
    cores, and MPI moves bytes only while some rank polls), then back off to at most 1 ms."""
    if idle <= SPIN:
        time.sleep(0)
    else:
        time.sleep(min(1e-3, 1e-5 * 2 ** min(idle - SPIN, 7)))


def mpi():
    """The mpi4py MPI module, with a clear error when mpi4py or an MPI library is missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the install
        raise LaunchError("fltorrent needs mpi4py and an MPI library: pip install mpi4py mpich") from e
    return MPI


def cuda_aware() -> bool:
    """Whether the MPI library can take CUDA device buffers (MPIX_Query_cuda_support where exposed)."""
    MPI = mpi()
    q = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(q()) if q else False
    except Exception:  # noqa: BLE001 - an MPI without the query is not CUDA-aware for us
        return False


def wait_all(reqs: Sequence, timeout: float, describe: Callable[[list[int]], str]) -> None:
    """Wait for every request, or raise PeerTimeoutError with `describe(pending indices)`."""
    MPI = mpi()
    reqs = list(reqs)
    if not reqs:
        return
    deadline = time.monotonic() + timeout
    idle = 0
    while not MPI.Request.Testall(reqs):
        if time.monotonic() > deadline:
            pending = [i for i, r in enumerate(reqs) if not r.Test()]
            raise PeerTimeoutError(f"timed out after {timeout:.1f}s waiting for {describe(pending)}")
        idle += 1
        pause(idle)


def wait_until(
    reqs: Sequence,
    deadline: float,
    done: np.ndarray | None = None,
    on_done: Callable[[list[int]], None] | None = None,
) -> np.ndarray:
    """Wait for requests until `deadline` (monotonic); return which completed (`done`: already known ones).

    `on_done(indices)` runs as requests complete, so work on what arrived overlaps what is still moving.
    """
    MPI = mpi()
    reqs = list(reqs)
    done = np.zeros(len(reqs), dtype=bool) if done is None else done
    if not reqs or done.all():
        return done
    idle = 0
    while True:
        idx = MPI.Request.Testsome(reqs)
        if idx:
            done[list(idx)] = True
            if on_done is not None:
                on_done(list(idx))
        if done.all() or time.monotonic() > deadline:
            break
        idle = 0 if idx else idle + 1
        if idle:
            pause(idle)
    return done


def cancel(reqs: Sequence) -> None:
    """Cancel and complete unfinished receive requests (their buffers may then be reused)."""
    for r in reqs:
        if r != mpi().REQUEST_NULL and not r.Test():
            r.Cancel()
            r.Wait()


def recv_control(comm, source: int, tag: int, timeout: float, what: str) -> np.ndarray:
    """Receive one int64 control array of unknown length (probe, then receive), bounded by `timeout`."""
    MPI = mpi()
    st = MPI.Status()
    deadline = time.monotonic() + timeout
    idle = 0
    while not comm.Iprobe(source=source, tag=tag, status=st):
        if time.monotonic() > deadline:
            raise PeerTimeoutError(f"timed out after {timeout:.1f}s waiting for {what} from rank {source}")
        idle += 1
        pause(idle)
    nbytes = st.Get_count(MPI.BYTE)
    if nbytes % 8:
        raise ProtocolError(f"{what} from rank {st.Get_source()} has {nbytes} bytes, not whole int64 words")
    buf = np.empty(nbytes // 8, dtype=np.int64)
    comm.Recv([buf, MPI.INT64_T], source=st.Get_source(), tag=tag)
    return buf


def check_header(msg: np.ndarray, round_id: int, kind: int, src: int) -> None:
    if msg.size < 4 or msg[0] != MAGIC or msg[1] != round_id or msg[3] != kind:
        head = msg[:4].tolist()
        raise ProtocolError(f"rank {src} sent a bad control header {head} (want magic, round {round_id}, kind {kind})")


class Pacer:
    """Token bucket at `rate` bytes/s (0 = unpaced): emulates a link on one machine at a scaled-down rate.

    Store-and-forward: a message is handed to MPI when its last byte would have left the emulated link, so
    it cannot arrive before start + nbytes/rate, and the next message queues behind it.
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
    posts: list[tuple[Callable[[], object], int]],
    pacer: Pacer,
    reqs: list,
    progress: Sequence = (),
    progress_done: np.ndarray | None = None,
) -> None:
    """Run post callables in order, each when the pacer lets its bytes go.

    Meanwhile `progress` requests keep moving; those that complete are marked in `progress_done` (a request
    completed here becomes null, so the caller must learn of it from that mask).
    """
    MPI = mpi()
    progress = list(progress)
    for post, nbytes in posts:
        wait = pacer.delay(nbytes)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            if progress and progress_done is not None:
                idx = MPI.Request.Testsome(progress)
                if idx:
                    progress_done[list(idx)] = True
            time.sleep(min(POLL_S * 50, max(0.0, end - time.monotonic())))
        reqs.append(post())


def mpi_allgather(comm, payload: np.ndarray, out: np.ndarray, timeout: float) -> None:
    """MPI_Allgather of equal-size byte payloads into out[size, nbytes] (the baseline)."""
    MPI = mpi()
    req = comm.Iallgather([payload, MPI.BYTE], [out, MPI.BYTE])
    wait_all([req], timeout, lambda _: "MPI_Allgather")


def ring_allgather(comm, payload: np.ndarray, out: np.ndarray, timeout: float, uplink: float = 0.0) -> None:
    """Ring all-gather over point-to-point sends (bandwidth-optimal on even links), optionally paced."""
    MPI = mpi()
    r, n = comm.Get_rank(), comm.Get_size()
    out[r] = payload
    pacer = Pacer(uplink)
    right, left = (r + 1) % n, (r - 1) % n
    for step in range(n - 1):
        send_idx = (r - step) % n
        recv_idx = (r - step - 1) % n
        rreq = [comm.Irecv([out[recv_idx], MPI.BYTE], source=left, tag=TAG_RING)]
        rdone = np.zeros(1, dtype=bool)
        sreq: list = []
        post = (lambda i=send_idx: comm.Isend([out[i], MPI.BYTE], dest=right, tag=TAG_RING), out[send_idx].nbytes)
        post_paced([post], pacer, sreq, progress=rreq, progress_done=rdone)
        pending = sreq + ([] if rdone[0] else rreq)
        wait_all(pending, timeout, lambda p, s=step: f"ring step {s} (left {left}, right {right})")
