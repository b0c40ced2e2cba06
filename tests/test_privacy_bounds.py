"""Eq. 1 / Eq. 2 / Eq. 3-5 evaluated on hand-built traces with values worked out by hand."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from fltorrent_hpc.privacy import check_eq1, eval_collusion, eval_eq2
from fltorrent_hpc.privacy.observations import synthetic_trace


def cols(items: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    """(stage, sender, receiver, chunk, phase, O_u, B_u) tuples -> transfer columns."""
    a = np.array(items, dtype=np.int64).reshape(-1, 7)
    keys = ("stage", "sender", "receiver", "chunk", "phase", "sender_owned", "sender_buffer")
    return {k: a[:, i] for i, k in enumerate(keys)}


def test_eq1_counts_violations_throttle_and_gate_exceptions_separately():
    K, k = 10, 4
    items = [
        (0, 0, 1, 0 * K, 1, 1, 4),  # r0: O/B = 1/4 = kappa/k: holds
        (0, 1, 0, 1 * K, 1, 1, 3),  # r1: 1/3 > 1/4 and no release: violation
        (1, 3, 2, 3 * K, 1, 2, 10),  # r2: O = 2 > kappa: throttle violation
        (2, 2, 3, 2 * K, 1, 1, 2),  # r3: over the cap, but sender 2 released at stage 1 (B < k): exception
        (0, 2, 3, 2 * K + 1, 1, 1, 2),  # r4: same sender before its release: violation
        (0, 3, 2, 0 * K + 5, 1, 0, 1),  # r5: relays only
        (3, 0, 1, 0 * K + 2, 1, -1, -1),  # r6: writer did not record O/B
        (0, 0, 2, 0 * K + 3, 0, 1, 1),  # spray hop: not a warm-up transfer
        (1, 1, 0, 3 * K + 1, 1, 1, 8),  # r8: relay by a sender whose owner window is open (1/8: holds)
    ]
    tr = synthetic_trace(
        4,
        K,
        [(0, 1), (2, 3), (0, 2)],
        cols(items),
        cover_k=k,
        gate_releases={"stage": [1], "peer": [2], "chunk": [2 * K]},
    )
    e = check_eq1(tr)
    assert e.cap == pytest.approx(0.25)
    assert (e.checked, e.unchecked) == (7, 1)
    assert e.violations == 2 and e.throttle_violations == 1
    assert e.violation_rows.tolist() == [1, 2, 4]
    assert e.gate_releases == 1 and e.gate_exception_transfers == 1
    assert e.max_ratio == pytest.approx(0.5)
    assert e.owner_sent == 5  # r0..r4 are sent by their owners
    assert e.expected_owner_sent == pytest.approx(1 / 4 + 1 / 3 + 2 / 10 + 1 / 2 + 1 / 2 + 1 / 8)
    assert (e.open_transfers, e.open_owner_sent) == (6, 5)
    assert e.open_expected == pytest.approx(e.expected_owner_sent)
    assert e.gating and not e.holds


def eq2_trace():
    K = 10
    items = [
        (0, 0, 2, 0 * K + 0, 0, 1, 1),  # sprays: 0 -> 2, 0 -> 3, 1 -> 2 (non-neighbours)
        (0, 0, 3, 0 * K + 1, 0, 1, 1),
        (0, 1, 2, 1 * K + 0, 0, 1, 1),
        (1, 2, 3, 2 * K + 0, 1, 1, 2),  # O/B = 1/2 > Eq. 2 bound of sender 2 (1/3): violation
        (2, 3, 2, 3 * K + 0, 1, 1, 4),  # 1/4 <= 1/3
        (2, 1, 0, 2 * K + 1, 1, 0, 3),
    ]
    return synthetic_trace(4, K, [(0, 1), (2, 3)], cols(items), lag=[0, 1, 0, 2], lag_slots=3, spray_ratio=0.2)


def test_eq2_from_actual_spray_mass_lags_and_degree():
    e = eval_eq2(eq2_trace())
    assert e.sigma_sent.tolist() == [2, 1, 0, 0]
    assert e.spray_received.tolist() == [0, 0, 2, 1]
    assert e.leaders.tolist() == [0, 1, 0, 1]  # peer 1 lags behind 0, peer 3 behind 2
    np.testing.assert_allclose(e.bound, [1, 1 / 2, 1 / 3, 1 / 3])
    np.testing.assert_allclose(e.mu, [0, 0, 1.5, 1.5])  # sigma_v / (n - 1 - |N(v)|) summed over sprayers
    assert e.p_lead == pytest.approx(1 / 3)
    np.testing.assert_allclose(e.bound_expected, [0.75, 0.75, 1 / (1 + 1.5 + 1 / 3), 1 / (1 + 1.5 + 1 / 3)])
    assert e.bound_paper == pytest.approx(1 / (1 + 2 + 1 / 3))  # sigma = floor(0.2 * 10), mean degree 1
    assert e.violations == 1 and e.violating_senders == 1
    np.testing.assert_allclose(e.realized, [np.nan, np.nan, 0.5, 0.25])
    assert e.max_bound == 1.0


def test_eq2_epsilon_loosens_the_bound_and_sets_eta():
    tight, loose = eval_eq2(eq2_trace(), epsilon=0.0), eval_eq2(eq2_trace(), epsilon=0.5)
    assert np.all(loose.bound >= tight.bound)
    assert loose.bound[2] == pytest.approx(1 / (1 + 0.5 * 2))
    assert loose.eta[2] == pytest.approx(np.exp(-0.25 * 1.5 / 2) + np.exp(-0.25 * (1 / 3) / 2))
    with pytest.raises(ValueError):
        eval_eq2(eq2_trace(), epsilon=1.0)


def test_eq2_paper_worked_example():
    # PAPER.md §4.4: sigma = 41, m = 10, T_lag = 3, q = 1, eps -> 0, kappa = 1 gives about 2.2%
    g = nx.random_regular_graph(10, 60, seed=0)
    tr = synthetic_trace(
        60, 206, np.array(g.edges()), cols([]), spray_ratio=0.2, lag_slots=3, lag=np.zeros(60, np.int64)
    )
    e = eval_eq2(tr)
    assert e.bound_paper == pytest.approx(1 / (1 + 41 + 10 / 3))
    assert round(100 * e.bound_paper, 1) == 2.2


def collusion_trace(k: int):
    K = 10
    items = [
        (0, 0, 1, 0 * K + 0, 1, 0, 1),  # peer 1 receives 3 chunks from coalition member 0 ...
        (0, 0, 1, 0 * K + 1, 1, 0, 1),
        (0, 0, 1, 0 * K + 2, 1, 0, 1),
        (0, 2, 1, 2 * K + 0, 1, 0, 1),  # ... and 1 from honest peer 2: rho_1 = 3/4
        (1, 1, 0, 1 * K + 0, 1, 1, 5),  # then serves its own chunk to member 0 with O = 1, X = 4
    ]
    return synthetic_trace(4, K, [(0, 1), (1, 2)], cols(items), cover_k=k)


def test_collusion_bounds_eq3_to_eq5():
    c0 = eval_collusion(collusion_trace(2), np.array([0]), phi=0.0)
    c1 = eval_collusion(collusion_trace(2), np.array([0]), phi=1.0)
    assert c1.rho[1] == pytest.approx(0.75)
    assert c0.theta_max == pytest.approx(1 / 5) and c0.eq3_max == pytest.approx(1 / 5)
    assert c1.theta_max == pytest.approx(1 / 2) and c1.eq3_max == pytest.approx(1 / 2)  # X_eff = 1
    assert c0.over_cap == 0 and c1.over_cap == 0  # kappa/k = 1/2
    assert c1.eq5_mean == pytest.approx(1 / 2) and c1.owner_seen_rate == 1.0
    # with k = 4 the filtered posterior (1/2) beats the kappa/k cap (1/4): the claim fails and is reported
    assert eval_collusion(collusion_trace(4), np.array([0]), phi=1.0).over_cap == 1
    with pytest.raises(ValueError):
        eval_collusion(collusion_trace(2), np.array([0]), phi=2.0)


@pytest.fixture(scope="module")
def full_round():
    from fltorrent_hpc.config import SwarmConfig
    from fltorrent_hpc.runtime.simulator import simulate

    c = 1024
    cfg = SwarmConfig(chunk_bytes=c, privacy="full", degree=4, seed=5, protocol="paper")
    return simulate(cfg, 24, 20 * c, uplink=(3 * c, 5 * c), downlink=(8 * c, 12 * c), warmup_only=True).trace


def test_simulated_full_round_satisfies_eq1(full_round):
    e = check_eq1(full_round)
    assert e.checked > 0 and e.unchecked == 0
    assert e.holds and e.max_ratio <= e.cap + 1e-12
    e2 = eval_eq2(full_round)
    assert e2.spray_received.sum() == e2.sigma_sent.sum() == 24 * 4  # floor(0.2 * 20) per owner
    assert e2.violations == 0  # with gating every owner send happens at B_u >= k, far above Eq. 2's mass
