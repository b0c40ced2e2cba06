"""A fake device for the device data plane's CPU tests: buffers that count every conversion to host memory,
and a data transport that takes nothing else.

* `CountingTensor`: a torch CPU tensor standing for device memory.  `.numpy()`, `np.asarray(...)`, `.cpu()`
  and `.tolist()` on it (or on any view of it: torch keeps the subclass through ops) add its bytes to
  `HOST_COPIES`, so an update that leaves the "device" anywhere in the engine or fedavg_ path is seen.
* `FakePlane`: chunks/plane.TorchPlane on such tensors; its digest is the fake device's own kernel, reading
  the fake device memory in place as on a GPU: kernels/blake3.cu itself in host emulation (tests/kernel_emu.py)
  when given its runner, else the blake3 package; with the runner, fedavg_'s run-by-run sum runs
  kernels/accumulate.cu's code too.
* `FakeDeviceTransport`: the engine's data context over a host transport, behaving like NcclDataTransport:
  it takes only CountingTensor buffers (a numpy buffer raises TypeError) and queues every post until
  `flush`, so a caller that forgets to flush a stage waits forever (and its test fails on the deadline).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fltorrent_hpc.chunks.digest import chunk_digests
from fltorrent_hpc.chunks.kernels import chunk_digests_t, digests_to_numpy
from fltorrent_hpc.chunks.plane import TorchPlane
from fltorrent_hpc.errors import UnsupportedError
from fltorrent_hpc.transport.base import Transport


class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.calls: list[str] = []

    def add(self, t: torch.Tensor, how: str) -> None:
        with self._lock:
            self.bytes += raw(t).nbytes
            self.calls.append(how)

    def reset(self) -> None:
        with self._lock:
            self.bytes = 0
            self.calls = []


HOST_COPIES = _Counter()


def raw(t: torch.Tensor) -> np.ndarray:
    """The fake device memory behind `t`, uncounted: only the fake device's own kernels and wire use it."""
    return torch.Tensor.numpy(t.as_subclass(torch.Tensor).detach())


class CountingTensor(torch.Tensor):
    """A CPU tensor playing device memory: conversions to host memory are counted in HOST_COPIES."""

    def numpy(self, *a: Any, **k: Any) -> np.ndarray:
        HOST_COPIES.add(self, "numpy")
        return raw(self)

    def __array__(self, *a: Any, **k: Any) -> np.ndarray:
        HOST_COPIES.add(self, "__array__")
        arr = raw(self)
        return arr if not a or a[0] is None else arr.astype(a[0])

    def cpu(self, *a: Any, **k: Any) -> torch.Tensor:
        HOST_COPIES.add(self, "cpu")
        return self.as_subclass(torch.Tensor).clone()

    def tolist(self) -> list:
        HOST_COPIES.add(self, "tolist")
        return self.as_subclass(torch.Tensor).tolist()


def on_device(t: torch.Tensor) -> CountingTensor:
    return t.as_subclass(CountingTensor)


class FakePlane(TorchPlane):
    """A device plane whose device memory is CountingTensor (device "cpu") and whose runs move on `data`."""

    def __init__(self, data: Any = None, runner: Any = None) -> None:
        super().__init__("cpu", data)
        self.runner = runner  # kernel_emu.EmuRunner: digests and the run-by-run FedAvg sum by kernels/*.cu's code

    def adopt(self, payload: Any) -> torch.Tensor:
        return on_device(super().adopt(payload))

    def empty(self, nbytes: int) -> torch.Tensor:
        return on_device(super().empty(nbytes))

    def zeros(self, nbytes: int) -> torch.Tensor:
        return on_device(super().zeros(nbytes))

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        return on_device(torch.empty_like(like.as_subclass(torch.Tensor)))

    def digests(self, buf: torch.Tensor, chunk_bytes: int, key: bytes) -> np.ndarray:
        if not isinstance(buf, CountingTensor):
            raise TypeError(f"fake device digest of a {type(buf).__name__}: not fake device memory")
        if self.runner is not None:
            d = chunk_digests_t(buf.as_subclass(torch.Tensor), chunk_bytes, key, runner=self.runner)
            return digests_to_numpy(d)
        return chunk_digests(raw(buf), chunk_bytes, key)


class _Req:
    __slots__ = ("send", "buf", "peer", "tag", "inner", "cancelled", "reported")

    def __init__(self, send: bool, buf: torch.Tensor, peer: int, tag: int) -> None:
        self.send, self.buf, self.peer, self.tag = send, buf, peer, tag
        self.inner: Any = None
        self.cancelled = self.reported = False


class FakeDeviceTransport(Transport):
    """Moves CountingTensor runs between ranks over `inner` (a host transport of its own), launched at flush."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.rank, self.size, self.name = inner.rank, inner.size, "fake-device"
        self._queued: list[_Req] = []
        self.sent_bytes = self.recv_bytes = self.flushes = 0

    def _want(self, buf: Any) -> None:
        if not isinstance(buf, CountingTensor):
            raise TypeError(f"the fake device transport moves fake device buffers only, got {type(buf).__name__}")

    def dup(self, name: str) -> Transport:
        raise UnsupportedError("one context")

    def post_send(self, buf: Any, dest: int, tag: int) -> _Req:
        self._want(buf)
        r = _Req(True, buf, dest, tag)
        self._queued.append(r)
        return r

    def post_recv(self, buf: Any, source: int, tag: int) -> _Req:
        self._want(buf)
        r = _Req(False, buf, source, tag)
        self._queued.append(r)
        return r

    def flush(self) -> None:
        q, self._queued = self._queued, []
        self.flushes += bool(q)
        for r in q:
            if r.send:
                self.sent_bytes += r.buf.numel()
                r.inner = self.inner.post_send(raw(r.buf), r.peer, r.tag)
            else:
                self.recv_bytes += r.buf.numel()
                r.inner = self.inner.post_recv(raw(r.buf), r.peer, r.tag)

    def test(self, reqs: Sequence[_Req]) -> list[int]:
        out = [i for i, r in enumerate(reqs) if r.cancelled and r.inner is None and not r.reported]
        live = [i for i, r in enumerate(reqs) if r.inner is not None and not r.reported]
        for j in self.inner.test([reqs[i].inner for i in live]):
            out.append(live[j])
        for i in out:
            reqs[i].reported = True
        return sorted(out)

    def cancel(self, reqs: Sequence[_Req]) -> None:
        for r in reqs:
            if r.inner is None:
                self._queued = [q for q in self._queued if q is not r]
                r.cancelled = True
        self.inner.cancel([r.inner for r in reqs if r.inner is not None and not r.reported])

    def abandon(self, reqs: Sequence[_Req]) -> None:
        self.cancel(reqs)

    def failed(self, req: _Req) -> str | None:
        return self.inner.failed(req.inner) if req.inner is not None else None

    def poll_frame(self, source: int, tag: int) -> np.ndarray | None:
        raise UnsupportedError("control frames stay on the host transport")

    def post_allgather(self, send: np.ndarray, recv: np.ndarray) -> Any:
        raise UnsupportedError("all-gathers stay on the host transport")

    def close(self) -> None:
        self.inner.close()
