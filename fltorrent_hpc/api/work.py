"""What a caller holds and what the comm thread runs: the Work, the queued job, the in-flight send/recv.

The group's collectives return at once with an `FLTorrentWork`; its future resolves to the caller's output
tensors (DDP's reducer and comm hooks need exactly that) once the comm thread has written them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerTimeoutError


def unset_timeout(td: Any) -> bool:
    """True for torch's "no timeout given" (None or a non-positive timedelta)."""
    return td is None or td.total_seconds() <= 0


class FLTorrentWork(dist._Work):
    """A Work whose future resolves to the output tensors once the comm thread wrote them (DDP needs this)."""

    def __init__(self, name: str, outputs: list, devices: Sequence[torch.device], limit_s: float) -> None:
        super().__init__()
        self._name = name
        self._outputs = outputs
        self._fut: torch.futures.Future = torch.futures.Future(devices=list(devices) or None)
        self._cuda = bool(devices)
        self._done = threading.Event()
        self._exc: BaseException | None = None
        self._limit_s = limit_s  # watchdog for wait(): the comm thread itself enforces the op deadline
        self._source = -1

    # comm-thread side
    def _finish(self, exc: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self._exc = exc
        try:
            if exc is None:
                self._fut.set_result(self._outputs)
            else:
                self._fut.set_exception(exc)
        finally:
            self._done.set()

    # caller side
    def wait(self, timeout: timedelta | None = None) -> bool:
        limit = self._limit_s if unset_timeout(timeout) else timeout.total_seconds()
        if not self._done.wait(limit):
            raise PeerTimeoutError(f"fltorrent {self._name}: not completed within {limit:.1f}s")
        if self._exc is not None:
            raise self._exc
        if self._cuda:
            self._fut.wait()  # orders the caller's current CUDA stream after the comm thread's copies
        return True

    def synchronize(self) -> None:
        self.wait()

    def get_future(self) -> torch.futures.Future:
        return self._fut

    def is_completed(self) -> bool:
        return self._done.is_set()

    def is_success(self) -> bool:
        return self._done.is_set() and self._exc is None

    def exception(self) -> BaseException | None:
        return self._exc

    def result(self) -> list:
        self.wait()
        return self._outputs

    def _source_rank(self) -> int:
        return self._source

    def source_rank(self) -> int:
        return self._source

    def __repr__(self) -> str:
        state = "done" if self._done.is_set() else "pending"
        return f"FLTorrentWork({self._name}, {state})"


class Job:
    """One queued unit for the comm thread: `run(deadline)` does the MPI part; errors fail the Work."""

    __slots__ = ("name", "run", "work", "timeout_s")

    def __init__(self, name: str, run: Callable[[float], None], work: FLTorrentWork | None, timeout_s: float):
        self.name, self.run, self.work, self.timeout_s = name, run, work, timeout_s


class P2P:
    """An in-flight user send/recv, progressed by the comm thread between jobs."""

    __slots__ = ("req", "work", "deadline", "what", "peer", "keep", "done_cb")

    def __init__(self, req, work, deadline, what, peer, keep, done_cb=None):
        self.req, self.work, self.deadline, self.what, self.peer = req, work, deadline, what, peer
        self.keep, self.done_cb = keep, done_cb


STOP = object()  # queued to end the comm thread
