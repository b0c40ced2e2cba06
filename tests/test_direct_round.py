"""The direct exchange's rule (swarm.budget.direct_round) and its stage in the sans-IO core."""

from __future__ import annotations

import numpy as np
import pytest

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.errors import ConfigError
from fltorrent_hpc.swarm.budget import chunk_budgets, direct_round
from fltorrent_hpc.swarm.round import BT, SwarmRound

MiB = 2**20


def test_rule_small_or_even_links_without_privacy():
    cfg = SwarmConfig(privacy="none", direct_bytes="1MiB")
    assert direct_round(cfg, 4, MiB)
    assert not direct_round(cfg, 4, MiB + 1)  # larger, link rates unknown: the swarm
    assert direct_round(cfg, 4, 64 * MiB, np.zeros(4))  # all unpaced: even
    assert direct_round(cfg, 4, 64 * MiB, np.array([1e9, 1.1e9, 1.2e9, 1.0e9]))  # within 1.25x
    assert not direct_round(cfg, 4, 64 * MiB, np.array([1e9, 2e9, 3e9, 4e9]))  # uneven: fast peers relay
    assert not direct_round(cfg, 4, 64 * MiB, np.array([0, 2e9, 3e9, 4e9]))  # partly unknown: the swarm
    # uneven links: direct only up to the measured crossover (UNEVEN_DIRECT_BYTES), whatever direct_bytes allows
    big = SwarmConfig(privacy="none", direct_bytes="4MiB")
    uneven = np.array([50e6, 100e6, 150e6, 200e6])
    assert direct_round(big, 4, MiB, uneven) and direct_round(big, 4, MiB, np.array([0, 2e9, 3e9, 4e9]))
    assert not direct_round(big, 4, 2 * MiB, uneven) and not direct_round(big, 4, 4 * MiB, uneven)
    assert direct_round(big, 4, 4 * MiB) and direct_round(big, 4, 4 * MiB, np.zeros(4))  # unknown or even
    assert not direct_round(cfg, 1, MiB) and not direct_round(cfg, 4, 0)


def test_privacy_or_zero_knob_never_direct():
    assert not direct_round(SwarmConfig(privacy="full"), 4, 1024, np.zeros(4))
    assert not direct_round(SwarmConfig(privacy="lags"), 4, 1024, np.zeros(4))
    assert not direct_round(SwarmConfig(privacy="none", direct_bytes=0), 4, 1024, np.zeros(4))
    assert SwarmConfig(direct_bytes="4MiB").direct_bytes == 4 * MiB
    with pytest.raises(ConfigError):
        SwarmConfig(direct_bytes=-1)


def _round(n: int, K: int, direct: bool, privacy: str = "none") -> SwarmRound:
    cfg = SwarmConfig(privacy=privacy, chunk_bytes=1024, degree=3)
    b = chunk_budgets(np.full(n, 4096.0), 1024, 1.0)  # 4 chunks a slot
    return SwarmRound(cfg, n, K, b, b, seed=3, direct=direct)


def test_direct_stage_moves_every_chunk_once_from_its_owner():
    n, K = 6, 5
    rnd = _round(n, K, direct=True)
    st = rnd.next_stage()
    assert st.phase == BT and st.size == n * (n - 1) * K  # budgets do not bound it
    assert np.all(st.sender == st.chunk // K) and np.all(st.sender != st.receiver)
    assert np.unique(st.receiver * n * K + st.chunk).size == st.size
    rnd.complete(st)
    assert rnd.done and rnd.reconstructable().all() and rnd.stage == 1


def test_direct_stage_leaves_what_did_not_arrive_to_bittorrent():
    n, K = 5, 4
    rnd = _round(n, K, direct=True)
    st = rnd.next_stage()
    lost = (st.sender == 1) & (st.receiver == 2)
    rnd.complete(st, ~lost)
    assert not rnd.done and not rnd.direct_due
    for _ in range(20):
        if rnd.done:
            break
        rnd.complete(rnd.next_stage())
    assert rnd.done and rnd.have[2, K : 2 * K].all()


def test_direct_only_where_asked_and_without_warmup():
    assert not _round(5, 4, direct=False).direct_due
    assert not _round(5, 4, direct=True, privacy="full").direct_due  # a privacy round starts in its warm-up


def test_runs_are_split_alike_on_both_sides():
    from fltorrent_hpc.runtime.engine import _runs

    peer = np.array([1, 1, 1, 1, 1, 2, 2, 2])
    chunk = np.array([0, 1, 2, 3, 4, 10, 11, 13])
    assert _runs(peer, chunk, 10) == [(1, 0, 0, 5), (2, 1, 0, 2), (2, 1, 3, 1)]
    assert _runs(peer, chunk, 10, 2) == [(1, 0, 0, 2), (1, 0, 2, 2), (1, 0, 4, 1), (2, 1, 0, 2), (2, 1, 3, 1)]
