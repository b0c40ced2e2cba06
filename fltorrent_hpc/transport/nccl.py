"""NCCL point-to-point transport: chunk runs move GPU to GPU, one NCCL group per stage, on their own stream.

The swarm core hands a peer its sends and receives for a stage; `NcclTransport.stage` posts them as
ncclSend/ncclRecv inside one ncclGroupStart/End (so transfers to different peers progress together and
none can deadlock on another), on a dedicated CUDA stream:

    caller's current stream ──(wait_stream)──▶ NCCL stream: grouped send/recv ──(event)──▶ consumers

* before: the NCCL stream waits on the caller's current stream, so pack kernels and slot copies that
  produced the send buffers (or last read a receive slot) are ordered before the transfer;
* the buffers are `record_stream`-ed on the NCCL stream, so the caching allocator cannot recycle them;
* after: `StageHandle.wait()` makes the current stream wait on the stage's event (no host sync: the
  accumulate and hash kernels queue behind it), `StageHandle.synchronize(timeout)` blocks the host with a
  bound, aborting the communicator and raising PeerTimeoutError naming the peers when it runs out.

Several transfers between the same two ranks in one stage are matched in the order they are listed: list
them in the same order (e.g. by chunk id) on both sides.  The engine coalesces contiguous chunks into one
run per (peer, stage), so a group holds a handful of operations.

Bootstrap: rank 0 makes the NCCL unique id and shares its 128 bytes through a torch.distributed Store
(what a ProcessGroup backend is handed: works under torchrun, srun and mpiexec alike) or an MPI broadcast.
Nothing is pickled.  This module imports without CuPy; using it without CuPy raises ConfigError.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, LaunchError, PeerTimeoutError, ShapeMismatchError, TransportError, UnsupportedError
from .base import Transport

UID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES
_STORE_PREFIX = "fltorrent/nccl"
_generation = [0]  # communicators built by this process: every rank builds them in the same order


def _next_key() -> str:
    _generation[0] += 1
    return f"{_STORE_PREFIX}/uid/{_generation[0]}"


def _nccl():
    """cupy.cuda.nccl, or ConfigError saying what is missing (kept lazy: this module imports anywhere)."""
    try:
        from cupy.cuda import nccl  # noqa: PLC0415
    except Exception as e:  # ImportError, or CUDA libraries that do not load
        raise ConfigError(
            f"transport 'nccl' needs CuPy with NCCL (pip install cupy-cuda12x); importing it failed: {e}"
        ) from e
    if not getattr(nccl, "available", False):
        raise ConfigError("transport 'nccl': this CuPy build has no NCCL support")
    return nccl


def nccl_available() -> bool:
    """True where CuPy's NCCL binding imports and a CUDA device is visible."""
    return not nccl_unavailable_reason()


def nccl_unavailable_reason() -> str:
    """Why this process cannot build an NCCL transport ("" when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        _nccl()
    except ConfigError as e:
        return str(e)
    return ""


# ------------------------------------------------------------------------------------------------------
# unique id: 128 bytes on the wire, whatever CuPy's Python form of it is
# ------------------------------------------------------------------------------------------------------
def encode_unique_id(uid: bytes | Sequence[int]) -> bytes:
    """CuPy's unique id (bytes in newer CuPy, a tuple of signed chars in older) -> 128 raw bytes."""
    raw = (
        bytes(uid)
        if isinstance(uid, (bytes, bytearray))
        else np.asarray(uid, dtype=np.int64).astype(np.uint8).tobytes()
    )
    if len(raw) != UID_BYTES:
        raise ConfigError(f"NCCL unique id must be {UID_BYTES} bytes, got {len(raw)}")
    return raw


def decode_unique_id(raw: bytes, as_bytes: bool) -> bytes | tuple[int, ...]:
    """128 raw bytes -> the form this CuPy's NcclCommunicator takes (bytes, or a tuple of signed chars)."""
    if len(raw) != UID_BYTES:
        raise ConfigError(f"NCCL unique id must be {UID_BYTES} bytes, got {len(raw)}")
    return bytes(raw) if as_bytes else tuple(np.frombuffer(raw, dtype=np.int8).tolist())


def exchange_unique_id_store(
    store: Any,
    rank: int,
    make_uid: Callable[[], bytes | Sequence[int]],
    *,
    key: str = f"{_STORE_PREFIX}/uid/0",
    timeout_s: float = 300.0,
) -> bytes:
    """Rank 0 publishes `make_uid()` under `key`; every rank returns the same 128 bytes.

    A rank that waits past `timeout_s` raises PeerTimeoutError naming rank 0 and the key.
    """
    if rank == 0:
        raw = encode_unique_id(make_uid())
        store.set(key, raw)
        return raw
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except Exception as e:  # the Store raises its own timeout/DistStoreError types
        raise PeerTimeoutError(
            f"nccl bootstrap: rank {rank} waited {timeout_s:.0f}s for rank 0 to publish the NCCL unique id "
            f"under store key {key!r} ({type(e).__name__}: {e})"
        ) from e
    raw = bytes(store.get(key))
    if len(raw) != UID_BYTES:
        raise ConfigError(f"nccl bootstrap: store key {key!r} holds {len(raw)} bytes, not a {UID_BYTES}-byte id")
    return raw


def exchange_unique_id_mpi(
    comm: Any, make_uid: Callable[[], bytes | Sequence[int]], *, timeout_s: float = 300.0
) -> bytes:
    """The same over MPI: one bounded Ibcast of a fixed 128-byte buffer from rank 0."""
    buf = np.zeros(UID_BYTES, dtype=np.uint8)
    if comm.Get_rank() == 0:
        buf[:] = np.frombuffer(encode_unique_id(make_uid()), dtype=np.uint8)
    req = comm.Ibcast(buf, root=0)
    deadline = time.monotonic() + timeout_s
    delay = 0.0
    while not req.Test():
        if time.monotonic() > deadline:
            raise PeerTimeoutError(
                f"nccl bootstrap: rank {comm.Get_rank()} waited {timeout_s:.0f}s for rank 0's NCCL unique id broadcast"
            )
        time.sleep(delay)
        delay = min(2 * delay + 1e-5, 1e-3)
    return buf.tobytes()


def local_device_index(environ: Mapping[str, str] | None = None, n_devices: int | None = None) -> int:
    """The GPU of this process: LOCAL_RANK (torchrun), else the launcher's local rank (srun, mpiexec),
    modulo the visible devices (one GPU per rank; NCCL does not support two ranks on one device)."""
    env = os.environ if environ is None else environ
    n = torch.cuda.device_count() if n_devices is None else n_devices
    if n < 1:
        raise ConfigError("transport 'nccl': no CUDA device is visible")
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK"):
        if env.get(var, "").strip().isdigit():
            return int(env[var]) % n
    return 0


# ------------------------------------------------------------------------------------------------------
# the transport
# ------------------------------------------------------------------------------------------------------
class StageHandle:
    """One posted stage: its completion event and what it was moving (for timeouts and error messages)."""

    def __init__(self, transport: NcclTransport, event: Any, sends: list, recvs: list, round_id: int, stage_id: int):
        self.transport = transport
        self.event = event
        self.sends = sends  # [(peer, nbytes)]
        self.recvs = recvs
        self.round_id = round_id
        self.stage_id = stage_id

    def done(self) -> bool:
        """True once every send and receive of the stage has finished on the GPU (non-blocking)."""
        return bool(self.event.query())

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Order `stream` (default: the current one) after the stage; the host does not block."""
        s = stream if stream is not None else torch.cuda.current_stream(self.transport.device)
        s.wait_event(self.event)

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Block the host until the stage is done; past the timeout abort NCCL and raise PeerTimeoutError."""
        t = self.transport
        limit = t.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        delay = 0.0
        while not self.event.query():
            t.check_async_error()
            if time.monotonic() > deadline:
                outstanding = [f"send {n}B->{p}" for p, n in self.sends] + [f"recv {n}B<-{p}" for p, n in self.recvs]
                t.abort()
                raise PeerTimeoutError(
                    f"nccl: rank {t.rank} round {self.round_id} stage {self.stage_id} not done after {limit:.0f}s; "
                    f"outstanding: {', '.join(outstanding) or 'nothing'} (communicator aborted)"
                )
            time.sleep(delay)
            delay = min(2 * delay + 1e-5, 1e-3)


def check_transfers(
    transfers: Sequence[tuple[int, torch.Tensor]], device: torch.device, world_size: int, what: str
) -> list[tuple[int, torch.Tensor]]:
    """Validate (peer, buffer) pairs: contiguous buffers on `device`, peers in [0, world_size)."""
    out = []
    for peer, buf in transfers:
        if not isinstance(buf, torch.Tensor) or buf.device != device or not buf.is_contiguous():
            where = f"{buf.device}" if isinstance(buf, torch.Tensor) else type(buf).__name__
            raise ShapeMismatchError(
                f"nccl {what} to/from peer {peer}: need a contiguous tensor on {device}, got {where}"
            )
        if not 0 <= int(peer) < world_size:
            raise ShapeMismatchError(f"nccl {what}: peer {peer} outside [0, {world_size})")
        out.append((int(peer), buf))
    return out


class NcclTransport:
    """One NCCL communicator over all ranks, with its own CUDA stream, for chunk runs between GPUs."""

    def __init__(
        self,
        uid: bytes,
        rank: int,
        world_size: int,
        device: torch.device | int | None = None,
        *,
        timeout_s: float = 300.0,
    ):
        nccl = _nccl()
        import cupy  # noqa: PLC0415

        if device is None:
            device = local_device_index()
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if self.device.type != "cuda":
            raise ConfigError(f"transport 'nccl' moves CUDA buffers; got device {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world_size, self.timeout_s = int(rank), int(world_size), float(timeout_s)
        self._nccl = nccl
        with cupy.cuda.Device(self.device.index):
            try:
                self.comm = nccl.NcclCommunicator(self.world_size, decode_unique_id(uid, True), self.rank)
            except TypeError:  # CuPy < 13 takes the id as a tuple of signed chars
                self.comm = nccl.NcclCommunicator(self.world_size, decode_unique_id(uid, False), self.rank)
        self.stream = torch.cuda.Stream(device=self.device)
        self._aborted = False

    # construction ----------------------------------------------------------------------------------
    @classmethod
    def from_store(
        cls,
        store: Any,
        rank: int,
        world_size: int,
        device: torch.device | int | None = None,
        *,
        key: str | None = None,
        timeout_s: float = 300.0,
    ) -> NcclTransport:
        """Bootstrap through a torch.distributed Store (the one a ProcessGroup backend receives).

        The default key counts the transports this process built, so a second communicator in the same
        job never picks up the first one's id (every rank must build them in the same order).
        """
        nccl = _nccl()
        key = _next_key() if key is None else key
        raw = exchange_unique_id_store(store, rank, nccl.get_unique_id, key=key, timeout_s=timeout_s)
        return cls(raw, rank, world_size, device, timeout_s=timeout_s)

    @classmethod
    def from_mpi(
        cls, comm: Any = None, device: torch.device | int | None = None, *, timeout_s: float = 300.0
    ) -> NcclTransport:
        """Bootstrap over an mpi4py communicator (default COMM_WORLD): srun / mpiexec without torch's store."""
        nccl = _nccl()
        if comm is None:
            from mpi4py import MPI  # noqa: PLC0415

            comm = MPI.COMM_WORLD
        raw = exchange_unique_id_mpi(comm, nccl.get_unique_id, timeout_s=timeout_s)
        return cls(raw, comm.Get_rank(), comm.Get_size(), device, timeout_s=timeout_s)

    @classmethod
    def from_env(cls, device: torch.device | int | None = None, *, timeout_s: float = 300.0) -> NcclTransport:
        """torchrun: the agent's store (MASTER_ADDR/PORT, TORCHELASTIC_USE_AGENT_STORE); srun/mpiexec: MPI.

        A ProcessGroup backend should call `from_store` with the store it is given instead.
        """
        env = os.environ
        if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true" and "MASTER_ADDR" in env:
            from torch.distributed import TCPStore  # noqa: PLC0415

            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            store = TCPStore(
                env["MASTER_ADDR"],
                int(env["MASTER_PORT"]),
                world,
                is_master=False,
                timeout=timedelta(seconds=timeout_s),
            )
            return cls.from_store(store, rank, world, device, timeout_s=timeout_s)
        from ..launch import detect_launcher  # noqa: PLC0415

        if detect_launcher() is not None:
            return cls.from_mpi(None, device, timeout_s=timeout_s)
        raise LaunchError(
            "transport 'nccl' could not find a launcher to bootstrap from: run under torchrun, srun or mpiexec, "
            "or build it with NcclTransport.from_store(store, rank, world_size)"
        )

    # stages ----------------------------------------------------------------------------------------
    def stage(
        self,
        sends: Sequence[tuple[int, torch.Tensor]] = (),
        recvs: Sequence[tuple[int, torch.Tensor]] = (),
        *,
        round_id: int = 0,
        stage_id: int = 0,
    ) -> StageHandle:
        """Post one stage's sends and receives as one NCCL group on the transport's stream.

        Buffers are contiguous CUDA tensors of any dtype (moved as bytes); a receive buffer's size is
        what the sender sends.  Returns at once; use the handle to order consumers or to wait.
        """
        if self._aborted:
            raise ConfigError(f"nccl: rank {self.rank}'s communicator was aborted after a timeout; build a new one")
        # zero-byte transfers are dropped on both sides (each side knows the sizes)
        snd = [(p, b) for p, b in check_transfers(sends, self.device, self.world_size, "send") if b.numel()]
        rcv = [(p, b) for p, b in check_transfers(recvs, self.device, self.world_size, "recv") if b.numel()]
        nccl = self._nccl
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)  # producers of the send buffers / last readers of the receive slots
        sp = self.stream.cuda_stream
        with torch.cuda.device(self.device):
            nccl.groupStart()
            try:
                for peer, buf in snd:
                    buf.record_stream(self.stream)
                    self.comm.send(buf.data_ptr(), buf.numel() * buf.element_size(), nccl.NCCL_UINT8, peer, sp)
                for peer, buf in rcv:
                    buf.record_stream(self.stream)
                    self.comm.recv(buf.data_ptr(), buf.numel() * buf.element_size(), nccl.NCCL_UINT8, peer, sp)
            finally:
                nccl.groupEnd()
            event = torch.cuda.Event()
            event.record(self.stream)
        return StageHandle(
            self,
            event,
            [(p, b.numel() * b.element_size()) for p, b in snd],
            [(p, b.numel() * b.element_size()) for p, b in rcv],
            round_id,
            stage_id,
        )

    def check_async_error(self) -> None:
        """Raise if NCCL reported an asynchronous error (a peer died, a network fault)."""
        if not self._aborted:
            self.comm.check_async_error()

    def abort(self) -> None:
        """Abort the communicator: pending operations end, the transport is unusable afterwards."""
        if not self._aborted:
            self._aborted = True
            self.comm.abort()

    def close(self) -> None:
        """Destroy the communicator after the stream has drained."""
        if not self._aborted:
            self.stream.synchronize()
            self.comm.destroy()
            self._aborted = True

    def __enter__(self) -> NcclTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------
# the engine's data context on device buffers
# ------------------------------------------------------------------------------------------------------
class _DataReq:
    """One posted send or receive of an NcclDataTransport."""

    __slots__ = ("send", "peer", "buf", "handle", "why", "reported")

    def __init__(self, send: bool, peer: int, buf: torch.Tensor) -> None:
        self.send, self.peer, self.buf = send, peer, buf
        self.handle: StageHandle | None = None  # set by flush
        self.why: str | None = None
        self.reported = False


class NcclDataTransport(Transport):
    """The engine's data context over an NcclTransport: chunk runs move between device rows, GPU to GPU.

    post_send / post_recv take contiguous CUDA tensors and only queue; `flush` (the engine calls it once a
    stage's operations are posted) launches them as one NCCL group, so every rank's stage is one group and no
    receive waits on a send queued behind it.  NCCL has no tags: runs between two ranks match in posting order,
    which the engine gives (sorted by chunk on both sides).  Control frames and all-gathers stay on the host
    transport (`poll_frame`, `post_allgather` refuse).  NCCL cannot cancel a posted receive: `cancel` of a
    launched, unfinished request aborts the communicator (its buffers are then free) and every later post
    raises TransportError; the group's next device round needs a new plane (the round fails on every rank,
    the others time out on it).
    """

    def __init__(self, nccl: NcclTransport, host: Transport) -> None:
        self.nccl, self.host = nccl, host
        self.rank, self.size, self.name = host.rank, host.size, "nccl-data"
        self._queued: list[_DataReq] = []
        self._stage = 0

    @classmethod
    def bootstrap(cls, host: Transport, device: torch.device, timeout_s: float) -> NcclDataTransport:
        """Collective over `host`: rank 0's NCCL unique id reaches every rank in one bounded all-gather of
        128 bytes (any transport: MPI, gloo), then every rank joins the communicator on `device`."""
        from . import base as tb  # noqa: PLC0415

        nccl = _nccl()
        mine = np.zeros(UID_BYTES, np.uint8)
        if host.rank == 0:
            mine[:] = np.frombuffer(encode_unique_id(nccl.get_unique_id()), np.uint8)
        uid = tb.allgather(host, mine, timeout_s, "NCCL unique id")[0].tobytes()
        return cls(NcclTransport(uid, host.rank, host.size, device, timeout_s=timeout_s), host)

    def _check(self, buf: Any, peer: int, what: str) -> None:
        if self.nccl._aborted:
            raise TransportError(f"nccl data plane of rank {self.rank} was aborted (a run never came); build a new one")
        check_transfers([(peer, buf)], self.nccl.device, self.size, what)

    def dup(self, name: str) -> Transport:
        raise UnsupportedError("the NCCL data plane is one context (the engine's data); dup the host transport")

    def post_send(self, buf: Any, dest: int, tag: int) -> _DataReq:
        self._check(buf, dest, "send")
        r = _DataReq(True, int(dest), buf)
        self._queued.append(r)
        return r

    def post_recv(self, buf: Any, source: int, tag: int) -> _DataReq:
        self._check(buf, source, "recv")
        r = _DataReq(False, int(source), buf)
        self._queued.append(r)
        return r

    def flush(self) -> None:
        q, self._queued = self._queued, []
        if not q:
            return
        self._stage += 1
        h = self.nccl.stage(
            [(r.peer, r.buf) for r in q if r.send], [(r.peer, r.buf) for r in q if not r.send], stage_id=self._stage
        )
        for r in q:
            r.handle = h

    def test(self, reqs: Sequence[_DataReq]) -> list[int]:
        if not self.nccl._aborted:
            self.nccl.check_async_error()
        out = []
        for i, r in enumerate(reqs):
            if not r.reported and (r.why is not None or (r.handle is not None and r.handle.done())):
                r.reported = True
                out.append(i)
        return out

    def cancel(self, reqs: Sequence[_DataReq]) -> None:
        live = [r for r in reqs if not r.reported]
        for r in live:
            if r.handle is None:
                self._queued = [q for q in self._queued if q is not r]
            elif not r.handle.done():
                self.nccl.abort()  # the only way to free a launched NCCL receive
            r.why = r.why or "cancelled"

    def abandon(self, reqs: Sequence[_DataReq]) -> None:
        self.cancel(reqs)

    def failed(self, req: _DataReq) -> str | None:
        return None if req.why == "cancelled" else req.why

    def poll_frame(self, source: int, tag: int) -> np.ndarray | None:
        raise UnsupportedError("control frames travel on the host transport, not the NCCL data plane")

    def post_allgather(self, send: np.ndarray, recv: np.ndarray) -> Any:
        raise UnsupportedError("all-gathers travel on the host transport, not the NCCL data plane")

    def local_size(self) -> int:
        return self.host.local_size()

    def close(self) -> None:
        self.nccl.close()
