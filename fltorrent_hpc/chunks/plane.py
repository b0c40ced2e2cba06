"""Buffer planes: where a round's update rows live, and the few operations the engine does on them.

The engine (runtime/engine.py) allocates one row per owner, slices chunk runs out of them for the transport,
digests the runs that arrived and hands the rows to the FedAvg.  A plane says where those bytes are:

* `HostPlane` (`HOST`): numpy rows in host memory, today's path, no overhead (every method is the numpy
  operation the engine did inline before);
* `TorchPlane(device)`: torch uint8 rows on `device` (a GPU); runs move device to device through the plane's
  `data` transport (transport/nccl.NcclDataTransport, or a CUDA-aware MPI), digests run on the device
  (kernels.chunk_digests_t: kernels/blake3.cu), and the FedAvg accumulates the rows where they are.

Copy accounting: every host<->device transfer of update bytes a plane makes goes through `to_host` /
`to_device`, which count them in `COPIES`.  The device path makes none (tests check it); the host staging
fallback counts its two kinds of copy there too.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from ..errors import ShapeMismatchError
from .digest import chunk_digests

Buffer = Any  # a 1-D uint8 row or run: np.ndarray on the host plane, torch.Tensor on a torch plane


class CopyCounter:
    """Bytes of update data copied host->device and device->host (thread-safe: the comm thread counts too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.h2d_bytes = self.d2h_bytes = 0

    def add(self, h2d: int = 0, d2h: int = 0) -> None:
        with self._lock:
            self.h2d_bytes += int(h2d)
            self.d2h_bytes += int(d2h)

    def reset(self) -> None:
        with self._lock:
            self.h2d_bytes = self.d2h_bytes = 0

    @property
    def total(self) -> int:
        return self.h2d_bytes + self.d2h_bytes


COPIES = CopyCounter()
"""Every plane's host<->device copies of update bytes, process-wide."""


def to_host(t: torch.Tensor) -> np.ndarray:
    """A host numpy copy (or view, for a CPU tensor) of uint8 `t`; counted when `t` is on a device."""
    if t.device.type != "cpu":
        COPIES.add(d2h=t.numel() * t.element_size())
        return t.detach().cpu().numpy()
    return t.detach().numpy()


def to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` as a tensor on `device`; counted when that moves host bytes to a device."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if torch.device(device).type != "cpu" and t.device.type == "cpu":
        COPIES.add(h2d=t.numel() * t.element_size())
    return t.to(device)


class HostPlane:
    """Rows in host memory (numpy): the engine's path for CPU tensors and for host staging."""

    kind = "host"
    device = torch.device("cpu")
    data = None  # the engine's own data context carries the runs

    def adopt(self, payload: Buffer) -> np.ndarray:
        """This rank's payload as a row of the plane (no copy when it already is one)."""
        pay = np.asarray(payload)
        if not pay.flags.c_contiguous:
            raise ShapeMismatchError("payload must be C-contiguous bytes")
        return pay.reshape(-1).view(np.uint8)

    def empty(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)

    def zeros(self, nbytes: int) -> np.ndarray:
        return np.zeros(nbytes, np.uint8)

    def scratch(self, like: np.ndarray) -> np.ndarray:
        """A buffer shaped like a run, for bytes that must not land in their row (own chunks coming back)."""
        return np.empty_like(like)

    def nbytes(self, buf: np.ndarray) -> int:
        return int(buf.nbytes)

    def digests(self, buf: np.ndarray, chunk_bytes: int, key: bytes) -> np.ndarray:
        """uint64 [chunks, 2] keyed BLAKE3 digests of the chunks of `buf` (chunks/digest.py)."""
        return chunk_digests(buf, chunk_bytes, key)


HOST = HostPlane()


class TorchPlane:
    """Rows as torch uint8 tensors on `device`; `data` is the transport that moves runs between such rows
    (None in a group of one, which moves nothing)."""

    kind = "device"

    def __init__(self, device: torch.device | str, data: Any = None) -> None:
        self.device = torch.device(device)
        self.data = data

    def adopt(self, payload: Buffer) -> torch.Tensor:
        if not isinstance(payload, torch.Tensor) or payload.device != self.device:
            where = payload.device if isinstance(payload, torch.Tensor) else type(payload).__name__
            raise ShapeMismatchError(f"a {self.device} plane takes a uint8 tensor on {self.device}, got {where}")
        if payload.dtype != torch.uint8 or not payload.is_contiguous():
            raise ShapeMismatchError(f"payload must be contiguous uint8, got {payload.dtype}")
        return payload.reshape(-1)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def zeros(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8, device=self.device)

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(like)

    def nbytes(self, buf: torch.Tensor) -> int:
        return int(buf.numel() * buf.element_size())

    def digests(self, buf: torch.Tensor, chunk_bytes: int, key: bytes) -> np.ndarray:
        """Digests computed on the device (kernels/blake3.cu); only the 16-byte digests come to the host.
        Without CuPy the run itself must come to the host for the `blake3` package: counted."""
        from .kernels import chunk_digests_t, digests_to_numpy, resolve_backend

        if self.device.type != "cpu" and resolve_backend(self.device) != "cupy":
            return chunk_digests(to_host(buf), chunk_bytes, key)
        return digests_to_numpy(chunk_digests_t(buf, chunk_bytes, key))

    def close(self) -> None:
        """Release the data transport (the group calls it at shutdown)."""
        if self.data is not None:
            self.data.close()
            self.data = None


class RunAccumulator:
    """The FedAvg sum built while a round runs: each verified chunk run is accumulated on the rows' device as
    soon as rank order allows, so the average is mostly done when the round ends.

    FedAvg is bit-identical only when every element receives its sources in rank order (kernels.py), and the
    agreed set A is known only at the end.  So each chunk keeps a cursor over the ranks expected in A (all but
    those with a bad descriptor) and accumulates owner u's copy of it once owners before u have been added;
    `result(parts)` returns the sum only when it holds exactly A's sources in rank order (no owner left or
    rejected since), else None and the caller sums the rows again (they are still held).
    """

    def __init__(self, layout: Any, chunk_bytes: int, device: torch.device | str, runner: Any = None) -> None:
        self.layout, self.C, self.device = layout, int(chunk_bytes), torch.device(device)
        self.runner = runner  # a kernels.KernelRunner (the tests' host emulation of the .cu kernels); None: auto
        self.acc: torch.Tensor | None = None
        self.rows: list = []
        self.launches = 0

    def start(self, rows: list, weights: np.ndarray, skip: list[int]) -> None:
        """A round's rows (index = owner; this rank's own row already holds its update) and FedAvg weights."""
        n, K = len(rows), self.layout.n_chunks(self.C)
        self.rows, self.w = rows, [float(x) for x in weights]
        self.expect = [u for u in range(n) if u not in set(skip)]
        self.held = np.zeros((n, K), dtype=bool)
        self.cursor = np.zeros(K, dtype=np.int64)  # index into self.expect of the next owner each chunk waits for
        self.acc = torch.zeros(self.layout.numel, dtype=torch.float32, device=self.device)

    def add(self, owner: int, chunk_ids: np.ndarray) -> None:
        """Chunks `chunk_ids` of `owner`'s row were verified: accumulate every chunk whose turn has come."""
        from .kernels import accumulate_

        if self.acc is None or not len(chunk_ids):
            return
        self.held[owner, chunk_ids] = True
        order = self.expect
        while True:
            live = np.flatnonzero(self.cursor < len(order))
            if not live.size:
                return
            nxt = np.asarray(order, dtype=np.int64)[self.cursor[live]]
            ready = live[self.held[nxt, live]]
            if not ready.size:
                return
            owners = np.asarray(order, dtype=np.int64)[self.cursor[ready]]
            for u in np.unique(owners).tolist():
                ids = ready[owners == u]
                # runs of consecutive chunks: one launch each, straight from the row (a 1-D run of whole chunks)
                cut = np.flatnonzero(np.diff(ids) != 1) + 1
                for run in np.split(ids, cut):
                    a, b = int(run[0]) * self.C, min((int(run[-1]) + 1) * self.C, self.layout.total_bytes)
                    accumulate_(self.acc, run, self.rows[u][a:b], self.w[u], self.layout, self.C, runner=self.runner)
                    self.launches += 1
            self.cursor[ready] += 1

    def result(self, parts: list[int]) -> torch.Tensor | None:
        """The fp32 sum over `parts` in rank order if that is exactly what was accumulated, else None."""
        if self.acc is None or [u for u in self.expect if u in set(parts)] != list(parts):
            return None
        if sorted(parts) != self.expect or not (self.cursor == len(self.expect)).all():
            return None
        return self.acc


__all__ = ["COPIES", "HOST", "CopyCounter", "HostPlane", "RunAccumulator", "TorchPlane", "to_device", "to_host"]
