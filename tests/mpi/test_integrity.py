"""Integrity against one malicious rank, on real MPI ranks: forged relays, a descriptor that does not match
its owner's bytes, a descriptor replayed from an earlier round.  The malice is injected through the
fault-injecting transport (the rank's engine cannot tell), and every honest rank must end the round with
bit-identical results over the honest set, the bad rank named, nothing hanging.

.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_integrity.py   (run at 4 and 7)
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from mpi4py import MPI

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.errors import ShapeMismatchError
from fltorrent_hpc.runtime.engine import DESC_HEAD, ROUND_META_WORDS, SwarmEngine, shape_bytes
from fltorrent_hpc.transport.faulty import Fault, FaultyTransport
from fltorrent_hpc.transport.mpi import MPITransport

pytestmark = [pytest.mark.mpi(min_size=3), pytest.mark.timeout(240)]

COMM = MPI.COMM_WORLD
R, N = COMM.Get_rank(), COMM.Get_size()
BAD = N - 1  # not the tracker (rank 0)
HONEST = [r for r in range(N) if r != BAD]
C = 1024
NB = 12 * C
# one rank's contribution to a round's shape all-gather: round_meta, then its descriptor (header, weight and links,
# 2 words a chunk: NB // C chunks fit its digest slots, so the descriptor rides there)
SHAPE_BYTES = shape_bytes()
DIGESTS_AT = 8 * (ROUND_META_WORDS + DESC_HEAD)
PACED = dict(uplink=400e3, downlink=400e3, slot_seconds=0.01)  # 4 chunks a stage: rounds of several stages


def agree(flag: bool) -> bool:
    v = np.array([1 if flag else 0], dtype=np.int32)
    out = np.empty(1, dtype=np.int32)
    COMM.Allreduce(v, out, op=MPI.MIN)
    return bool(out[0])


def payload_of(rank: int, rnd: int = 0) -> np.ndarray:
    return np.random.default_rng(1000 * rnd + rank).integers(0, 256, NB, dtype=np.uint8)


def rounds(
    faults: list[Fault], privacy: str, paced: bool, n_rounds: int = 1, out: np.ndarray | None = None
) -> tuple[list, float, dict]:
    """Run `n_rounds` rounds with BAD wrapped in the faults (receiving into `out` when given); return this
    rank's results, the slowest round's wall time and what the wrapper injected (on BAD)."""
    base = MPITransport(COMM)
    net = FaultyTransport(base, faults) if R == BAD else base
    cfg = SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=1.0, privacy=privacy, **(PACED if paced else {}))
    eng = SwarmEngine(net, cfg)
    res, slowest = [], 0.0
    for k in range(n_rounds):
        t0 = time.monotonic()
        res.append(eng.disseminate(payload_of(R, k), out=out))
        slowest = max(slowest, time.monotonic() - t0)
    injected = dict(net.injected) if isinstance(net, FaultyTransport) else {}
    eng.close()
    base.close()
    return res, slowest, injected


def honest_agree(res, rnd: int = 0) -> tuple[bool, list[int]]:
    """Every honest rank holds the same participants, every honest rank among them, and each participant's
    bytes equal to what its owner published."""
    mask = np.zeros(N, dtype=np.int64)
    mask[res.participants] = 1
    allm = np.empty((N, N), dtype=np.int64)
    COMM.Allgather(mask, allm)
    ok = all(np.array_equal(allm[HONEST[0]], allm[r]) for r in HONEST)
    parts = np.flatnonzero(allm[HONEST[0]]).tolist()
    ok &= set(HONEST) <= set(parts)
    if R in HONEST:
        ok &= all(np.array_equal(res.updates[u], payload_of(u, rnd)) for u in parts)
    return ok, parts


def named(values: list[int]) -> set[int]:
    """The union over honest ranks of a per-rank list of rank ids (sent as a mask: nothing is pickled)."""
    mask = np.zeros(N, dtype=np.int64)
    if R in HONEST:
        mask[values] = 1
    tot = np.empty(N, dtype=np.int64)
    COMM.Allreduce(mask, tot, op=MPI.SUM)
    return set(np.flatnonzero(tot).tolist())


@pytest.mark.parametrize("privacy", ["none", "full"])
def test_forged_relays_are_refused_and_their_sender_banned(privacy):
    """BAD replaces every data message it sends by bytes of the right length (0x71: float32 ~1.2e30)."""
    (res,), slowest, inj = rounds([Fault("forge", channel="data")], privacy, paced=True)
    ok, parts = honest_agree(res)
    ok &= BAD not in parts  # nobody ever got a true chunk of BAD: its neighbours all banned it, it left
    ok &= named(res.stats["bad_senders"]) == {BAD}
    refused = np.array([res.stats["refused_bytes"] if R in HONEST else 0], dtype=np.int64)
    tot = np.empty(1, dtype=np.int64)
    COMM.Allreduce(refused, tot, op=MPI.SUM)
    ok &= tot[0] > 0
    ok &= inj.get("forge", 0) > 0 if R == BAD else True
    ok &= slowest < 60
    assert agree(ok)


@pytest.mark.parametrize("privacy", ["none", "full"])
def test_forged_chunks_never_stay_in_a_caller_output(privacy):
    """out=: chunks are received straight into the caller's rows, a rank's own chunks coming back (hidden
    protocol) into its own row; BAD's forged copies are refused and every row an honest rank keeps is exact."""
    out = np.zeros((N, NB), dtype=np.uint8)
    (res,), _, inj = rounds([Fault("forge", channel="data")], privacy, paced=True, out=out)
    ok, parts = honest_agree(res)
    if R in HONEST:
        ok &= all(np.array_equal(out[u], payload_of(u)) for u in parts)
        ok &= np.array_equal(out[R], payload_of(R))
        ok &= all(np.shares_memory(res.updates[u], out[u]) for u in parts if u != R)
    ok &= inj.get("forge", 0) > 0 if R == BAD else True
    assert agree(ok)


@pytest.mark.parametrize("paced", [False, True])
@pytest.mark.parametrize("privacy", ["none", "full"])
def test_an_owner_whose_descriptor_lies_is_left_out_everywhere(privacy, paced):
    """BAD publishes digests that do not match its update (its descriptor's digest words flipped)."""
    lie = Fault("corrupt", channel="ctrl", offset=DIGESTS_AT, stride=8, nbytes=SHAPE_BYTES)
    (res,), slowest, inj = rounds([lie], privacy, paced)
    ok, parts = honest_agree(res)
    ok &= parts == HONEST
    ok &= named(res.stats["bad_senders"]) == {BAD}  # each honest receiver of BAD's chunks refused them
    ok &= inj.get("corrupt", 0) > 0 if R == BAD else True
    ok &= slowest < 60
    assert agree(ok)


@pytest.mark.parametrize("privacy", ["none", "full"])
def test_a_descriptor_replayed_from_an_earlier_round_is_refused(privacy):
    """BAD contributes its round-0 shape and descriptor again in round 1: every rank refuses it and leaves BAD out
    (a minority whose round words differ in the round id alone), and BAD is told (ShapeMismatchError)."""
    base = MPITransport(COMM)
    net = FaultyTransport(base, [Fault("replay", channel="ctrl", nbytes=SHAPE_BYTES)]) if R == BAD else base
    eng = SwarmEngine(net, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=1.0, privacy=privacy))
    r0 = eng.disseminate(payload_of(R, 0))
    r1, err = None, ""
    try:
        r1 = eng.disseminate(payload_of(R, 1))
    except ShapeMismatchError as e:
        err = str(e)
    ok0, parts0 = honest_agree(r0, 0)
    ok = ok0 and parts0 == list(range(N)) and r0.stats["bad_descriptors"] == []
    mask = np.zeros(N, dtype=np.int64)
    if R == BAD:
        mask[HONEST] = 1  # the bad rank does not vote
        ok &= r1 is None and "round 0's" in err and "its round 1" in err
        ok &= net.injected.get("replay", 0) == 1
    else:
        mask[r1.participants] = 1
        ok &= not err and r1.stats["bad_descriptors"] == [BAD] and BAD in r1.stats["excluded"]
        ok &= all(np.array_equal(r1.updates[u], payload_of(u, 1)) for u in HONEST)
    allm = np.empty((N, N), dtype=np.int64)
    COMM.Allgather(mask, allm)
    ok &= all(np.flatnonzero(allm[r]).tolist() == HONEST for r in range(N))
    eng.close()
    base.close()
    assert agree(ok)


@pytest.mark.parametrize("privacy", ["none", "full"])
def test_a_descriptor_with_a_non_finite_weight_leaves_its_owner_out(privacy):
    """BAD publishes a NaN FedAvg weight: every rank sees the same descriptor and leaves BAD out (named),
    instead of every rank raising; the honest ranks agree bit for bit."""
    base = MPITransport(COMM)
    eng = SwarmEngine(base, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=1.0, privacy=privacy))
    res = eng.disseminate(payload_of(R), weight=float("nan") if R == BAD else 1.0)
    ok, parts = honest_agree(res)
    ok &= parts == HONEST and res.stats["bad_descriptors"] == [BAD]
    ok &= bool(np.all(np.isfinite(res.weights)))
    eng.close()
    base.close()
    assert agree(ok)
