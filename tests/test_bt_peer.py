"""PeerBT: every peer deciding its own BitTorrent passes from local knowledge reproduces the simulator.

The driver below plays the neighbour exchanges in-process, the way engine_bt.py plays them over MPI, on
sparse overlays (degree well below n) so neighbour-only knowledge is really exercised.
"""

from __future__ import annotations

import numpy as np
import pytest

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.swarm import SwarmRound
from fltorrent_hpc.swarm.bt_peer import PeerBT, pack_bits, unpack_bits
from fltorrent_hpc.swarm.stage import BT


def drive_peers(rnd: SwarmRound, peers: list[PeerBT], leave_at: dict[int, list[int]] | None = None) -> int:
    """Run rnd to the end, checking each BitTorrent stage against the peers' own decisions; returns stages."""
    n, cfg = rnd.n, rnd.cfg
    while not rnd.done:
        if leave_at and rnd.stage in leave_at:
            rnd.leave(leave_at[rnd.stage])
        st = rnd.next_stage()
        assert st.phase == BT, "the driver plays BitTorrent-only rounds (privacy none)"
        act = rnd.active[:n]
        can = rnd.may_send()
        for pb in peers:
            pb.begin_stage(rnd.stage, act, can)
        mine: list[tuple[int, int, int]] = []
        for p in range(cfg.bt_passes):
            if p:
                for v in range(n):
                    for w in peers[v].neighbours.tolist():
                        peers[v].up_left[w] = peers[w].up_left[w]
            reqs = [pb.requests(p) if act[v] else None for v, pb in enumerate(peers)]
            asks: dict[int, dict[int, np.ndarray]] = {w: {} for w in range(n)}
            for v, rq in enumerate(reqs):
                if rq is not None:
                    for w in np.unique(rq[0]).tolist():
                        asks[w][v] = rq[1][rq[0] == w]
            missing = {v: peers[v].missing for v in range(n)}
            grants = {w: peers[w].grant(p, asks[w], missing) for w in range(n) if act[w]}
            for v, rq in enumerate(reqs):
                if rq is None:
                    continue
                s = rq[0]
                granted = np.zeros(s.size, dtype=bool)
                for w in np.unique(s).tolist():
                    granted[s == w] = grants[w][v]
                keep = peers[v].settle(p, granted)
                for w in np.unique(s[keep]).tolist():
                    peers[w].commit({v: int(np.count_nonzero(s[keep] == w))})
                mine += list(zip(s[keep].tolist(), [v] * int(keep.sum()), rq[1][keep].tolist()))
        sim = list(zip(st.sender.tolist(), st.receiver.tolist(), st.chunk.tolist()))
        assert sorted(mine) == sorted(sim), f"stage {st.index}: peers' decisions differ from the simulator's"
        rnd.complete(st)
        for v in range(n):  # deliveries: own rows, reciprocity, and have-deltas to the neighbours
            got = st.receiver == v
            if got.any():
                peers[v].received(st.sender[got], st.chunk[got])
                for w in peers[v].neighbours.tolist():
                    peers[w].neighbour_has(v, st.chunk[got])
    return rnd.stage


def make_peers(rnd: SwarmRound) -> list[PeerBT]:
    n = rnd.n
    nbr = rnd.nbr.astype(np.int64)
    peers = [
        PeerBT(rnd.cfg, v, nbr, rnd.K, rnd.up, rnd.down, rnd.seed, rnd.have[v], np.zeros(n, np.int64)) for v in range(n)
    ]
    for v in range(n):
        for w in peers[v].neighbours.tolist():
            peers[v].neighbour_has(w, np.flatnonzero(rnd.have[w]))
    return peers


@pytest.mark.parametrize("grant", ["deficit", "reciprocity"])
@pytest.mark.parametrize("n,K,degree,seed", [(12, 5, 3, 1), (25, 9, 4, 7), (6, 40, 2, 3)])
def test_peers_reproduce_the_simulators_bittorrent_stages(n, K, degree, seed, grant):
    cfg = SwarmConfig(privacy="none", degree=degree, seed=seed, bt_grant=grant)
    gen = np.random.default_rng(seed)
    up, down = gen.integers(1, 4, n), gen.integers(2, 7, n)
    rnd = SwarmRound(cfg, n, K, up, down, seed=seed)
    assert drive_peers(rnd, make_peers(rnd)) > 3


def test_endgame_and_peers_leaving():
    cfg = SwarmConfig(privacy="none", degree=3, seed=5, endgame_chunks=30)
    n, K = 15, 8
    rnd = SwarmRound(cfg, n, K, np.full(n, 2), np.full(n, 5), seed=5)
    assert drive_peers(rnd, make_peers(rnd), leave_at={4: [2, 9]}) > 4
    assert not rnd.active[2] and rnd.active[:n].sum() == n - 2


def test_bits_round_trip_in_kernel_layout():
    from fltorrent_hpc.swarm.bt_kernel import pack_rows

    gen = np.random.default_rng(0)
    for size in (0, 1, 63, 64, 65, 200):
        m = gen.random(size) < 0.5
        assert np.array_equal(pack_bits(m), pack_rows(m[None, :])[0])
        assert np.array_equal(unpack_bits(pack_bits(m), size), m)
