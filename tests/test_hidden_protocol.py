"""The hidden protocol (the default for privacy "full"): whole-round attribution at chance, its audit, its cost.

Per-stage invariants (first hops to non-neighbour mixers, forwards only by mixers, owners never serving a
chunk before it came back) are checked on random rounds in test_swarm_invariants.py; here a simulated
round is attacked by every registered attack over the whole round, as an honest-but-curious peer sees it.
"""

from __future__ import annotations

import numpy as np
import pytest

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.privacy.audit import audit_trace
from fltorrent_hpc.privacy.cli import evaluate_trace
from fltorrent_hpc.runtime.simulator import simulate

N, K, C = 48, 12, 1024
LINKS = (20e3, 40e3)  # bytes/s: a few chunks per 1 s slot


def run(privacy: str, protocol: str, seed: int):
    cfg = SwarmConfig(chunk_bytes=C, privacy=privacy, protocol=protocol, degree=5, seed=seed)
    return simulate(cfg, N, K * C, uplink=LINKS, downlink=(40e3, 60e3), trace=True)


@pytest.fixture(scope="module")
def rounds():
    return {
        (v, s): run(*p, s) for s in (1, 2) for v, p in {"none": ("none", "paper"), "hidden": ("full", "hidden")}.items()
    }


def test_every_attack_over_the_whole_round_stays_near_chance(rounds):
    for seed in (1, 2):
        res = evaluate_trace(rounds["hidden", seed].trace, audit=False)
        base = res["u_baseline_mean"]
        assert res["protocol"] == "hidden" and len(res["u"]) >= 10
        for attack, u in res["u"].items():
            assert u["mean"] <= 1.5 * base, (seed, attack, u["mean"], base)
        # the same attacks on BitTorrent alone attribute (nearly) every update: they are not blind
        none = evaluate_trace(rounds["none", seed].trace, audit=False)
        assert max(u["mean"] for u in none["u"].values()) >= 0.95


def test_round_costs_little_more_than_bittorrent_alone(rounds):
    for seed in (1, 2):
        hid, bt = rounds["hidden", seed].summary, rounds["none", seed].summary
        assert hid["complete_fraction"] == 1.0
        # one mixer hop and one download back per chunk: (n + 1) / (n - 1) of the traffic, plus the seed stages
        assert hid["stages"] <= 1.25 * bt["stages"], (hid["stages"], bt["stages"])


def test_audit_accepts_the_round_and_catches_a_first_hop_to_a_neighbour(rounds):
    tr = rounds["hidden", 1].trace
    assert audit_trace(tr).ok
    t = tr.transfers
    first = np.flatnonzero((t["phase"] == 0) & (t["sender"] == t["chunk"] // K))
    i = int(first[0])
    u = int(t["sender"][i])
    e = np.asarray(tr.edges)
    nbr = int(e[e[:, 0] == u, 1][0]) if (e[:, 0] == u).any() else int(e[e[:, 1] == u, 0][0])
    t["receiver"][i] = nbr  # the owner hands its chunk straight to a neighbour
    rep = audit_trace(tr)
    assert not rep.ok and {"seed_target", "seed_plan"} <= set(rep.failures)


def plan(up: np.ndarray, K: int = 64, seed: int = 3):
    from fltorrent_hpc.swarm.round import SwarmRound

    n = up.size
    cfg = SwarmConfig(chunk_bytes=C, privacy="full", protocol="hidden", degree=2, seed=seed)
    return SwarmRound(cfg, n, K, up, np.full(n, 1 << 20), seed=seed)


@pytest.mark.parametrize("seed", [3, 4])
def test_seed_plan_follows_the_uplinks(seed):
    """Uneven uplinks: the slowest peer's seed phase is its own first hops (it mixes nothing), every peer's
    first hops plus forwards fit the water-filled time, and first public copies sit in proportion to uplinks."""
    K = 64
    up = np.array([11, 23, 35, 47, 11, 23, 35, 47], dtype=np.int64)  # chunks a slot: 400..1600 Mbit/s, 1 MiB
    n = up.size
    rnd = plan(up, K, seed)
    owner = np.arange(n * K) // K
    assert np.all(rnd.mixer != owner) and np.all(rnd.seeder != owner) and np.all(rnd.seeder != rnd.mixer)
    mixed = np.bincount(rnd.mixer, minlength=n)
    assert mixed.sum() == n * K and np.all(mixed[up == up.min()] == 0)
    # the seed phase's floor: the slowest peer's own first hops, or all first hops and forwards over the uplinks
    floor = max(K / up.min(), 2 * n * K / up.sum())
    slots = (K + mixed) / up
    assert slots.max() <= 1.05 * floor, (slots, floor)
    assert 2 * K / up.min() > 1.5 * floor  # an equal plan (everyone mixes K) takes 2 K / U_min
    share = np.bincount(rnd.seeder, minlength=n) / (n * K)
    assert np.abs(share - up / up.sum()).max() < 0.05, share


def test_even_uplinks_keep_equal_blocks_and_one_seed_per_block():
    K, r = 64, SwarmConfig().seed_peers
    rnd = plan(np.full(6, 20, dtype=np.int64), K)
    mixed = np.bincount(rnd.mixer, minlength=6)
    assert np.all(mixed == K)  # each peer mixes one block per permutation
    blocks = rnd.mixer.reshape(6, K) * 1000 + rnd.seeder.reshape(6, K)
    for u in range(6):  # r contiguous blocks of K / r chunks, each with its own mixer and seed
        cuts = np.flatnonzero(np.diff(blocks[u])) + 1
        assert set(cuts.tolist()) <= {K * b // r for b in range(1, r)}
