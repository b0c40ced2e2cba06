"""runtime/frames.py: every control frame the runtime reads, validated at the boundary (issue 17), no MPI.

Well-formed frames are built the way the engine builds them (the tracker's own `_directive` on stages of a
real SwarmRound, the end and stage frames' layouts, PeerBT's asks in a driven round) and decode to the
right values; every malformed variant raises ProtocolError (StaleFrameError for an earlier round or stage);
and a fuzz test feeds every parser random words and mutated valid frames: only ProtocolError may escape.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.errors import ProtocolError, StaleFrameError
from fltorrent_hpc.runtime import frames as F
from fltorrent_hpc.runtime.engine import _Tracker
from fltorrent_hpc.swarm import SwarmRound
from fltorrent_hpc.swarm.bt_peer import pack_bits, unpack_bits
from fltorrent_hpc.swarm.stage import BT, SPRAY, WARMUP
from fltorrent_hpc.transport.base import MAGIC

N_PEERS, K, RID, TRACKER, ME, STAGE = 5, 3, 7, 0, 2, 4
N = N_PEERS * K
I64 = np.iinfo(np.int64)


def head(kind: int, stage: int = STAGE, rid: int = RID) -> list[int]:
    return [MAGIC, rid, stage, kind]


def arr(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]).astype(np.int64)


# ---------------------------------------------------------------------------------------------- builders
def directives(n: int = N_PEERS, k: int = K, seed: int = 3, stages: int = 12, protocol: str = "paper"):
    """(peer, frame, stage) for every active peer of the first `stages` stages of a real round (spray and
    warm-up, or the hidden protocol's seeds and first BitTorrent stages), each frame built by the tracker's
    own `_directive`."""
    cfg = SwarmConfig(seed=seed, degree=2, spray_ratio=0.5, protocol=protocol)
    rnd = SwarmRound(cfg, n, k, np.full(n, 2), np.full(n, 3), seed=seed)
    me = types.SimpleNamespace(rid=RID, eng=types.SimpleNamespace(magic=F.MAGIC))  # frames.py reads MAGIC
    out = []
    while not rnd.done and rnd.stage < stages:
        stg = rnd.next_stage()
        for p in range(n):
            msg, ri = _Tracker._directive(me, stg, p)
            out.append((p, msg, stg, ri))
        rnd.complete(stg)
    return out


def bt_stage_frame(act, can, stage=STAGE, n=N_PEERS, exposed=None):
    exp = np.zeros(len(act), bool) if exposed is None else exposed
    masks = (pack_bits(m).view(np.int64) for m in (act, can, exp))
    return arr(head(F.KIND_BT_STAGE, stage), [n], *masks)


def end_frame(stages=9, s_bt=3, warm_us=1234, failed=0, agreed=None, left=None, n=N_PEERS):
    agreed = np.ones(n, bool) if agreed is None else agreed
    left = np.zeros(n, bool) if left is None else left
    return arr(head(F.KIND_END, stages), [stages, s_bt, warm_us, failed], agreed, left)


def report(ok, bans=(), stage=STAGE):
    return arr(head(F.KIND_REPORT, stage), [len(ok)], ok, bans)


def bt_report(senders, chunks, ok, bans=(), stage=STAGE):
    return arr(head(F.KIND_REPORT, stage), [len(senders)], senders, chunks, ok, bans)


# ---------------------------------------------------------------------------------------------- headers
def hdr(frame, **kw):
    args = dict(sender=1, round_id=RID, kinds=F.KIND_REPORT, stage=STAGE)
    args.update(kw)
    return F.parse_header(frame, **args)


def test_header_current_stale_bad():
    assert hdr(report([1])) == F.Header(RID, STAGE, F.KIND_REPORT)
    assert F.StaleFrame is StaleFrameError and issubclass(StaleFrameError, ProtocolError)
    with pytest.raises(StaleFrameError, match="earlier round"):
        hdr(report([1]) - np.array([0, 1, 0, 0] + [0] * 2))
    with pytest.raises(StaleFrameError, match="earlier stage"):
        hdr(report([1], stage=STAGE - 1))
    with pytest.raises(StaleFrameError, match="earlier stage"):
        hdr(report([1], stage=2), stage=None, min_stage=3)
    assert hdr(report([1], stage=5), stage=None, min_stage=3).stage == 5
    # an old frame is stale whatever its kind says
    with pytest.raises(StaleFrameError):
        hdr(arr(head(99, rid=RID - 3)))
    bad = {
        "shorter": arr([MAGIC, RID, STAGE]),
        "magic": arr([MAGIC + 1, RID, STAGE, F.KIND_REPORT]),
        "future round": arr(head(F.KIND_REPORT, rid=RID + 1)),
        "future stage": arr(head(F.KIND_REPORT, stage=STAGE + 1)),
        "negative stage": arr(head(F.KIND_REPORT, stage=-1)),
        "kind": arr(head(F.KIND_END)),
    }
    for why, frame in bad.items():
        with pytest.raises(ProtocolError) as e:
            hdr(frame)
        assert not isinstance(e.value, StaleFrameError), why
        assert "rank 1" in str(e.value) and f"round {RID}" in str(e.value), str(e.value)
    for frame in (np.zeros((2, 4), np.int64), np.array([1.5, 2.0, 3.0, 4.0]), [MAGIC, RID, 2**70, 2], "abcd", None):
        with pytest.raises(ProtocolError):
            hdr(frame)
    # several kinds (what a follower reads on the directive tag)
    kinds = (F.KIND_END, F.KIND_BT_STAGE, F.KIND_DIRECTIVE)
    assert hdr(arr(head(F.KIND_END, 9)), kinds=kinds, stage=None).kind == F.KIND_END


def test_neighbour_header():
    body = F.parse_neighbour_header(arr([MAGIC, RID, STAGE, 6], [5, 6]), sender=3, round_id=RID, stage=STAGE, code=6)
    assert body.tolist() == [5, 6]
    kw = dict(sender=3, round_id=RID, stage=STAGE, code=6)
    with pytest.raises(StaleFrameError):
        F.parse_neighbour_header(arr([MAGIC, RID - 1, STAGE + 50, 6]), **kw)
    with pytest.raises(StaleFrameError):  # the tag repeats every 1000 stages
        F.parse_neighbour_header(arr([MAGIC, RID, STAGE, 6]), **{**kw, "stage": STAGE + 1000})
    for frame in (arr([MAGIC, RID, STAGE, 7]), arr([MAGIC, RID, STAGE + 1000, 6]), arr([0, RID, STAGE, 6]), arr([])):
        with pytest.raises(ProtocolError) as e:
            F.parse_neighbour_header(frame, **kw)
        assert not isinstance(e.value, StaleFrameError)


# ---------------------------------------------------------------------------------------------- tracker -> peer
@pytest.mark.parametrize("protocol", ["paper", "hidden"])
def test_directives_of_a_real_round_decode(protocol):
    seen = 0
    hidden = protocol == "hidden"  # an owner downloads its own chunks back (never in a seed stage)
    for p, msg, stg, ri in directives(protocol=protocol):
        d = F.parse_directive(msg, sender=TRACKER, round_id=RID, n=N_PEERS, K=K, me=p, stage=stg.index, own_ok=hidden)
        si = np.flatnonzero(stg.sender == p)
        si = si[np.lexsort((stg.chunk[si], stg.receiver[si]))]
        assert d.stage == stg.index
        assert d.s_to.tolist() == stg.receiver[si].tolist() and d.s_chunk.tolist() == stg.chunk[si].tolist()
        assert d.r_from.tolist() == stg.sender[ri].tolist() and d.r_chunk.tolist() == stg.chunk[ri].tolist()
        assert d.r_kind.tolist() == stg.kind[ri].tolist()
        seen += d.s_to.size + d.r_from.size
    assert seen > 20


def good_directive():
    # rank ME=2 sends chunk 6 (its own) to 1 and chunk 0 to 3; receives chunks 3 and 4 from 1 and 12 from 4
    return arr(head(F.KIND_DIRECTIVE), [2, 3], [1, 3], [6, 0], [1, 1, 4], [3, 4, 12], [SPRAY, WARMUP, BT])


def dparse(frame, **kw):
    args = dict(sender=TRACKER, round_id=RID, n=N_PEERS, K=K, me=ME)
    args.update(kw)
    return F.parse_directive(frame, **args)


def test_own_chunk_receives_only_outside_seed_stages_of_the_hidden_protocol():
    own_bt = arr(head(F.KIND_DIRECTIVE), [0, 1], [1], [ME * K], [BT])
    own_seed = arr(head(F.KIND_DIRECTIVE), [0, 1], [1], [ME * K], [SPRAY])
    assert dparse(own_bt, own_ok=True).r_chunk.tolist() == [ME * K]
    for frame, ok in ((own_bt, False), (own_seed, True), (own_seed, False)):
        with pytest.raises(ProtocolError, match="own update"):
            dparse(frame, own_ok=ok)


def test_directive_malformed():
    d = dparse(good_directive())
    assert d.r_chunk.tolist() == [3, 4, 12] and d.s_to.tolist() == [1, 3] and d.stage == STAGE
    g = good_directive()

    def with_(i, v):
        x = g.copy()
        x[i] = v
        return x

    bad = {
        "short": g[:5],
        "long": arr(g, [0]),
        "truncated": g[:-1],
        "negative ns": with_(4, -1),
        "negative nr": with_(5, -2),
        "huge nr": with_(5, I64.max),
        "huge ns": with_(4, I64.max // 2),
        "count mismatch": with_(4, 1),
        "send to n": with_(6, N_PEERS),
        "send to self": with_(6, ME),
        "send chunk -1": with_(8, -1),
        "recv from -1": with_(10, -1),
        "recv from self": with_(10, ME),
        "recv chunk N": with_(13, N),
        "recv own chunk": with_(13, ME * K),
        "bad phase": with_(15, 7),
        "duplicate recv": arr(head(F.KIND_DIRECTIVE), [0, 2], [1, 1], [3, 3], [1, 1]),
        "duplicate send": arr(head(F.KIND_DIRECTIVE), [2, 0], [1, 1], [6, 6]),
        "wrong kind": with_(3, F.KIND_END),
        "stale round": with_(1, RID - 1),
    }
    for why, frame in bad.items():
        with pytest.raises(ProtocolError, match=f"rank {TRACKER} round {RID}"):
            dparse(frame)
        assert why
    with pytest.raises(StaleFrameError):
        dparse(g, min_stage=STAGE + 1)
    # the same chunk from two different senders is allowed by the layout (not a duplicate (sender, chunk))
    assert dparse(arr(head(F.KIND_DIRECTIVE), [0, 2], [1, 3], [4, 4], [BT, BT])).r_from.tolist() == [1, 3]


def test_bt_stage_frame():
    act = np.array([1, 1, 0, 1, 1], bool)
    can = np.array([1, 0, 0, 1, 0], bool)
    exp = np.array([0, 0, 1, 0, 1], bool)
    f = F.parse_bt_stage(bt_stage_frame(act, can, exposed=exp), sender=TRACKER, round_id=RID, n=N_PEERS)
    assert f.stage == STAGE and f.active.tolist() == act.tolist() and f.can_send.tolist() == can.tolist()
    assert f.exposed.tolist() == exp.tolist()
    n = 130  # three words a mask
    act = np.random.default_rng(1).random(n) < 0.5
    f = F.parse_bt_stage(bt_stage_frame(act, ~act, n=n), sender=TRACKER, round_id=RID, n=n)
    assert f.active.tolist() == act.tolist() and f.can_send.tolist() == (~act).tolist()
    g = bt_stage_frame(act, ~act, n=n)
    pad = g.copy()
    pad[5 + 2] |= np.int64(1) << np.int64(40)  # bit 168 of the active mask: beyond n
    for frame in (g[:-1], arr(g, [0]), pad, arr(g[:4], [n + 1], g[5:]), arr(head(F.KIND_DIRECTIVE), g[4:])):
        with pytest.raises(ProtocolError):
            F.parse_bt_stage(frame, sender=TRACKER, round_id=RID, n=n)


def test_end_frame():
    agreed = np.array([1, 0, 1, 1, 1], bool)
    left = np.array([0, 1, 0, 0, 0], bool)
    e = F.parse_end(end_frame(agreed=agreed, left=left), sender=TRACKER, round_id=RID, n=N_PEERS)
    assert (e.stages, e.s_bt, e.warm_us, e.failed_open) == (9, 3, 1234, False)
    assert e.agreed.tolist() == agreed.tolist() and e.left.tolist() == left.tolist()
    assert F.parse_end(end_frame(stages=0, s_bt=0, failed=1), sender=0, round_id=RID, n=N_PEERS).failed_open
    g = end_frame()
    bad = [
        g[:-1],
        arr(g, [0]),
        end_frame(failed=2),
        end_frame(s_bt=-1),
        end_frame(s_bt=10),
        end_frame(warm_us=-5),
        end_frame(agreed=np.array([1, 2, 1, 1, 1])),
        end_frame(left=np.array([0, 0, -1, 0, 0])),
        arr(g[:2], [8], g[3:]),  # header stage differs from the stage count
        arr(g[:3], [F.KIND_REPORT], g[4:]),
    ]
    for frame in bad:
        with pytest.raises(ProtocolError):
            F.parse_end(frame, sender=TRACKER, round_id=RID, n=N_PEERS)
    with pytest.raises(StaleFrameError):
        F.parse_end(g, sender=TRACKER, round_id=RID, n=N_PEERS, min_stage=10)


# ---------------------------------------------------------------------------------------------- peer -> tracker
def test_report():
    r = F.parse_report(report([1, 0, 1], [0, 4]), sender=ME, round_id=RID, n=N_PEERS, expected=3, stage=STAGE)
    assert r.ok.tolist() == [True, False, True] and r.banned.tolist() == [0, 4] and r.stage == STAGE
    assert r.unserved.size == 0
    # the tail: s a ban, n + s a sender whose directed data never came (both may name one sender)
    r = F.parse_report(report([1], [4, N_PEERS + 1, N_PEERS + 4]), sender=ME, round_id=RID, n=N_PEERS, expected=1)
    assert r.banned.tolist() == [4] and r.unserved.tolist() == [1, 4]
    assert F.parse_report(report([]), sender=ME, round_id=RID, n=N_PEERS, expected=0).ok.size == 0
    kw = dict(sender=ME, round_id=RID, n=N_PEERS, expected=3, stage=STAGE)
    bad = [
        report([1, 0]),  # fewer than expected
        report([1, 0, 1, 1]),  # more than expected (the 4th word would be a ban: nr says 4)
        report([1, 0, 1])[:7],  # truncated
        report([1, 0, 1])[:4],  # header only
        report([1, 2, 1]),
        report([1, 0, -1]),
        report([1, 0, 1], [2 * N_PEERS]),
        report([1, 0, 1], [-1]),
        report([1, 0, 1], [3, 3]),
        report([1, 0, 1], [N_PEERS + 3, N_PEERS + 3]),
        report([1, 0, 1], [ME]),
        report([1, 0, 1], [N_PEERS + ME]),
        arr(head(F.KIND_REPORT), [-3]),
        arr(head(F.KIND_REPORT), [I64.min]),
    ]
    for frame in bad:
        with pytest.raises(ProtocolError, match=f"rank {ME} round {RID}"):
            F.parse_report(frame, **kw)
    with pytest.raises(StaleFrameError):
        F.parse_report(report([1, 0, 1], stage=STAGE - 1), **kw)


def test_bt_report():
    # rank ME=2 received chunks 0 (from 0), 9 (from 3, failed its digest) and 9 again (from 4)
    f = bt_report([0, 3, 4], [0, 9, 9], [1, 0, 1], [3])
    r = F.parse_bt_report(f, sender=ME, round_id=RID, n=N_PEERS, K=K, stage=STAGE)
    assert r.senders.tolist() == [0, 3, 4] and r.chunks.tolist() == [0, 9, 9]
    assert r.ok.tolist() == [True, False, True] and r.banned.tolist() == [3] and r.unserved.size == 0
    r = F.parse_bt_report(bt_report([0], [0], [1], [N_PEERS + 3]), sender=ME, round_id=RID, n=N_PEERS, K=K)
    assert r.banned.size == 0 and r.unserved.tolist() == [3]
    kw = dict(sender=ME, round_id=RID, n=N_PEERS, K=K, stage=STAGE)
    bad = [
        bt_report([0, 3], [0, 9], [1, 1], [3])[:-2],
        f[:5],
        arr(head(F.KIND_REPORT), [-1]),
        arr(head(F.KIND_REPORT), [I64.max]),
        bt_report([5], [0], [1]),
        bt_report([-1], [0], [1]),
        bt_report([ME], [0], [1]),
        bt_report([0], [N], [1]),
        bt_report([0], [-1], [1]),
        bt_report([0], [ME * K + 1], [1]),  # its own chunk
        bt_report([0], [0], [3]),
        bt_report([0, 3], [9, 9], [1, 1]),  # one chunk delivered twice
        bt_report([0], [0], [1], [0, 0]),
        bt_report([0], [0], [1], [ME]),
        bt_report([0], [0], [1], [2 * N_PEERS]),
        bt_report([0], [0], [1], [N_PEERS + ME]),
    ]
    for frame in bad:
        with pytest.raises(ProtocolError, match=f"rank {ME} round {RID}"):
            F.parse_bt_report(frame, **kw)


# ---------------------------------------------------------------------------------------------- neighbours
NKW = dict(sender=3, round_id=RID, stage=STAGE)


def test_bitfield():
    for n_chunks in (N, 64, 65, 200):
        have = np.random.default_rng(n_chunks).random(n_chunks) < 0.4
        b = F.parse_bitfield(pack_bits(have).view(np.int64), **NKW, N=n_chunks)
        assert b.have.tolist() == have.tolist() and b.chunks.tolist() == np.flatnonzero(have).tolist()
    words = pack_bits(np.ones(N, bool)).view(np.int64)
    for body in (words[:0], arr(words, [0]), words | np.int64(1 << N), np.array([-1], np.int64)):
        with pytest.raises(ProtocolError, match="bitfield"):
            F.parse_bitfield(body, **NKW, N=N)


def test_budget():
    assert F.parse_budget(arr([3]), **NKW) == 3
    assert F.parse_budget(arr([0]), **NKW, max_value=0) == 0
    for body, mx in ((arr([]), None), (arr([1, 2]), None), (arr([-1]), None), (arr([5]), 4), (arr([I64.min]), 4)):
        with pytest.raises(ProtocolError, match="budget"):
            F.parse_budget(body, **NKW, max_value=mx)


def test_ask():
    a = F.parse_ask(arr([7, 4, 0, 13]), **NKW, N=N, max_count=3)
    assert a.missing == 7 and a.chunks.tolist() == [4, 0, 13]
    assert F.parse_ask(arr([0]), **NKW, N=N, max_count=0).chunks.size == 0
    bad = [
        (arr([]), 3),  # no missing count
        (arr([-1, 4]), 3),
        (arr([N + 1]), 3),
        (arr([7, 4, 0, 13, 2]), 3),  # over the requester's budget: a violation, not truncated
        (arr([2, 4, 0, 13]), 5),  # more than it says it misses
        (arr([7, 4, 4]), 5),  # the same chunk twice
        (arr([7, N]), 5),
        (arr([7, -1]), 5),
        (arr([N, *range(N), 0]), 10**6),  # over n*K
    ]
    for body, mx in bad:
        with pytest.raises(ProtocolError, match="ask"):
            F.parse_ask(body, **NKW, N=N, max_count=mx)


def test_grant_keep_have():
    g = F.parse_grant(arr([1, 0, 1]), **NKW, asked=3)
    assert g.tolist() == [True, False, True]
    assert F.parse_keep(arr([1, 0, 0]), **NKW, granted=g).tolist() == [True, False, False]
    assert F.parse_grant(arr([]), **NKW, asked=0).size == 0
    # empty: none of my asks reached the granter in time, every request refused (not a violation)
    assert F.parse_grant(arr([]), **NKW, asked=3).tolist() == [False, False, False]
    for body, asked in ((arr([1, 0]), 3), (arr([1, 0, 1, 0]), 3), (arr([1, 2, 0]), 3), (arr([-1]), 1), (arr([0]), 0)):
        with pytest.raises(ProtocolError, match="grant"):
            F.parse_grant(body, **NKW, asked=asked)
    for body in (arr([1, 1, 0]), arr([1, 0]), arr([1, 0, 0, 0]), arr([1, 0, 5])):
        with pytest.raises(ProtocolError, match="keep"):
            F.parse_keep(body, **NKW, granted=g)


def test_have_delta_full_and_want():
    """A have frame: flags, then this stage's chunks, or (HAVE_FULL) the sender's whole have set as bits;
    HAVE_WANT asks for mine."""
    h = F.parse_have(arr([0, 3, 0, 14]), **NKW, N=N)
    assert h.chunks.tolist() == [3, 0, 14] and not h.full and not h.want
    h = F.parse_have(arr([F.HAVE_WANT]), **NKW, N=N)
    assert h.chunks.size == 0 and h.want and not h.full
    for n_chunks in (N, 64, 65, 200):
        held = np.random.default_rng(n_chunks).random(n_chunks) < 0.4
        for flags in (F.HAVE_FULL, F.HAVE_FULL | F.HAVE_WANT):
            h = F.parse_have(arr([flags], pack_bits(held).view(np.int64)), **NKW, N=n_chunks)
            assert h.full and h.want == bool(flags & F.HAVE_WANT)
            assert h.chunks.tolist() == np.flatnonzero(held).tolist()
    bits = pack_bits(np.ones(N, bool)).view(np.int64)
    bad = [
        arr([]),  # no flags word
        arr([4, 3]),  # an unknown flag
        arr([-1, 3]),
        arr([I64.min]),
        arr([0, 3, 3]),  # a delta: the same chunk twice
        arr([0, N]),
        arr([1, -1]),
        arr([0, I64.max]),
        arr([F.HAVE_FULL]),  # full, but no bits
        arr([F.HAVE_FULL], bits, [0]),  # a word too many
        arr([F.HAVE_FULL], bits | np.int64(1 << N)),  # a bit beyond N
    ]
    for body in bad:
        with pytest.raises(ProtocolError, match="have"):
            F.parse_have(body, **NKW, N=N)


def test_peers_asks_of_a_driven_round_fit_the_bounds(monkeypatch):
    """Every ask, grant, keep and have a PeerBT produces in a driven round (endgame and departures included)
    passes its parser with the bound the runtime uses (min(down[requester], n*K))."""
    import test_bt_peer as tbp

    from fltorrent_hpc.swarm.bt_peer import PeerBT

    checked = {"ask": 0, "have": 0}
    requests, settle, received = PeerBT.requests, PeerBT.settle, PeerBT.received

    def checked_requests(self, p):
        s, c, j, g = requests(self, p)
        for w in np.unique(s).tolist():
            a = F.parse_ask(
                arr([self.missing], c[s == w]), **NKW, N=self.N, max_count=min(int(self.down[self.me]), self.N)
            )
            assert a.chunks.tolist() == c[s == w].tolist()
            checked["ask"] += 1
        return s, c, j, g

    def checked_settle(self, p, granted):
        keep = settle(self, p, granted)
        F.parse_keep(
            keep.astype(np.int64), **NKW, granted=F.parse_grant(granted.astype(np.int64), **NKW, asked=granted.size)
        )
        return keep

    def checked_received(self, senders, chunks):
        F.parse_have(arr([0], np.asarray(chunks, np.int64)), **NKW, N=self.N)
        out = received(self, senders, chunks)
        held = unpack_bits(self.hbits[self.me], self.N)  # a full have frame (resync) of what it holds now
        assert (
            F.parse_have(arr([F.HAVE_FULL], pack_bits(held).view(np.int64)), **NKW, N=self.N).chunks.size == self.held
        )
        checked["have"] += 1
        return out

    monkeypatch.setattr(PeerBT, "requests", checked_requests)
    monkeypatch.setattr(PeerBT, "settle", checked_settle)
    monkeypatch.setattr(PeerBT, "received", checked_received)
    tbp.test_endgame_and_peers_leaving()
    assert checked["ask"] > 50 and checked["have"] > 20


# ---------------------------------------------------------------------------------------------- pipelined phase
def pipe_open(seq=0, act=None, can=None, exp=None, window=6, budget_ms=4000, n=N_PEERS, stage=STAGE):
    act = np.ones(n, bool) if act is None else act
    can = act if can is None else can
    exp = np.zeros(n, bool) if exp is None else exp
    masks = (pack_bits(m).view(np.int64) for m in (act, can, exp))
    return arr(head(F.KIND_PIPE_OPEN, stage), [seq, n, window, budget_ms], *masks)


def pipe_report(s, c, ok, t, seq=0, status=F.RUNNING, base=0, bans=(), stage=STAGE):
    return arr(head(F.KIND_PIPE_REPORT, stage), [seq, status, base, len(s)], s, c, ok, t, bans)


def pipe_frame(code, body=()):
    return arr([MAGIC, RID, STAGE, code], body)


def test_pipe_open_and_updates():
    """The tracker's open frame (seq 0) and its updates: the window, the budget and the three masks."""
    act = np.array([1, 1, 0, 1, 1], bool)
    o = F.parse_pipe_open(pipe_open(3, act, exp=act & (np.arange(5) == 4)), sender=TRACKER, round_id=RID, n=N_PEERS)
    assert (o.stage, o.seq, o.window, o.budget_s) == (STAGE, 3, 6, 4.0)
    assert o.active.tolist() == act.tolist() and o.exposed.tolist() == [0, 0, 0, 0, 1]
    kw = dict(sender=TRACKER, round_id=RID, n=N_PEERS)
    with pytest.raises(StaleFrameError):
        F.parse_pipe_open(pipe_open(stage=STAGE - 1), **kw, stage=STAGE)
    bad = [
        pipe_open(seq=-1),
        pipe_open(window=0),
        pipe_open(window=F.MAX_WINDOW + 1),
        pipe_open(budget_ms=-5),
        pipe_open()[:-1],
        arr(pipe_open(), [0]),
        pipe_open(n=N_PEERS + 1),
        arr(head(F.KIND_BT_STAGE), pipe_open()[4:]),
    ]
    for frame in bad:
        with pytest.raises(ProtocolError) as e:
            F.parse_pipe_open(frame, **kw)
        assert not isinstance(e.value, StaleFrameError)


def test_pipe_report():
    """A progress report: the receive log since the last one, in order, with a status and the ban tail."""
    kw = dict(sender=ME, round_id=RID, n=N_PEERS, K=K, stage=STAGE)
    r = F.parse_pipe_report(
        pipe_report([0, 3, 3], [0, 9, 0], [0, 1, 1], [5, 5, 9], seq=2, status=F.DONE, base=7, bans=[3]), **kw
    )
    assert (r.seq, r.status, r.base) == (2, F.DONE, 7)
    assert r.senders.tolist() == [0, 3, 3] and r.chunks.tolist() == [0, 9, 0] and r.ok.tolist() == [0, 1, 1]
    assert r.t_us.tolist() == [5, 5, 9] and r.banned.tolist() == [3] and r.unserved.size == 0
    own = ME * K
    assert F.parse_pipe_report(pipe_report([1], [own], [1], [0]), **kw, own_ok=True).chunks.tolist() == [own]
    bad = {
        "status": pipe_report([], [], [], [], status=3),
        "negative base": pipe_report([], [], [], [], base=-1),
        "from itself": pipe_report([ME], [0], [1], [0]),
        "own chunk": pipe_report([1], [own], [1], [0]),
        "chunk range": pipe_report([1], [N], [1], [0]),
        "twice": pipe_report([1, 3], [4, 4], [1, 1], [0, 1]),
        "flag": pipe_report([1], [4], [2], [0]),
        "time order": pipe_report([1, 3], [4, 5], [1, 1], [9, 8]),
        "negative time": pipe_report([1], [4], [1], [-1]),
        "short": pipe_report([1], [4], [1], [0])[:-1],
        "huge count": arr(head(F.KIND_PIPE_REPORT), [0, 0, 0, I64.max]),
        "tail names itself": pipe_report([], [], [], [], bans=[ME]),
        "kind": arr(head(F.KIND_REPORT), [0, 0, 0, 0]),
    }
    for why, frame in bad.items():
        with pytest.raises(ProtocolError):
            F.parse_pipe_report(frame, **kw)
            pytest.fail(why)


def test_pipe_neighbour_frames():
    """Requests (q, chunk) pairs within the window; cancels and refusals name request numbers; have frames name
    chunks; every pipelined code is distinct from the stage-based ones."""
    assert min(F.PIPE_CODES) > 2 + 4 * 7 + 3 and len(set(F.PIPE_CODES)) == len(F.PIPE_CODES)
    assert len({F.KIND_PIPE_OPEN, F.KIND_PIPE_REPORT, F.KIND_DIRECTIVE, F.KIND_REPORT, F.KIND_END, 5}) == 6
    code, body = F.parse_pipe_header(pipe_frame(F.PIPE_REQUEST, [7, 3, 8, 14]), **NKW)
    assert code == F.PIPE_REQUEST
    rq = F.parse_pipe_request(body, **NKW, N=N, window=2)
    assert rq.seqs.tolist() == [7, 8] and rq.chunks.tolist() == [3, 14]
    with pytest.raises(StaleFrameError):
        F.parse_pipe_header(arr([MAGIC, RID - 1, STAGE, F.PIPE_HAVE]), **NKW)
    for frame in (arr([MAGIC, RID, STAGE, 6]), arr([MAGIC, RID, STAGE + 1, F.PIPE_HAVE]), arr([MAGIC, RID, STAGE])):
        with pytest.raises(ProtocolError):
            F.parse_pipe_header(frame, **NKW)
    for body in ([7, 3, 8], [7, 3, 8, 4, 9, 5], [-1, 3], [7, N], [7, 3, 7, 4], [7, 3, 8, 3]):
        with pytest.raises(ProtocolError):
            F.parse_pipe_request(arr(body), **NKW, N=N, window=2)
    assert F.parse_pipe_seqs(arr([4, 2]), **NKW, what="cancel", max_count=2).tolist() == [4, 2]
    for body in ([4, 4], [-3], [1, 2, 3]):
        with pytest.raises(ProtocolError):
            F.parse_pipe_seqs(arr(body), **NKW, what="refusal", max_count=2)
    h = F.parse_pipe_have(arr([5, 3, 0]), **NKW, N=N)
    assert h.seq == 5 and h.chunks.tolist() == [3, 0]
    h = F.parse_pipe_have(arr([0]), **NKW, N=N)  # a keep-alive
    assert h.seq == 0 and h.chunks.size == 0
    for body in ([], [0, 3, 3], [0, N], [0, -1], [-1], [F.MAX_SEQ, 2]):
        with pytest.raises(ProtocolError):
            F.parse_pipe_have(arr(body), **NKW, N=N)


def test_pipe_resync_frames():
    """Bitfield and full frames carry a sequence number and exactly the have bits of N chunks; a want frame is
    empty.  Each has a code of its own (a fault, or a reader, can tell the bitfield from its resent copy)."""
    assert F.PIPE_WANT in F.PIPE_CODES and F.PIPE_FULL in F.PIPE_CODES and F.PIPE_FULL != F.PIPE_BITFIELD
    have = np.zeros(N, bool)
    have[[0, 7, N - 1]] = True
    bits = pack_bits(have).view(np.int64)
    h = F.parse_pipe_full(arr([4], bits), **NKW, N=N)
    assert h.seq == 4 and h.chunks.tolist() == [0, 7, N - 1]
    extra = bits.copy()
    extra[-1] |= np.int64(1) << np.int64(N)  # a bit beyond N (N < 64 here)
    for body in (arr([]), arr([0]), arr([-1], bits), arr([0], bits, [0]), arr([F.MAX_SEQ], bits), arr([0], extra)):
        with pytest.raises(ProtocolError):
            F.parse_pipe_full(body, **NKW, N=N)
    assert F.parse_pipe_want(arr([]), **NKW) is None
    with pytest.raises(ProtocolError):
        F.parse_pipe_want(arr([0]), **NKW)
    code, body = F.parse_pipe_header(pipe_frame(F.PIPE_WANT), **NKW)
    assert code == F.PIPE_WANT and body.size == 0


# ---------------------------------------------------------------------------------------------- fuzz
_PEER_ACT = np.array([1, 1, 1, 0, 1], bool)
_DIRECTIVES = [m for p, m, _, _ in directives() if p == ME][:6] + [good_directive()]
PARSERS = {
    "header": (
        lambda f: F.parse_header(f, sender=1, round_id=RID, kinds=(1, 2, 3, 4), min_stage=2),
        [report([1]), end_frame()],
    ),
    "neighbour header": (
        lambda f: F.parse_neighbour_header(f, sender=3, round_id=RID, stage=STAGE, code=6),
        [arr([MAGIC, RID, STAGE, 6], [3, 1, 2])],
    ),
    "directive": (lambda f: dparse(f, min_stage=0), _DIRECTIVES),
    "directive (no me)": (lambda f: dparse(f, me=None, stage=STAGE), [good_directive()]),
    "bt stage": (
        lambda f: F.parse_bt_stage(f, sender=TRACKER, round_id=RID, n=N_PEERS),
        [bt_stage_frame(_PEER_ACT, _PEER_ACT)],
    ),
    "end": (lambda f: F.parse_end(f, sender=TRACKER, round_id=RID, n=N_PEERS), [end_frame()]),
    "report": (
        lambda f: F.parse_report(f, sender=ME, round_id=RID, n=N_PEERS, expected=3, stage=STAGE),
        [report([1, 0, 1], [0, 4]), report([1, 0, 1], [0, N_PEERS + 4])],
    ),
    "bt report": (
        lambda f: F.parse_bt_report(f, sender=ME, round_id=RID, n=N_PEERS, K=K, stage=STAGE),
        [bt_report([0, 3, 4], [0, 9, 9], [1, 0, 1], [3]), bt_report([0], [0], [1], [3, N_PEERS + 3])],
    ),
    "bitfield": (lambda f: F.parse_bitfield(f, **NKW, N=N), [pack_bits(np.ones(N, bool)).view(np.int64)]),
    "budget": (lambda f: F.parse_budget(f, **NKW, max_value=10), [arr([3])]),
    "ask": (lambda f: F.parse_ask(f, **NKW, N=N, max_count=4), [arr([7, 4, 0, 13])]),
    "grant": (lambda f: F.parse_grant(f, **NKW, asked=3), [arr([1, 0, 1]), arr([])]),
    "keep": (lambda f: F.parse_keep(f, **NKW, granted=np.array([1, 0, 1], bool)), [arr([1, 0, 0])]),
    "pipe open": (lambda f: F.parse_pipe_open(f, sender=TRACKER, round_id=RID, n=N_PEERS), [pipe_open(2)]),
    "pipe report": (
        lambda f: F.parse_pipe_report(f, sender=ME, round_id=RID, n=N_PEERS, K=K, stage=STAGE),
        [pipe_report([0, 3], [0, 9], [1, 0], [1, 4], seq=1, base=3, bans=[3]), pipe_report([], [], [], [])],
    ),
    "pipe header": (
        lambda f: F.parse_pipe_header(f, **NKW),
        [pipe_frame(F.PIPE_REQUEST, [1, 2]), pipe_frame(F.PIPE_HAVE)],
    ),
    "pipe request": (lambda f: F.parse_pipe_request(f, **NKW, N=N, window=4), [arr([1, 2, 5, 14])]),
    "pipe seqs": (lambda f: F.parse_pipe_seqs(f, **NKW, what="cancel", max_count=4), [arr([3, 1])]),
    "pipe have": (lambda f: F.parse_pipe_have(f, **NKW, N=N), [arr([0, 14, 3]), arr([9])]),
    "pipe full": (lambda f: F.parse_pipe_full(f, **NKW, N=N), [arr([2], pack_bits(np.ones(N, bool)).view(np.int64))]),
    "pipe want": (lambda f: F.parse_pipe_want(f, **NKW), [arr([])]),
    "have": (
        lambda f: F.parse_have(f, **NKW, N=N),
        [
            arr([0, 3, 0, 14]),
            arr([F.HAVE_WANT]),
            arr([F.HAVE_FULL | F.HAVE_WANT], pack_bits(np.ones(N, bool)).view(np.int64)),
        ],
    ),
}
EXTREMES = [I64.min, I64.min + 1, -(2**32), -1, 0, 1, 2, 3, 4, 5, 14, 15, 2**31, 2**32, I64.max - 1, I64.max]


@st.composite
def words(draw, valid):
    """Random int64 words, or a valid frame of the parser mutated: words replaced, truncated, appended."""
    mode = draw(st.sampled_from(["random", "small", "valid header", "mutate"]))
    seed = draw(st.integers(0, 2**32 - 1))
    gen = np.random.default_rng(seed)
    if mode == "mutate":
        f = valid[draw(st.integers(0, len(valid) - 1))].copy()
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["set", "truncate", "append", "bump"]))
            if op == "set" and f.size:
                f[draw(st.integers(0, f.size - 1))] = draw(st.sampled_from(EXTREMES))
            elif op == "bump" and f.size:
                f[draw(st.integers(0, f.size - 1))] += draw(st.sampled_from([-1, 1]))
            elif op == "truncate":
                f = f[: draw(st.integers(0, f.size))]
            else:
                f = np.concatenate([f, np.array(draw(st.lists(st.sampled_from(EXTREMES), max_size=8)), np.int64)])
        return f
    size = draw(st.integers(0, 1000))
    if mode == "random":
        f = gen.integers(I64.min, I64.max, size, dtype=np.int64, endpoint=True)
        pick = gen.random(size) < 0.2
        f[pick] = gen.choice(np.array(EXTREMES, np.int64), size)[pick]
    else:
        f = gen.integers(-2, 20, size, dtype=np.int64)
    if mode == "valid header":  # a valid start, so the parser gets past the header
        k = min(size, valid[0].size, 4)
        f[:k] = valid[0][:k]
    return f


def _fuzz(name, frame):
    parse, _ = PARSERS[name]
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        try:
            parse(frame)
        except ProtocolError:
            pass


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_valid_frames_of_the_fuzz_pool_parse(name):
    parse, valid = PARSERS[name]
    for f in valid:
        parse(f)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_fuzz_only_protocol_errors(name):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(frame=words(PARSERS[name][1]))
    def run(frame):
        _fuzz(name, frame)

    run()
