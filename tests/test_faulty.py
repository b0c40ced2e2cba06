"""transport/faulty.py's fault windows, without MPI: which outgoing messages a Fault strikes."""

from __future__ import annotations

import numpy as np
import pytest

from fltorrent_hpc.errors import ConfigError
from fltorrent_hpc.runtime import frames
from fltorrent_hpc.transport.base import MAGIC
from fltorrent_hpc.transport.faulty import Fault, FaultyTransport


class _Rec:
    """An inner transport that records what it was asked to send (context name, destination, first words)."""

    def __init__(self, name: str = "ctrl", log: list | None = None):
        self.rank, self.size, self.name = 0, 4, name
        self.log = [] if log is None else log

    def dup(self, name: str) -> _Rec:
        return _Rec(name, self.log)

    def post_send(self, buf, dest, tag):
        self.log.append((self.name, dest, np.asarray(buf).copy()))
        return object()

    def poll_frame(self, source, tag):
        return self.next_frame.pop(0) if getattr(self, "next_frame", None) else None


def frame(rnd: int, stage: int, kind: int) -> np.ndarray:
    return np.array([MAGIC, rnd, stage, kind, 7], dtype=np.int64)


def test_after_strikes_from_the_trigger_frame_on_in_each_round():
    """`after`: nothing before the round's first frame of that kind (sent or received); from it on, every
    matching message, the pipelined payload included; a new round waits for its own trigger."""
    inner = _Rec()
    ctrl = FaultyTransport(inner, [Fault("drop", after=frames.KIND_PIPE_OPEN)])
    pipe = ctrl.dup("pipe")
    ctrl.post_send(frame(0, 3, frames.KIND_REPORT), 1, 12)
    pipe.post_send(np.zeros(8, np.uint8), 1, 5)
    assert len(inner.log) == 2 and ctrl.injected == {}
    inner.next_frame = [frame(0, 4, frames.KIND_PIPE_OPEN)]  # the open frame arrives
    assert ctrl.poll_frame(0, 11) is not None
    ctrl.post_send(frame(0, 4, frames.KIND_PIPE_REPORT), 0, 12)
    pipe.post_send(np.zeros(8, np.uint8), 2, 9)
    assert len(inner.log) == 2 and ctrl.injected == {"drop": 2}
    ctrl.post_send(frame(1, 0, frames.KIND_REPORT), 0, 12)  # round 1: not before its own open frame
    assert len(inner.log) == 3
    ctrl.post_send(frame(0, 9, frames.KIND_REPORT), 0, 12)  # a late frame of round 0 does not reopen it
    ctrl.post_send(frame(1, 1, frames.KIND_REPORT), 0, 12)
    assert len(inner.log) == 5 and ctrl.injected == {"drop": 2}


def test_count_strikes_only_the_first_matches():
    """`count`: the first `count` matching messages, across the wrapper's contexts; the rest pass."""
    inner = _Rec("nbr")
    nbr = FaultyTransport(inner, [Fault("drop", code=frames.PIPE_HAVE, count=2)])
    for k in range(4):
        nbr.post_send(frame(0, 2, frames.PIPE_HAVE), 1 + k % 3, 32200)
        nbr.post_send(frame(0, 2, frames.PIPE_REQUEST), 1, 32200)
    assert nbr.injected == {"drop": 2}
    sent = [int(b[3]) for _, _, b in inner.log]
    assert sent.count(frames.PIPE_HAVE) == 2 and sent.count(frames.PIPE_REQUEST) == 4
    with pytest.raises(ConfigError):
        Fault("drop", count=0)
