"""The pipelined phase's bitfield resync (runtime/bt_pipeline.py), one PipePeer driven frame by frame, no MPI:
a lost bitfield or a gap in a neighbour's have-frame numbers gets a want frame, a full frame settles it, wants
are bounded, and a neighbour that wants more than MAX_WANTS full frames is banned as a flood."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.errors import ProtocolError
from fltorrent_hpc.runtime import bt_pipeline as bp
from fltorrent_hpc.runtime import frames as F
from fltorrent_hpc.swarm.bt_peer import pack_bits

N_PEERS, K, RID, STAGE = 4, 3, 5, 2
N = N_PEERS * K


class _Net:
    """A context that records the frames posted on it."""

    def __init__(self):
        self.sent: list[tuple[int, np.ndarray]] = []

    def post_send(self, buf, dest, tag):
        self.sent.append((int(dest), np.asarray(buf).copy()))
        return object()


def peer_of(me: int = 0) -> bp.PipePeer:
    cfg = SwarmConfig(chunk_bytes=64, stage_timeout_s=0.5, degree=3)
    eng = SimpleNamespace(size=N_PEERS, rank=me, magic=F.MAGIC, nbrc=_Net(), pipe=_Net())
    have = np.zeros((N_PEERS, K), dtype=bool)
    have[me] = True
    peer = SimpleNamespace(
        eng=eng, cfg=cfg, K=K, rid=RID, hidden=False, seed=11, have=have, bad_desc=set(), bad_senders=set(),
        protocol_errors={}, all_info=np.zeros((N_PEERS, 4)), pipelined=False,
    )  # fmt: skip
    act = np.ones(N_PEERS, dtype=bool)
    op = F.PipeOpen(STAGE, 0, 4, 10.0, act, act.copy(), np.zeros(N_PEERS, dtype=bool))
    return bp.PipePeer(peer, op, lambda frame: None)


def codes_to(pp: bp.PipePeer, w: int) -> list[int]:
    return [int(b[3]) for d, b in pp.eng.nbrc.sent if d == w]


def full_body(seq: int, chunks) -> np.ndarray:
    have = np.zeros(N, dtype=bool)
    have[list(chunks)] = True
    return np.concatenate([[seq], pack_bits(have).view(np.int64)]).astype(np.int64)


def test_a_lost_bitfield_or_a_gap_is_asked_for_once_a_heartbeat_pair_and_a_full_frame_settles_it():
    pp = peer_of()
    w = pp.nbrs[0]
    t = pp.t_open
    pp._resync(t + 0.1 * pp.hb)  # its bitfield may still be on the way
    assert F.PIPE_WANT not in codes_to(pp, w)
    pp._on_frame(w, F.PIPE_HAVE, np.array([1, w * K], np.int64), True)  # have #1: bitfield #0 never came
    assert w not in pp.whole and pp.nh[pp.slot[w], w * K]
    pp._resync(t + 0.1 * pp.hb)
    pp._resync(t + 0.2 * pp.hb)  # not again before 2 heartbeats
    assert codes_to(pp, w).count(F.PIPE_WANT) == 1
    assert w in pp._resyncing()  # the peer reports RUNNING meanwhile, not STUCK
    pp._resync(t + 2.2 * pp.hb)  # the full frame did not come: asked again
    assert codes_to(pp, w).count(F.PIPE_WANT) == 2
    pp._on_frame(w, F.PIPE_FULL, full_body(2, [w * K + 1, w * K + 2]), True)
    assert w in pp.whole and pp.nh[pp.slot[w], w * K : (w + 1) * K].all()
    pp._resync(t + 9 * pp.hb)
    assert codes_to(pp, w).count(F.PIPE_WANT) == 2  # settled: nothing more asked
    pp._on_frame(w, F.PIPE_HAVE, np.array([3], np.int64), True)  # in order: still whole
    assert w in pp.whole
    pp._on_frame(w, F.PIPE_HAVE, np.array([5], np.int64), True)  # #4 was lost
    assert w not in pp.whole
    pp._resync(t + 9 * pp.hb)
    assert codes_to(pp, w).count(F.PIPE_WANT) == 3


def test_wants_are_bounded_and_the_answer_is_a_full_frame():
    pp = peer_of()
    w = pp.nbrs[1]
    for k in range(3 * bp.MAX_WANTS):  # a neighbour that never answers
        pp._resync(pp.t_open + (2 + 2.5 * k) * pp.hb)
    assert codes_to(pp, w).count(F.PIPE_WANT) == bp.MAX_WANTS
    assert w not in pp._resyncing()  # given up on: no longer holds the phase RUNNING
    pp._on_frame(w, F.PIPE_WANT, np.zeros(0, np.int64), True)
    pp._flush(pp.t_open)
    full = [b for d, b in pp.eng.nbrc.sent if d == w and b[3] == F.PIPE_FULL]
    assert len(full) == 1
    h = F.parse_pipe_full(full[0][4:], sender=0, round_id=RID, stage=STAGE, N=N)
    assert h.chunks.tolist() == list(range(K))  # everything peer 0 holds: its own chunks


def test_more_wants_than_the_bound_is_a_flood():
    pp = peer_of()
    w = pp.nbrs[2]
    for _ in range(bp.MAX_WANTS):
        pp._on_frame(w, F.PIPE_WANT, np.zeros(0, np.int64), True)
    with pytest.raises(ProtocolError, match="flood"):
        pp._on_frame(w, F.PIPE_WANT, np.zeros(0, np.int64), True)
