"""A misbehaving, late or stalled rank costs itself, never the round (one test per way of misbehaving).

Each fault is injected through the fault-injecting transport on one rank (BAD, never the tracker unless the
tracker is the point).  Honest ranks must end the round with bit-identical results over the honest set, the
misbehaving rank named, no wait past its bound, and the next round on the same engine must succeed (for a
stalled tracker: every rank fails the round with the same error, then the next round succeeds).

The faults that strike the BitTorrent phase run in both its modes (`bt`): the stage-clocked "peers", aimed at
stages and stage frame codes, and "pipelined" (runtime/bt_pipeline.py), aimed at the phase itself (its frame codes,
its `pipe` payload context, or `Fault.after` its open frame: the phase is one stage whatever its length); a
pipelined case checks `stats["pipelined"]`, so it cannot pass on the stage path.

.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_robust.py   (run at 4 and 7)
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest
from mpi4py import MPI
from swarm_checks import honest_identical as shared_honest_identical

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.errors import FLTorrentError, PeerTimeoutError, ShapeMismatchError, TransportError
from fltorrent_hpc.runtime import frames
from fltorrent_hpc.runtime.bt_stages import BITFIELD
from fltorrent_hpc.runtime.engine import ROUND_META_WORDS, SwarmEngine, shape_bytes
from fltorrent_hpc.transport import base as tb
from fltorrent_hpc.transport.faulty import Fault, FaultyTransport
from fltorrent_hpc.transport.mpi import MPITransport

pytestmark = [pytest.mark.mpi(min_size=3), pytest.mark.timeout(240)]

COMM = MPI.COMM_WORLD
R, N = COMM.Get_rank(), COMM.Get_size()
BAD = N - 1
HONEST = [r for r in range(N) if r != BAD]
C = 1024
NB = 12 * C
CANARY = 0x5A5A5A5A5A5A5A5A
# 4 chunks a stage: several stages a round; these faults strike the swarm's stages, so no round here is a
# direct exchange (tests/mpi/test_direct.py covers that)
PACED = dict(uplink=400e3, downlink=400e3, slot_seconds=0.01, direct_bytes=0)


def agree(flag: bool) -> bool:
    v = np.array([1 if flag else 0], dtype=np.int32)
    out = np.empty(1, dtype=np.int32)
    COMM.Allreduce(v, out, op=MPI.MIN)
    return bool(out[0])


def payload_of(rank: int, rnd: int) -> np.ndarray:
    return np.random.default_rng(7000 + 100 * rnd + rank).integers(0, 256, NB, dtype=np.uint8)


def engine(faults: list[Fault], who: int = BAD, **cfg) -> tuple[SwarmEngine, object, object]:
    base = MPITransport(COMM)
    net = FaultyTransport(base, faults) if R == who else base
    kw = dict(chunk_bytes=C, timeout_s=30, stage_timeout_s=0.5, **PACED)
    kw.update(cfg)
    return SwarmEngine(net, SwarmConfig(**kw)), net, base


def honest_identical(res, rnd: int, parts_must: list[int] | None = None) -> bool:
    """The honest ranks hold the same participants (every honest rank among them) and true bytes."""
    return shared_honest_identical(COMM, res, HONEST, lambda u: payload_of(u, rnd), parts_must)


def named(res, keys=("bad_senders", "protocol_errors", "misbehaved", "excluded")) -> set[int]:
    """Every rank id an honest rank names as banned, misbehaving or excluded (union over honest ranks)."""
    mask = np.zeros(N, dtype=np.int64)
    if R in HONEST and res is not None:
        for k in keys:
            mask[[int(x) for x in res.stats.get(k, [])]] = 1
    tot = np.empty(N, dtype=np.int64)
    COMM.Allreduce(mask, tot, op=MPI.SUM)
    return set(np.flatnonzero(tot).tolist())


def two_rounds(faults: list[Fault], privacy: str, **cfg):
    """Round 0 with the faults (round_id 0 in them), round 1 clean; both results and round 0's wall time."""
    eng, net, base = engine(faults, privacy=privacy, **cfg)
    t0 = time.monotonic()
    r0 = eng.disseminate(payload_of(R, 0))
    dt = time.monotonic() - t0
    r1 = eng.disseminate(payload_of(R, 1))
    inj = dict(getattr(net, "injected", {}))
    eng.close()
    base.close()
    return r0, r1, dt, inj


PRIVACY = ["none", "full"]
# both BitTorrent modes; the MPI tier's 7-rank pass runs the default one only (FLTORRENT_TEST_BT=pipelined, run.sh),
# which keeps the suite within its time (the stage-clocked mode runs at 4 ranks)
BT = [m for m in ("peers", "pipelined") if m in os.environ.get("FLTORRENT_TEST_BT", "peers,pipelined").split(",")]


def ran(res, bt: str) -> bool:
    """The round ran the BitTorrent phase `bt` asked for (an honest rank's stats say which)."""
    return R not in HONEST or res is None or bool(res.stats["pipelined"]) == (bt == "pipelined")


@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_message_longer_than_granted_is_refused_and_its_sender_banned(privacy):
    """Row: one chunk too many in a data message.  The receive is posted for the granted run only, so MPI
    refuses the rest (no write past the buffer); the receiver bans the sender and fetches the run elsewhere."""
    r0, r1, dt, inj = two_rounds([Fault("oversize", channel="data", round_id=0, stride=C)], privacy)
    ok = honest_identical(r0, 0) and honest_identical(r1, 1, list(range(N)))
    ok &= BAD in named(r0, ("bad_senders", "protocol_errors"))
    ok &= inj.get("oversize", 0) > 0 if R == BAD else True
    ok &= dt < 30
    assert agree(ok)


@pytest.mark.parametrize("bt", BT)
@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_lost_bitfield_is_sent_again(privacy, bt):
    """A rank's bitfield frames (what it holds when the BitTorrent phase starts) never reach its neighbours.
    They ask it for a full bitfield (a want flag in their next have frames; pipelined: a want frame once the
    bitfield is 2 heartbeats late or a have frame shows a gap) and it sends one, so the chunks only it held
    still spread: the round completes with every rank, bit-identical everywhere."""
    lost = Fault("drop", channel="nbr", round_id=0, code=BITFIELD if bt == "peers" else frames.PIPE_BITFIELD)
    r0, r1, dt, inj = two_rounds([lost], privacy, bt_decisions=bt)
    everyone = list(range(N))
    ok = honest_identical(r0, 0, everyone) and honest_identical(r1, 1, everyone) and ran(r0, bt)
    ok &= all(np.array_equal(r0.updates[u], payload_of(u, 0)) for u in everyone)  # the rank that lost its frames
    ok &= inj.get("drop", 0) == N - 1 if R == BAD else True  # one bitfield to each neighbour, all lost
    ok &= dt < 30
    assert agree(ok)


@pytest.mark.parametrize("bt", BT)
@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_rank_that_grants_and_does_not_serve_is_named_and_banned(privacy, bt):
    """Row: granted requests (or was directed to send), then never sent the data, its control frames all on
    time.  A neighbour whose have frame came without the data it granted bans it and names it; in directed
    stages the receiver reports the missing data and the tracker, which had its report in time, names it and
    bans the pair.  Banned by all its neighbours it leaves; the chunks are fetched from other holders and the
    round completes over the honest set.  Pipelined: it takes requests and keeps sending frames, never the data
    (only the phase's payload context is muted, the warm-up serves): its requesters ban it and name it."""
    # every data message of round 0 (pipelined: of its phase); frames go through
    mute = Fault("drop", channel="data" if bt == "peers" else "pipe", round_id=0)
    r0, r1, dt, inj = two_rounds([mute], privacy, bt_decisions=bt)
    # pipelined: the phase opens after the warm-up (privacy full: the seed stages), which may already have given
    # every rank its update; an owner that leaves during the phase stays in then (bt_pipeline.py)
    must = HONEST if bt == "peers" else None
    ok = honest_identical(r0, 0, must) and honest_identical(r1, 1, list(range(N))) and ran(r0, bt)
    ok &= inj.get("drop", 0) > 0 if R == BAD else True  # the fault fired
    ok &= named(r0, ("unserved",)) == {BAD}  # named, and nobody else
    ok &= BAD in named(r0, ("excluded",))
    ok &= dt < 30
    assert agree(ok)


@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_rank_with_another_payload_size_is_left_out_and_told(privacy):
    """A malformed shape on one rank (its payload is a chunk longer): the ranks agree on the tracker's size, the
    honest ranks leave that rank out and complete the round (it is named, as a shape mismatch and a bad
    descriptor), it alone raises ShapeMismatchError naming both sizes, and the next round includes it."""
    eng, net, base = engine([], privacy=privacy)
    mine = payload_of(R, 0) if R != BAD else np.concatenate([payload_of(R, 0), np.zeros(C, np.uint8)])
    t0 = time.monotonic()
    r0, err = None, None
    try:
        r0 = eng.disseminate(mine)
    except ShapeMismatchError as e:
        err = str(e)
    dt = time.monotonic() - t0
    ok = honest_identical(r0, 0, HONEST)
    if R == BAD:
        ok &= err is not None and f"{NB + C} bytes" in err and str(NB) in err
    else:
        ok &= err is None and r0.stats["shape_mismatch"] == [BAD]
    ok &= BAD in named(r0, ("bad_descriptors",))
    r1 = eng.disseminate(payload_of(R, 1))
    ok &= honest_identical(r1, 1, list(range(N)))
    ok &= all(np.array_equal(r1.updates[u], payload_of(u, 1)) for u in range(N))  # the odd rank too
    ok &= dt < 30
    eng.close()
    base.close()
    assert agree(ok)


@pytest.mark.parametrize("bt", BT)
@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_request_flood_is_refused_not_served(privacy, bt):
    """Row: thousands of duplicate requests in ask frames (pipelined: request frames).  Its neighbours ban the
    flooder; nobody's model becomes its update, and the honest ranks agree bit for bit."""
    r0, r1, dt, inj = two_rounds([Fault("flood", channel="nbr", round_id=0)], privacy, bt_decisions=bt)
    ok = honest_identical(r0, 0) and honest_identical(r1, 1, list(range(N))) and ran(r0, bt)
    ok &= inj.get("flood", 0) > 0 if R == BAD else True  # the fault fired
    ok &= BAD in named(r0, ("bad_senders", "protocol_errors"))
    ok &= dt < 30
    assert agree(ok)


@pytest.mark.parametrize("bt", BT)
@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_malformed_report_excludes_its_sender_and_nobody_aborts(privacy, bt):
    """Row: an out-of-range, negative, short or duplicate report (pipelined: its progress reports, from the
    status word on).  The tracker excludes the liar like a silent peer and the round completes over the rest."""
    # every word after the count (pipelined: after the report number)
    kind = None if bt == "peers" else frames.KIND_PIPE_REPORT
    garble = Fault("corrupt", channel="ctrl", round_id=0, offset=8 * 5, stride=8, code=kind)
    r0, r1, dt, inj = two_rounds([garble], privacy, bt_decisions=bt)
    ok = honest_identical(r0, 0) and honest_identical(r1, 1, list(range(N))) and ran(r0, bt)
    ok &= inj.get("corrupt", 0) > 0 if R == BAD else True  # the fault fired
    ok &= BAD in named(r0, ("misbehaved", "excluded"))
    ok &= dt < 30
    assert agree(ok)


@pytest.mark.parametrize("bt", BT)
@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_rank_that_sleeps_in_a_stage_falls_behind_and_rejoins(privacy, bt):
    """Row: a rank asleep for several stage timeouts inside one stage (pipelined: its progress reports all come
    5 s late).  It is excluded, learns so from the end frame (silent), its late report is discarded as stale,
    and the next round includes it again."""
    if bt == "peers":
        nap = Fault("delay", channel="ctrl", round_id=0, from_stage=1, to_stage=1, delay_s=5.0)
    else:
        nap = Fault("delay", channel="ctrl", round_id=0, code=frames.KIND_PIPE_REPORT, delay_s=5.0)
    r0, r1, dt, inj = two_rounds([nap], privacy, bt_decisions=bt)
    ok = honest_identical(r0, 0) and honest_identical(r1, 1, list(range(N))) and ran(r0, bt)
    if R == BAD:  # the fault fired; it fell behind and knows it (fedavg_ reports applied=False)
        ok &= inj.get("delay", 0) > 0 and r0.stats["silent"]
    ok &= BAD in named(r0, ("excluded",))
    ok &= dt < 30
    assert agree(ok)


@pytest.mark.parametrize("bt", BT)
@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_rank_silent_for_rounds_costs_nothing_and_leaves_no_state(privacy, bt):
    """Row: a rank silent round after round (pipelined: from the moment its phase opens).  Each of those rounds
    excludes it (named: excluded, never as a misbehaving rank); a later round includes it again, and no
    unfinished request outlives the rounds on any rank."""
    if bt == "peers":
        faults = [Fault("silent", round_id=r, from_stage=1) for r in (0, 1, 2)]
    else:
        faults = [Fault("silent", round_id=r, after=frames.KIND_PIPE_OPEN) for r in (0, 1, 2)]
    eng, net, base = engine(faults, privacy=privacy, bt_decisions=bt)
    t0 = time.monotonic()
    res = [eng.disseminate(payload_of(R, k)) for k in range(4)]
    dt = time.monotonic() - t0
    ok = all(honest_identical(res[k], k) for k in range(3)) and honest_identical(res[3], 3, list(range(N)))
    ok &= all(ran(res[k], bt) for k in range(4))
    ok &= all(BAD in named(res[k], ("excluded",)) for k in range(3))
    ok &= all(named(res[k], ("unserved", "misbehaved")) == set() for k in range(3))  # silent, not misbehaving
    ok &= net.injected.get("silent", 0) > 0 if R == BAD else True
    ok &= dt < 4 * 30
    left = np.array([eng.prune_orphans()], dtype=np.int64)
    most = np.empty(1, dtype=np.int64)
    COMM.Allreduce(left, most, op=MPI.MAX)
    ok &= most[0] == 0
    eng.close()
    base.close()
    assert agree(ok)


@pytest.mark.parametrize("bt", BT)
@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_stalled_tracker_fails_the_round_the_same_way_everywhere(privacy, bt):
    """Row: the tracker stalls.  Followers give up on it with PeerTimeoutError naming it; the tracker, which no
    follower confirmed, fails the same way instead of succeeding alone; the next round succeeds.  Pipelined: the
    tracker stalls when its phase ends (its end frame late), and the followers, which hear from it at least every
    quarter of their bound during the phase, give up on the same bound as between stages."""
    if bt == "peers":
        stall = Fault("delay", channel="ctrl", round_id=0, from_stage=1, delay_s=4.0)
    else:
        stall = Fault("delay", channel="ctrl", round_id=0, code=frames.KIND_END, delay_s=4.0)
    eng, net, base = engine([stall], who=0, timeout_s=2.0, privacy=privacy, bt_decisions=bt)
    t0 = time.monotonic()
    try:
        eng.disseminate(payload_of(R, 0))
        err = None
    except PeerTimeoutError as e:
        err = str(e)
    dt = time.monotonic() - t0
    ok = err is not None  # every rank fails with PeerTimeoutError: none succeeds alone
    if R != 0:
        ok &= "tracker" in err  # the followers name who stalled
    ok &= dt < 2.0 + 3 * 0.5 + 5.0  # the follower's bound, plus the tracker's own stall
    ok &= net.injected.get("delay", 0) > 0 if R == 0 else True  # the stall happened
    res = eng.disseminate(payload_of(R, 1))
    ok &= ran(res, bt)
    ok &= res.participants.tolist() == list(range(N))
    ok &= all(np.array_equal(res.updates[u], payload_of(u, 1)) for u in range(N))
    eng.close()
    base.close()
    assert agree(ok)


@pytest.mark.parametrize("privacy", PRIVACY)
def test_a_rank_late_to_a_collective_cannot_corrupt_memory_and_the_group_fails_cleanly(privacy):
    """Row: a rank reaches the round's all-gather after the others timed out.  Its late contribution lands in
    the buffers the others parked, not in canary arrays allocated after the timeout, and the group then fails
    every later round the same way instead of reading out-of-step collectives (by design: the control context
    is out of step; a new group is needed, so no round on this one succeeds)."""
    eng, net, base = engine([], timeout_s=1.0, privacy=privacy)
    if R == BAD:
        time.sleep(2.0)
    parked = len(tb.GRAVEYARD)
    t0 = time.monotonic()
    first = None  # the error's type only: its traceback would keep the collective's buffers referenced
    try:
        eng.disseminate(payload_of(R, 0))
    except FLTorrentError as e:
        first = type(e)
    waited = time.monotonic() - t0
    gc.collect()
    # canaries of every small size the abandoned all-gathers used, several of each: numpy hands a freed small
    # buffer to the next array of its size, so a parked buffer given back at the timeout would be one of these
    # (and the shape all-gather's own sizes: one rank's round words and descriptor, and all ranks' of them)
    sizes = list(range(1, 16 * N + 1)) + [shape_bytes() // 8, N * shape_bytes() // 8]
    canaries = [np.full(k, CANARY, dtype=np.int64) for k in sizes for _ in range(16)]
    time.sleep(2.5)  # the late rank's all-gather is posted while the canaries are live
    COMM.Barrier()  # MPI progress on every rank: the late contribution is written now, wherever it goes
    ok = all(np.all(c == CANARY) for c in canaries)
    ok &= first is not None and issubclass(first, PeerTimeoutError) if R != BAD else True
    if R != BAD:
        ok &= waited < 1.0 + 1.5  # the punctual ranks' wait is the collective's timeout_s (plus scheduling slack)
    else:  # its all-gather completes at once; then it waits, as a follower, for a tracker that gave up
        ok &= waited < 1.0 + 3 * 0.5 + 1.5
    if R != BAD:  # the late contribution did arrive, into the parked buffer of the agreement's all-gather
        mine = tb.GRAVEYARD[parked:]
        ok &= len(mine) == 1
        if mine:
            t, req, sent, out = mine[0]
            ok &= bool(tb.wait_until(t, [req], time.monotonic() + 10.0)[0])
            # the late rank sent the same round words (its descriptor after them is its own)
            ok &= np.array_equal(out[BAD][:ROUND_META_WORDS], sent[:ROUND_META_WORDS])
    try:
        eng.disseminate(payload_of(R, 1))
        ok = False
    except (TransportError, PeerTimeoutError):
        pass
    ok &= all(np.all(c == CANARY) for c in canaries)  # and still intact
    ok &= R == BAD or bool(eng.out_of_step)
    assert agree(ok)
