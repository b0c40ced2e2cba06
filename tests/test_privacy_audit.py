"""Auditable tracker: commit-then-reveal, verification of honest rounds, and detection of tampered logs."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fltorrent_hpc.privacy.audit import (
    Commitment,
    Recomputed,
    RoundLog,
    audit_trace,
    commit,
    new_salt,
    round_log,
    verify,
)

SALT = bytes(range(32))


@pytest.fixture(scope="module")
def sim_round():
    from fltorrent_hpc.config import SwarmConfig
    from fltorrent_hpc.runtime.simulator import simulate

    c = 1024
    cfg = SwarmConfig(protocol="paper", chunk_bytes=c, privacy="full", degree=4, seed=11)
    return simulate(cfg, 20, 20 * c, uplink=(3 * c, 5 * c), downlink=(8 * c, 12 * c), warmup_only=True).trace


@pytest.fixture()
def honest(sim_round):
    log = round_log(sim_round, SALT)
    return commit(log.seed, SALT), log


def test_commitment_binds_and_hides():
    a, b = commit(7, SALT), commit(8, SALT)
    assert a != b and len(a.digest) == 64
    assert commit(7, SALT) == a
    assert commit(7, new_salt()) != a  # a fresh salt hides the seed even when seeds are small
    with pytest.raises(ValueError):
        commit(7, b"short")


def test_honest_simulated_round_verifies(honest, sim_round):
    c, log = honest
    rep = verify(c, log)
    assert rep.ok and not rep.fail_open, rep.details
    for name in ("commitment", "overlay", "lags", "spray_plan", "adjacency", "availability", "redundant"):
        assert name in rep.checked
    for name in ("upload_cap", "download_cap", "tau", "gating", "throttle"):
        assert name in rep.checked
    assert audit_trace(sim_round).ok


def test_log_survives_publication(honest, tmp_path):
    c, log = honest
    path = log.save(tmp_path / "round.npz")
    back = RoundLog.load(path)
    assert back.seed == log.seed and back.salt == log.salt and back.config == log.config
    assert verify(c, back).ok


def _tamper(log: RoundLog, **cols) -> RoundLog:
    out = copy.deepcopy(log)
    for k, fn in cols.items():
        out.directives[k] = fn(out.directives[k].copy())
    return out


def _first_warmup(log: RoundLog) -> int:
    return int(np.flatnonzero(log.directives["phase"] == 1)[0])


@pytest.mark.parametrize(
    "what, expect",
    [
        ("seed", "commitment"),
        ("edge", "overlay"),
        ("lag", "lags"),
        ("non_neighbour", "adjacency"),
        ("duplicate", "redundant"),
        ("unheld", "availability"),
        ("early_owner", "gating"),
        ("spray_to_neighbour", "spray_target"),
        ("overload", "upload_cap"),
        ("no_budget", "recompute"),
    ],
)
def test_tampered_log_fails_and_fails_open(honest, what, expect):
    c, log = honest
    n, K = log.n_peers, log.chunks_per_peer
    d = log.directives
    adj = np.zeros((n, n), bool)
    adj[log.edges[:, 0], log.edges[:, 1]] = adj[log.edges[:, 1], log.edges[:, 0]] = True
    i = _first_warmup(log)
    if what == "seed":
        bad = copy.deepcopy(log)
        bad.seed += 1
    elif what == "edge":
        bad = copy.deepcopy(log)
        bad.edges = bad.edges[1:]  # the tracker hides one overlay edge
    elif what == "lag":
        bad = copy.deepcopy(log)
        bad.lag = (bad.lag + 1) % 3
    elif what == "non_neighbour":
        s = int(d["sender"][i])
        far = int(np.flatnonzero(~adj[s] & (np.arange(n) != s))[0])
        bad = _tamper(log, receiver=lambda a: np.where(np.arange(a.size) == i, far, a))
    elif what == "duplicate":
        bad = copy.deepcopy(log)
        for k in bad.directives:
            bad.directives[k] = np.append(bad.directives[k], bad.directives[k][i])
    elif what == "unheld":
        s = int(d["sender"][i])
        # a chunk of an update the sender never held during the warm-up and that is not its own
        held = set(d["chunk"][d["receiver"] == s].tolist())
        c2 = next(x for x in range(n * K) if x not in held and x // K != s)
        bad = _tamper(log, chunk=lambda a: np.where(np.arange(a.size) == i, c2, a))
    elif what == "early_owner":
        j = int(np.flatnonzero((d["phase"] == 1) & (d["stage"] == d["stage"][d["phase"] == 1].min()))[0])
        s = int(d["sender"][j])
        bad = _tamper(log, chunk=lambda a: np.where(np.arange(a.size) == j, s * K + K - 1, a))
    elif what == "spray_to_neighbour":
        j = int(np.flatnonzero(d["phase"] == 0)[0])
        s = int(d["sender"][j])
        nb = int(np.flatnonzero(adj[s])[0])
        bad = _tamper(log, receiver=lambda a: np.where(np.arange(a.size) == j, nb, a))
    elif what == "overload":
        bad = copy.deepcopy(log)
        bad.up_budget = np.ones_like(bad.up_budget)  # the log claims budgets the directives exceed
    elif what == "no_budget":
        bad = copy.deepcopy(log)
        bad.down_budget = np.zeros_like(bad.down_budget)  # a log the swarm core cannot even set up
    rep = verify(c, bad)
    assert not rep.ok and rep.fail_open
    assert expect in rep.failures, rep.details


def test_verification_against_an_injected_recompute():
    # a three-peer path 0-1-2 with K = 2: peer 1 relays peer 0's chunk to 2 after receiving it
    edges = np.array([[0, 1], [1, 2]])
    d = {
        "stage": np.array([0, 1]),
        "sender": np.array([0, 1]),
        "receiver": np.array([1, 2]),
        "chunk": np.array([0, 0]),
        "phase": np.array([1, 1]),
        "ok": np.array([True, True]),
    }
    cfg = {"privacy": "spray", "degree": 1, "tau": 1, "spray_ratio": 0.0}
    log = RoundLog(3, SALT, 3, 2, cfg, edges, np.zeros(3, int), np.ones(3, int), np.ones(3, int), d)
    c = commit(3, SALT)

    def recompute(lg: RoundLog) -> Recomputed:
        return Recomputed(edges=edges)

    assert verify(c, log, recompute).ok
    swapped = copy.deepcopy(log)
    swapped.directives["stage"] = np.array([1, 0])  # peer 1 would relay a chunk before it has it
    rep = verify(c, swapped, recompute)
    assert "availability" in rep.failures
    retry = copy.deepcopy(log)
    for k, v in {"stage": 2, "sender": 1, "receiver": 2, "chunk": 0, "phase": 1, "ok": False}.items():
        retry.directives[k] = np.append(retry.directives[k], v)
    assert verify(c, retry, recompute).ok  # a logged retry (ok = False) is not a redundant delivery
    assert not verify(Commitment("0" * 64), log, recompute).ok
