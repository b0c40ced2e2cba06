"""The MPI transport (mpi4py): the Transport interface over a duplicated communicator, and the baselines.

Only upper-case (buffer) mpi4py calls touch peer data; nothing a peer sends is ever unpickled.  MPICH
progresses nonblocking transfers only while some thread is inside MPI, so the bounded waits' polls
(transport/base.py) also drive progress.  MPI errors surface as `TransportError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import LaunchError, PeerTimeoutError, ProtocolError, TransportError
from .base import ANY_SOURCE, SPIN, Pacer, Request, Transport, Truncated, pause, post_paced, wait_all

__all__ = ["MPITransport", "SPIN", "mpi", "cuda_aware", "pause", "mpi_allgather", "ring_allgather", "wait_requests"]

TAG_RING = 22


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


class _StatusRecv:
    """A receive posted with `post_recv_status`: the MPI request and, once complete, its status."""

    __slots__ = ("req", "status", "got")

    def __init__(self, req, status):
        self.req, self.status, self.got = req, status, None


class MPITransport(Transport):
    """A Transport over an mpi4py communicator.  `MPITransport(comm)` duplicates `comm`, so its tags never
    match the caller's messages; `close()` frees the duplicate (with dup=False, `owned` says whether `close()`
    frees `comm` itself: a sub-communicator the caller made for this transport)."""

    def __init__(self, comm, name: str = "world", *, dup: bool = True, owned: bool | None = None):
        self._MPI = mpi()
        self.comm = comm.Dup() if dup else comm
        self._owned = dup if owned is None else owned
        self.rank, self.size, self.name = self.comm.Get_rank(), self.comm.Get_size(), name
        self._status = self._MPI.Status()
        self._failed: dict[int, str] = {}  # id(request) -> why it completed with an error

    def dup(self, name: str) -> MPITransport:
        return MPITransport(self.comm, name)

    def post_send(self, buf: np.ndarray, dest: int, tag: int) -> Request:
        return self._call(lambda: self.comm.Isend([buf, self._MPI.BYTE], dest=dest, tag=tag), "send", dest)

    def post_recv(self, buf: np.ndarray, source: int, tag: int) -> Request:
        return self._call(lambda: self.comm.Irecv([buf, self._MPI.BYTE], source=source, tag=tag), "receive", source)

    def post_recv_status(self, buf: np.ndarray, source: int, tag: int) -> Request:
        src = self._MPI.ANY_SOURCE if source == ANY_SOURCE else source
        req = self._call(lambda: self.comm.Irecv([buf, self._MPI.BYTE], source=src, tag=tag), "receive", source)
        return _StatusRecv(req, self._MPI.Status())

    def recv_status(self, req: Request) -> tuple[int, int]:
        if not isinstance(req, _StatusRecv) or req.got is None:
            raise TransportError(f"{self.name}: recv_status of a request that was not a completed post_recv_status")
        return req.got

    def test(self, reqs: Sequence[Request]) -> list[int]:
        if not reqs:
            return []
        return self._test_one_by_one(reqs)

    def _test_one_by_one(self, reqs: Sequence[Request]) -> list[int]:
        """Test each request on its own.  Testsome would be one call, but when one request fails (a message
        longer than its receive buffer: MPI_ERR_TRUNCATE) it raises and the other requests that completed in
        the same call are freed unreported; one by one, each completion is seen and a failure is pinned on
        its own request (`failed` says why)."""
        out = []
        for i, r in enumerate(reqs):
            try:
                if isinstance(r, _StatusRecv):
                    if r.req.Test(r.status):
                        r.got = (r.status.Get_source(), r.status.Get_count(self._MPI.BYTE))
                        out.append(i)
                elif r != self._MPI.REQUEST_NULL and r.Test():
                    out.append(i)
            except self._MPI.Exception as e:
                why = f"MPI failed a request on {self.name}: {e.Get_error_string()}"
                truncated = e.Get_error_class() == self._MPI.ERR_TRUNCATE
                self._failed[id(r)] = Truncated(why) if truncated else why
                out.append(i)
        return out

    def failed(self, req: Request) -> str | None:
        return self._failed.pop(id(req), None)

    def cancel(self, reqs: Sequence[Request]) -> None:
        null = self._MPI.REQUEST_NULL
        for r in reqs:
            r = r.req if isinstance(r, _StatusRecv) else r
            if r == null:
                continue
            try:
                if not r.Test():
                    r.Cancel()
                    r.Wait()
            except self._MPI.Exception:
                pass  # it completed with an error (a truncated receive): complete all the same

    def abandon(self, reqs: Sequence[Request]) -> None:
        null = self._MPI.REQUEST_NULL
        for r in reqs:
            r = r.req if isinstance(r, _StatusRecv) else r
            try:
                if r != null:
                    r.Cancel()
            except self._MPI.Exception:
                pass  # completed meanwhile, or not cancellable: `test` reports it when it completes

    def poll_frame(self, source: int, tag: int) -> np.ndarray | None:
        if self.comm is None:
            raise TransportError(f"{self.name}: this transport is closed")
        st = self._status
        if not self.comm.Iprobe(source=source, tag=tag, status=st):
            return None
        nbytes = st.Get_count(self._MPI.BYTE)
        buf = np.empty(max(nbytes, 0) // 8 + (1 if nbytes % 8 else 0), dtype=np.int64)
        self.comm.Recv([buf.view(np.uint8)[:nbytes], self._MPI.BYTE], source=st.Get_source(), tag=tag)
        if nbytes % 8:
            raise ProtocolError(f"rank {st.Get_source()} sent a {nbytes}-byte frame on {self.name}, not int64 words")
        return buf

    def post_allgather(self, send: np.ndarray, recv: np.ndarray) -> Request:
        return self._call(lambda: self.comm.Iallgather([send, self._MPI.BYTE], [recv, self._MPI.BYTE]), "allgather", -1)

    def local_size(self) -> int:
        local = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED)
        try:
            return local.Get_size()
        finally:
            local.Free()

    def close(self) -> None:
        if self._owned and self.comm is not None and self.comm != self._MPI.COMM_NULL:
            self.comm.Free()
        self.comm = None

    def _call(self, post: Callable[[], Request], what: str, peer: int) -> Request:
        if self.comm is None:
            raise TransportError(f"{self.name}: this transport is closed")
        try:
            return post()
        except self._MPI.Exception as e:
            raise TransportError(f"MPI could not post a {what} (peer {peer}) on {self.name}: {e}") from e


def wait_requests(reqs: Sequence, timeout: float, describe: Callable[[list[int]], str]) -> None:
    """Bounded wait on raw mpi4py requests (for callers that post on a communicator of their own)."""
    MPI = mpi()
    reqs = list(reqs)
    deadline = time.monotonic() + timeout
    idle = 0
    while reqs and not MPI.Request.Testall(reqs):
        if time.monotonic() > deadline:
            pending = [i for i, r in enumerate(reqs) if not r.Test()]
            raise PeerTimeoutError(f"timed out after {timeout:.1f}s waiting for {describe(pending)}")
        idle += 1
        pause(idle)


# ---------------------------------------------------------------------------------------------- baselines
def mpi_allgather(t: Transport, payload: np.ndarray, out: np.ndarray, timeout: float) -> None:
    """MPI_Allgather of equal-size byte payloads into out[size, nbytes] (the baseline)."""
    wait_all(t, [t.post_allgather(payload, out)], timeout, lambda _: "MPI_Allgather")


def ring_allgather(t: Transport, payload: np.ndarray, out: np.ndarray, timeout: float, uplink: float = 0.0) -> None:
    """Ring all-gather over point-to-point sends (bandwidth-optimal on even links), optionally paced."""
    r, n = t.rank, t.size
    out[r] = payload
    pacer = Pacer(uplink)
    right, left = (r + 1) % n, (r - 1) % n
    for step in range(n - 1):
        send_idx = (r - step) % n
        recv_idx = (r - step - 1) % n
        rreq = [t.post_recv(out[recv_idx], left, TAG_RING)]
        rdone = np.zeros(1, dtype=bool)
        sreq: list = []
        post = (lambda i=send_idx: t.post_send(out[i], right, TAG_RING), out[send_idx].nbytes)
        post_paced(t, [post], pacer, sreq, progress=rreq, progress_done=rdone)
        pending = sreq + ([] if rdone[0] else rreq)
        wait_all(t, pending, timeout, lambda p, s=step: f"ring step {s} (left {left}, right {right})")
