"""The direct exchange of small privacy-"none" rounds on real MPI ranks: one stage, bit-exact, and a lying,
silent or dropping rank handled as in the swarm's stages.

.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_direct.py   (any world size)
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.runtime.engine import FOLD_CHUNKS, SwarmEngine
from fltorrent_hpc.transport.faulty import Fault, FaultyTransport
from fltorrent_hpc.transport.mpi import MPITransport

pytestmark = [pytest.mark.mpi(min_size=1), pytest.mark.timeout(120)]

COMM = MPI.COMM_WORLD
C = 1024


def agree(flag: bool) -> bool:
    """True only if every rank's flag is True (assert after all ranks agree, so no rank hangs)."""
    v = np.array([1 if flag else 0], dtype=np.int32)
    out = np.empty(1, dtype=np.int32)
    COMM.Allreduce(v, out, op=MPI.MIN)
    return bool(out[0])


def same_everywhere(words: np.ndarray) -> bool:
    allw = np.empty((COMM.size, words.size), dtype=np.int64)
    COMM.Allgather(np.ascontiguousarray(words, dtype=np.int64), allw)
    return bool(np.all(allw == allw[0]))


def mask(ranks) -> np.ndarray:
    """A fixed-width membership mask, so ranks that disagree fail the check instead of the all-gather."""
    m = np.zeros(COMM.size, dtype=np.int64)
    m[np.asarray(list(ranks), dtype=np.int64)] = 1
    return m


def payload_of(rank: int, nbytes: int, salt: int = 0) -> np.ndarray:
    return np.random.default_rng(rank * 7919 + nbytes + salt).integers(0, 256, nbytes, dtype=np.uint8)


def world(bad: int, *faults: Fault):
    net = MPITransport(COMM)
    return FaultyTransport(net, list(faults)) if COMM.rank == bad and COMM.size > 1 else net


@pytest.mark.parametrize("nbytes", [1, 5 * C + 3, 64 * C])
def test_small_round_is_one_direct_stage(nbytes):
    eng = SwarmEngine(COMM, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=2.0, direct_bytes=64 * C))
    res = eng.disseminate(payload_of(COMM.rank, nbytes), privacy="none")
    ok = all(np.array_equal(res.updates[u], payload_of(u, nbytes)) for u in range(COMM.size))
    ok &= res.participants.tolist() == list(range(COMM.size))
    ok &= res.stats["stages"] == (1 if COMM.size > 1 else 0) and res.stats["peer_decided_stages"] == 0
    K = -(-nbytes // C)
    ok &= res.stats["bytes_recv"] == (COMM.size - 1) * nbytes and K > 0  # every chunk once, straight from its owner
    eng.close()
    assert agree(ok)


def test_privacy_and_uneven_links_keep_the_swarm():
    """Privacy "full" never takes the direct exchange; nor does a large round on uneven uplinks."""
    up = 400e3 * (1 + 3 * COMM.rank / max(COMM.size - 1, 1))
    cfg = SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=2.0, direct_bytes=4 * C, slot_seconds=0.01)
    eng = SwarmEngine(COMM, cfg.replace(uplink=up, downlink=4e6))
    nb = 16 * C
    full = eng.disseminate(payload_of(COMM.rank, nb), privacy="full")
    big = eng.disseminate(payload_of(COMM.rank, nb, 1), privacy="none")
    ok = all(np.array_equal(big.updates[u], payload_of(u, nb, 1)) for u in range(COMM.size))
    ok &= all(np.array_equal(full.updates[u], payload_of(u, nb)) for u in range(COMM.size))
    if COMM.size > 2:  # the swarm ran: stage-clocked or pipelined BitTorrent (the default)
        ok &= all(r.stats["peer_decided_stages"] > 0 or r.stats["pipelined"] for r in (big, full))
    eng.close()
    assert agree(ok)


def test_a_rank_corrupting_every_send_is_left_out_and_the_rest_agree():
    bad = 1 % COMM.size
    net = world(bad, Fault("corrupt", channel="data", stride=C))
    eng = SwarmEngine(net, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=2.0))
    nb = 9 * C
    res = eng.disseminate(payload_of(COMM.rank, nb, 3), privacy="none")
    honest = [r for r in range(COMM.size) if r != bad]
    part = np.zeros(COMM.size, dtype=np.int64)
    part[res.participants] = 1
    if COMM.size == 1:
        ok = np.array_equal(res.updates[0], payload_of(0, nb, 3))
    elif COMM.rank != bad:
        # every receiver refused its chunks and banned it: banned by all, it leaves; nothing honest is lost
        ok = res.participants.tolist() == honest and res.stats["bad_senders"] == [bad]
        ok &= all(np.array_equal(res.updates[u], payload_of(u, nb, 3)) for u in honest)
    else:
        ok = net.injected.get("corrupt", 0) > 0  # the fault really fired
    if COMM.rank == bad and COMM.size > 1:
        part[:] = 0
        part[honest] = 1  # the bad rank does not vote: the honest ranks must agree among themselves
    ok &= same_everywhere(part)
    eng.close()
    assert agree(ok)


@pytest.mark.mpi(min_size=3)
def test_a_silent_rank_is_excluded_and_the_rest_agree():
    silent = COMM.size - 1
    net = world(silent, Fault("silent"))  # never sends its data, its report or its acks
    eng = SwarmEngine(net, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=1.0))
    nb = 7 * C
    res = eng.disseminate(payload_of(COMM.rank, nb, 5), privacy="none")
    live = [r for r in range(COMM.size) if r != silent]
    if COMM.rank != silent:
        ok = res.stats["excluded"] == [silent] and res.participants.tolist() == live
        ok &= all(np.array_equal(res.updates[u], payload_of(u, nb, 5)) for u in live)
        words = res.participants
    else:
        ok = bool(res.stats["silent"])  # it learns from the end frame that the round went on without it
        words = np.asarray(live)
    ok &= same_everywhere(np.asarray(words, dtype=np.int64))
    eng.close()
    net.close()
    assert agree(ok)


@pytest.mark.mpi(min_size=3)
def test_a_dropped_direct_send_is_fetched_from_another_holder():
    """One rank's data to one peer never arrives: the peer names it (directed, then not served) and gets the
    chunks in the swarm's stages from a rank that holds them; every update reaches every rank."""
    bad, victim = 1, 2
    net = world(bad, Fault("drop", channel="data", peer=victim, to_stage=0))
    eng = SwarmEngine(net, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=1.0))
    nb = 6 * C
    res = eng.disseminate(payload_of(COMM.rank, nb, 7), privacy="none")
    ok = all(np.array_equal(res.updates[u], payload_of(u, nb, 7)) for u in range(COMM.size))
    ok &= res.participants.tolist() == list(range(COMM.size))
    ok &= res.stats["stages"] > 1  # the direct stage, then BitTorrent for what it missed
    if COMM.rank == bad:
        ok &= net.injected.get("drop", 0) > 0
    eng.close()
    assert agree(ok)


def test_long_runs_travel_in_pieces(monkeypatch):
    """A run longer than RUN_BYTES goes as several messages (verified while the next one moves); sender and
    receiver split it alike."""
    from fltorrent_hpc.runtime import engine as engine_mod

    monkeypatch.setattr(engine_mod, "RUN_BYTES", 3 * C)
    eng = SwarmEngine(COMM, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=2.0, direct_bytes=64 * C))
    nb = 20 * C + 5  # 21 chunks: runs of 3, 3, ..., 3
    res = eng.disseminate(payload_of(COMM.rank, nb, 9), privacy="none")
    ok = all(np.array_equal(res.updates[u], payload_of(u, nb, 9)) for u in range(COMM.size))
    ok &= res.stats["stages"] == (1 if COMM.size > 1 else 0)
    eng.close()
    assert agree(ok)


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("chunks", [8, FOLD_CHUNKS + 1])
@pytest.mark.parametrize("integrity", ["blake3", "none"])
def test_a_rank_with_another_payload_size_is_left_out_of_the_direct_exchange(integrity, chunks):
    """A rank whose payload is a chunk longer: the others run the direct stage they derived without it, it alone
    raises naming both sizes, and the next round includes it again.  The descriptors ride in the shape's
    all-gather up to FOLD_CHUNKS chunks (or without digests); above, they have an all-gather of their own, in which
    the odd rank still takes part."""
    bad = COMM.size - 1
    eng = SwarmEngine(COMM, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=1.0, integrity=integrity))
    nb = chunks * C
    mine = payload_of(COMM.rank, nb, 11)
    if COMM.rank == bad:
        mine = np.concatenate([mine, np.zeros(C, np.uint8)])
    r0, err = None, ""
    try:
        r0 = eng.disseminate(mine, privacy="none")
    except Exception as e:  # noqa: BLE001 - the odd rank's error is checked below, any other fails the test
        err = f"{type(e).__name__}: {e}"
    honest = [r for r in range(COMM.size) if r != bad]
    if COMM.rank == bad:
        ok = err.startswith("ShapeMismatchError") and f"{nb + C} bytes" in err and str(nb) in err
        words = mask(honest)
    else:
        ok = not err and r0.participants.tolist() == honest and r0.stats["stages"] == 1
        ok &= r0.stats["shape_mismatch"] == [bad] and bad in r0.stats["bad_descriptors"]
        ok &= all(np.array_equal(r0.updates[u], payload_of(u, nb, 11)) for u in honest)
        words = mask(r0.participants)
    ok &= same_everywhere(words)
    r1 = eng.disseminate(payload_of(COMM.rank, nb, 12), privacy="none")
    ok &= r1.participants.tolist() == list(range(COMM.size)) and r1.stats["stages"] == 1
    ok &= all(np.array_equal(r1.updates[u], payload_of(u, nb, 12)) for u in range(COMM.size))
    eng.close()
    assert agree(ok)


@pytest.mark.mpi(min_size=3)
def test_a_fault_aimed_at_a_later_round_strikes_its_direct_stage():
    """The direct stage leaves before any control frame of its round, so the fault-injecting wrapper must learn
    the round from the round's all-gathers: a corrupting fault named for round 1 fires in round 1 (not round 0),
    and there the honest ranks leave the corrupting rank out and agree."""
    bad = 1
    net = world(bad, Fault("corrupt", channel="data", round_id=1, stride=C))
    eng = SwarmEngine(net, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=1.0))
    nb = 5 * C
    r0 = eng.disseminate(payload_of(COMM.rank, nb, 13), privacy="none")
    hit0 = net.injected.get("corrupt", 0) if COMM.rank == bad else 0
    r1 = eng.disseminate(payload_of(COMM.rank, nb, 14), privacy="none")
    honest = [r for r in range(COMM.size) if r != bad]
    ok = r0.participants.tolist() == list(range(COMM.size)) and r0.stats["stages"] == 1
    if COMM.rank == bad:
        ok &= hit0 == 0 and net.injected.get("corrupt", 0) > 0
        words = mask(honest)
    else:
        ok &= r1.participants.tolist() == honest and r1.stats["bad_senders"] == [bad]
        ok &= all(np.array_equal(r1.updates[u], payload_of(u, nb, 14)) for u in honest)
        words = mask(r1.participants)
    ok &= same_everywhere(words)
    eng.close()
    assert agree(ok)


@pytest.mark.mpi(min_size=3)
def test_rounds_in_a_row_with_a_rank_that_never_confirms_the_end():
    """The tracker takes the first confirmation of its end frame and leaves the others queued: later rounds skip
    them as stale frames (never a misbehaving peer), and a rank whose confirmations never come costs nothing."""
    from fltorrent_hpc.runtime.engine import KIND_ACK

    mute = COMM.size - 1
    net = world(mute, Fault("drop", channel="ctrl", code=KIND_ACK))
    eng = SwarmEngine(net, SwarmConfig(chunk_bytes=C, timeout_s=60, stage_timeout_s=1.0))
    nb = 3 * C + 1
    ok = True
    for k in range(6):
        res = eng.disseminate(payload_of(COMM.rank, nb, 20 + k), privacy="none")
        ok &= res.participants.tolist() == list(range(COMM.size)) and res.stats["stages"] == 1
        ok &= not res.stats["misbehaved"] and not res.stats["excluded"]
        ok &= all(np.array_equal(res.updates[u], payload_of(u, nb, 20 + k)) for u in range(COMM.size))
    if COMM.rank == mute:
        ok &= net.injected.get("drop", 0) == 6
    eng.close()
    assert agree(ok)
