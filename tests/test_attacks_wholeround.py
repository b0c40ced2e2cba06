"""Whole-round attacks: public holdings keyed on the protocol, every attack family on hand-made traces where it
must succeed and where it must fail, U against 1/deg on symmetric rounds, and a real simulated round."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest

from fltorrent_hpc.privacy import (
    AdversaryModel,
    bt_start,
    build_evidence,
    observation_window,
    protocol_of,
    public_holdings,
    run_round_attacks,
)
from fltorrent_hpc.privacy.attacks import ATTACKS, PAPER_ATTACKS, random_guess_max
from fltorrent_hpc.privacy.attacks.bayes import bayes_scores, fit_rates
from fltorrent_hpc.privacy.attacks.exclusion import exclusion_scores
from fltorrent_hpc.privacy.attacks.scoring import expected_hits, score_u
from fltorrent_hpc.privacy.attacks.window_count import window_count_scores
from fltorrent_hpc.privacy.cli import attack_main, evaluate_trace
from fltorrent_hpc.privacy.observations import NEVER, synthetic_trace
from fltorrent_hpc.trace import write_trace


def rows_of(items: list[tuple[int, int, int, int, int]]) -> dict[str, np.ndarray]:
    """(stage, sender, receiver, chunk, phase) tuples -> transfer columns, in the given delivery order."""
    a = np.array(items, dtype=np.int64).reshape(-1, 5)
    return {"stage": a[:, 0], "sender": a[:, 1], "receiver": a[:, 2], "chunk": a[:, 3], "phase": a[:, 4]}


def u_of(trace, name: str, window: str | int = "round") -> np.ndarray:
    return run_round_attacks(trace, AdversaryModel(window=window), names=[name])[name].u


def epidemic_trace(protocol: str, n: int = 96, degree: int = 6, K: int = 4, seed: int = 0):
    """A BitTorrent round on a random regular overlay, after a one-chunk-per-hop spray at stage 0.

    "paper": an owner holds its update from the start, sprays each chunk itself to a non-neighbour and
    serves its chunks first.  "hidden": each chunk enters the swarm at a uniformly random peer through a
    uniformly random relay, and its owner fetches it like anyone else; nothing in the round depends on who
    owns what, so every observer's neighbours are exchangeable and no attack can beat 1/deg on average.
    Every stage each peer fetches up to two chunks it lacks from random neighbours that hold them.
    """
    gen = np.random.default_rng(seed)
    g = nx.random_regular_graph(degree, n, seed=seed)
    nbrs = [np.array(sorted(g[v])) for v in range(n)]
    N = n * K
    owner = np.arange(N) // K
    have = np.zeros((n, N), dtype=bool)
    items = []
    if protocol == "paper":
        have[owner, np.arange(N)] = True
    new = np.zeros_like(have)
    for c in range(N):
        u = int(owner[c])
        if protocol == "paper":
            far = np.setdiff1d(np.arange(n), np.append(nbrs[u], u))
            r, x = int(gen.choice(far)), u
        else:
            r = int(gen.integers(n))
            x = int(gen.choice(np.delete(np.arange(n), r)))
        items.append((0, x, r, c, 0))
        new[r, c] = True
    have |= new
    stage = 1
    while not have.all() and stage < 100:
        new = np.zeros_like(have)
        for v in gen.permutation(n):
            avail = np.flatnonzero(have[nbrs[v]].any(axis=0) & ~have[v])
            for c in gen.choice(avail, size=min(2, avail.size), replace=False):
                holders = nbrs[v][have[nbrs[v], c]]
                items.append((stage, int(gen.choice(holders)), int(v), int(c), 2))
                new[v, c] = True
        have |= new
        stage += 1
    priv = "full" if protocol == "hidden" else "spray,lags"  # the hidden protocol runs under privacy "full"
    return synthetic_trace(n, K, np.array(g.edges()), rows_of(items), privacy=priv, protocol=protocol)


def relabel(trace, protocol: str):
    """The same trace, read under another protocol flag."""
    cfg = json.loads(trace.attrs["config"])
    cfg["protocol"] = protocol
    if protocol == "hidden":
        cfg["privacy"] = "full"  # the hidden protocol is what privacy "full" runs
    trace.attrs = dict(trace.attrs, config=json.dumps(cfg))
    return trace


# ----------------------------------------------------------------------------------------- observations


def test_public_holdings_follow_the_protocol_flag():
    K = 2
    # peer 1 receives chunk 0 (peer 0's) at stage 0 and its own chunk 2 back at stage 3 (hidden re-download);
    # peer 0 receives chunk 3 at stage 5, outside a window that ends at stage 5
    items = [(0, 0, 1, 0, 2), (3, 2, 1, 2, 2), (5, 1, 0, 3, 2)]
    paper = synthetic_trace(3, K, [(0, 1), (1, 2)], rows_of(items), privacy="none")
    hidden = synthetic_trace(3, K, [(0, 1), (1, 2)], rows_of(items), privacy="full", protocol="hidden")
    assert protocol_of(paper) == "paper" and protocol_of(hidden) == "hidden"
    peers, chunks = np.array([0, 0, 1, 1, 1, 0]), np.array([0, 1, 0, 2, 3, 3])
    hp, hh = public_holdings(paper), public_holdings(hidden)
    assert hp.since_of(peers, chunks).tolist() == [0, 0, 1, 0, 0, 6]  # own chunks public from the start
    assert hh.since_of(peers, chunks).tolist() == [NEVER, NEVER, 1, 4, NEVER, 6]  # only what was received
    assert public_holdings(hidden, end=5).since_of(np.array([0]), np.array([3])).tolist() == [NEVER]
    assert hp.count_by_update(1)[1].tolist() == [1, 2, 0] and hh.count_by_update(1)[1].tolist() == [1, 0, 0]
    assert hh.count_by_update(4)[1].tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_of(synthetic_trace(3, K, [(0, 1)], rows_of(items), protocol="mystery"))


def test_bittorrent_start_and_the_round_window():
    K = 2
    warm = [(0, 1, 0, 2, 1), (1, 1, 0, 3, 1), (4, 0, 1, 0, 2), (6, 0, 1, 1, 2)]
    tr = synthetic_trace(2, K, [(0, 1)], rows_of(warm))
    assert bt_start(tr) == 4
    win = observation_window(tr)
    assert win.how == "round" and win.end_stage == 7 and win.mask.all()
    assert observation_window(tr, AdversaryModel(window="warmup")).mask.tolist() == [True, True, False, False]
    assert bt_start(synthetic_trace(2, K, [(0, 1)], rows_of(warm[:2]))) is None  # warm-up-only trace
    assert bt_start(synthetic_trace(2, K, [(0, 1)], rows_of([(3, 0, 1, 0, 2)]), privacy="none")) == 3
    ev = build_evidence(tr, AdversaryModel(window="warmup"))
    assert ev.bt is None and ev.held0.sum() == 0  # the warm-up window sees no bitfield


# ------------------------------------------------------------------------------------------- scoring


def test_expected_hits_break_ties_uniformly():
    s = np.array([3.0, 3.0, 1.0, -np.inf, -np.inf, 2.0, 2.0, 2.0, 5.0, 1.0])
    truth = np.array([1, 0, 0, 1, 0, 1, 0, 0, 0, 1], bool)
    starts = np.array([0, 3, 5, 8])
    success, flat = expected_hits(s, truth, starts)
    assert success.tolist() == pytest.approx([0.5, 0.0, 1 / 3, 0.0])
    assert flat.tolist() == [False, False, True, False]  # -inf everywhere is ruled out, not "no information"


def test_random_guess_max_is_above_the_mean_baseline():
    deg = np.full(100, 10)
    mx = random_guess_max(1.0 / deg, deg)
    assert 0.25 < mx < 0.5  # the max of 100 Bin(10, 0.1)/10 draws: 4 hits are likely somewhere
    assert random_guess_max(np.ones(3), np.full(3, 5)) == 1.0


# ------------------------------------------------------------------------- each family where it works


def test_first_sender_over_a_window_skips_the_protected_phase():
    # observer 0, neighbours 1, 2, 3 (owners of updates 1, 2, 3); in the warm-up relays deliver first,
    # from the BitTorrent phase (stage 5) on each owner is the first to deliver its own update
    K = 4
    items = [(0, 2, 0, 1 * K, 1), (1, 3, 0, 2 * K, 1), (2, 1, 0, 3 * K, 1)]
    items += [(5, 1, 0, 1 * K + 1, 2), (5, 2, 0, 2 * K + 1, 2), (5, 3, 0, 3 * K + 1, 2)]
    items += [(6, 3, 0, 1 * K + 2, 2), (6, 1, 0, 2 * K + 2, 2), (6, 2, 0, 3 * K + 2, 2)]
    tr = synthetic_trace(4, K, [(0, 1), (0, 2), (0, 3)], rows_of(items))
    assert u_of(tr, "first_sender")[0] == 0.0
    assert u_of(tr, "first_sender_bt")[0] == 1.0
    assert u_of(tr, "first_sender_bt", window="warmup")[0] == pytest.approx(1 / 3)  # no BT stage: chance


def test_window_count_finds_a_burst_that_whole_round_counting_misses():
    K = 6
    # to observer 0: owner 1 sends 3 chunks of its update in 3 stages; neighbour 2 relays 4 chunks of update 1
    # spread over 90 stages and sends its own update 2 in a burst of 5
    items = [(s, 1, 0, 1 * K + i, 2) for i, s in enumerate((10, 11, 12))]
    items += [(s, 2, 0, 1 * K + 3 + i % 3, 2) for i, s in enumerate((0, 30, 60, 90))]
    items += [(40 + i, 2, 0, 2 * K + i, 2) for i in range(5)]
    tr = synthetic_trace(3, K, [(0, 1), (0, 2)], rows_of(sorted(items)), privacy="none")
    ev = build_evidence(tr)
    u, _ = score_u(ev, window_count_scores(ev, width=20))
    assert u[0] == 1.0
    u_total, _ = score_u(ev, window_count_scores(ev, width=1000))  # one window = the whole round
    assert u_total[0] == 0.5  # update 1: relay 4 > owner 3 (wrong); update 2: right
    assert u_of(tr, "window_count")[0] == 1.0  # the registered width (20 stages)
    with pytest.raises(ValueError):
        window_count_scores(ev, width=0)


def test_timing_uses_have_messages_where_bitfields_say_nothing():
    # hidden protocol: nobody holds anything at BitTorrent start (stage 1); peer 1 re-downloads its own update
    # at stage 1 from peer 4 (not a neighbour of 0), neighbours 2 and 3 get chunks of update 1 only at stage 8;
    # observer 0 sees that through have-messages.  Updates 2 and 3 the other way round.
    K = 2
    items = [(1, 4, 1, 1 * K, 2), (1, 4, 1, 1 * K + 1, 2)]
    items += [(8, 4, 2, 1 * K, 2), (8, 4, 3, 1 * K + 1, 2)]
    items += [(1, 4, 2, 2 * K, 2), (1, 4, 2, 2 * K + 1, 2), (8, 4, 1, 2 * K, 2)]
    items += [(1, 4, 3, 3 * K, 2), (1, 4, 3, 3 * K + 1, 2), (8, 4, 1, 3 * K, 2)]
    edges = [(0, 1), (0, 2), (0, 3), (1, 4), (2, 4), (3, 4)]
    tr = synthetic_trace(5, K, edges, rows_of(sorted(items)), privacy="full", protocol="hidden")
    assert u_of(tr, "timing")[0] == 1.0
    assert u_of(tr, "bitfield")[0] == pytest.approx(1 / 3)  # all bitfields empty at BT start: chance
    assert u_of(tr, "exclusion")[0] == pytest.approx(1 / 3)  # under "hidden" fetching your own rules nothing out


def test_spray_recipient_is_scored_per_sender_target():
    K = 3
    edges = [(0, 1), (1, 2), (2, 3)]  # 0 and 3 are not neighbours
    paper = synthetic_trace(4, K, edges, rows_of([(0, 3, 0, 3 * K, 0), (1, 1, 0, 3 * K, 1)]))
    res = run_round_attacks(paper, names=["spray_recipient"])["spray_recipient"]
    assert res.target[0] == 1.0 and res.targets == 1  # the spray named peer 3's update
    assert res.u[0] == 1.0  # one neighbour: U is trivially 1 (1/deg) -- no spray evidence about it
    relayed = synthetic_trace(
        4, K, edges, rows_of([(0, 3, 0, 2 * K, 0)]), privacy="full", protocol="hidden"
    )  # 3 relays 2's
    res = run_round_attacks(relayed, names=["spray_recipient"])["spray_recipient"]
    assert res.target[0] == 0.0


def test_exposure_names_an_owner_that_serves_what_it_never_announced():
    # a trace generated by the paper's protocol read as "hidden": owners serve their chunks without having
    # received them, which only an owner can do, so elimination names them wherever they served o
    tr = relabel(epidemic_trace("paper", n=48), "hidden")
    ev = build_evidence(tr)
    o, w, d = ev.u_triples()
    served = ev.serve_count(o, w, d) > 0
    owner_served = np.zeros(ev.n * ev.n, bool)
    owner_served[(o * ev.n + d)[served & (w == d)]] = True
    u, _ = score_u(ev, exclusion_scores(ev))
    # every (o, d) where the owner served o during BitTorrent is a hit; the rest fall to chance or better
    assert np.nanmean(u) > 0.8
    assert owner_served.sum() > 0.8 * ev.deg.sum()


def test_bayes_outranks_an_owner_that_broke_a_rule_once():
    # paper round; owner u "asked" observer o for one chunk of its own update (a protocol slip): exclusion now
    # rules u out for (o, u), the Bayesian posterior still prefers u (one contradiction against many)
    tr = epidemic_trace("paper", n=48)
    base = tr.transfers
    nb = tr.neighbors()
    slips = [(o, int(nb[o][0])) for o in range(0, 48, 6)]
    extra = rows_of([(90, o, u, u * tr.chunks_per_peer, 2) for o, u in slips])
    cols = {k: np.concatenate([base[k], extra[k]]) for k in ("stage", "sender", "receiver", "chunk", "phase")}
    tr2 = synthetic_trace(48, tr.chunks_per_peer, tr.edges, cols, privacy="spray,lags")
    ev = build_evidence(tr2)
    ex, by = exclusion_scores(ev), bayes_scores(ev)
    for o, u in slips:
        cand = nb[o]
        d = np.full(cand.size, u)
        oo = np.full(cand.size, o)
        assert ex(oo, cand, d)[cand == u][0] == -np.inf
        s = by(oo, cand, d)
        assert cand[np.argmax(s)] == u and (s == s.max()).sum() == 1
    assert np.nanmean(score_u(ev, by)[0]) == 1.0


def test_fit_rates_recovers_planted_rates_without_the_truth():
    gen = np.random.default_rng(5)
    groups, size = 400, 8
    truth = gen.integers(0, size, groups)
    own = np.zeros((groups, size), bool)
    own[np.arange(groups), truth] = True
    lam_own, lam_oth = np.array([0.2, 6.0]), np.array([3.0, 1.0])
    x = gen.poisson(np.where(own[..., None], lam_own, lam_oth)).reshape(-1, 2).astype(float)
    fit = fit_rates(x, np.arange(groups) * size)
    assert fit.own == pytest.approx(lam_own, rel=0.25) and fit.other == pytest.approx(lam_oth, rel=0.1)


# ----------------------------------------------------------------------- U on symmetric rounds


@pytest.fixture(scope="module")
def epidemics():
    return {p: epidemic_trace(p) for p in ("paper", "hidden")}


def test_paper_protocol_round_is_attributed_by_every_protocol_observation(epidemics):
    res = run_round_attacks(epidemics["paper"])
    inv_deg = 1 / 6
    u = {name: float(np.nanmean(r.u)) for name, r in res.items()}
    for name in ("exclusion", "bayes", "bitfield", "timing"):
        assert u[name] == 1.0, (name, u[name])  # the owner alone holds all of d at BT start and never fetches it
    assert u["first_sender"] > 0.8 and u["first_sender_bt"] > 0.8  # owners seed their update
    assert u["window_count"] > 3 * inv_deg
    assert u["spray_recipient"] == pytest.approx(inv_deg)  # sprays go to non-neighbours: nothing for U
    assert res["spray_recipient"].target[np.isfinite(res["spray_recipient"].target)].min() == 1.0


def test_owner_that_behaves_like_a_non_owner_leaves_every_attack_at_chance(epidemics):
    tr = epidemics["hidden"]
    res = run_round_attacks(tr)
    assert set(res) == set(ATTACKS)
    deg = np.bincount(np.asarray(tr.edges).ravel(), minlength=tr.n_peers)
    inv_deg = float(np.mean(1 / deg))
    items = int(deg.sum())  # 576 (observer, neighbour-owned update) guesses
    tol = 4 * np.sqrt(inv_deg * (1 - inv_deg) / items)  # 4 sigma of a random guesser's mean U
    for name, r in res.items():
        assert abs(np.nanmean(r.u) - inv_deg) < tol, (name, np.nanmean(r.u), inv_deg)
    # the same transfers under the paper's rules: owners would announce their whole update at BitTorrent
    # start (the bitfield names every owner), and an owner that fetched a chunk of its own update from o is
    # ruled out by the paper's elimination -- the protocol flag decides both
    paper = relabel(epidemic_trace("hidden"), "paper")
    assert np.nanmean(u_of(paper, "bitfield")) == 1.0
    ev = build_evidence(paper)
    o, w, d = ev.u_triples()
    fetched = (w == d) & (ev.ask_count(o, w, d) > 0)
    assert fetched.sum() > 50
    assert np.all(exclusion_scores(ev)(o[fetched], w[fetched], d[fetched]) == -np.inf)


# ---------------------------------------------------------------------- a real simulated round, and the CLI


@pytest.fixture(scope="module")
def simulated():
    from fltorrent_hpc.config import SwarmConfig
    from fltorrent_hpc.runtime.simulator import simulate

    c = 1024
    out = {}
    for priv in ("none", "full"):
        cfg = SwarmConfig(chunk_bytes=c, privacy=priv, degree=6, seed=3, protocol="paper")
        out[priv] = simulate(cfg, 40, 20 * c, uplink=(3 * c, 5 * c), downlink=(8 * c, 12 * c)).trace
    return out


def test_simulated_round_without_defences_first_sender_names_owners(simulated):
    res = evaluate_trace(simulated["none"], audit=False)
    assert res["trace"]["window"] == "round"
    assert res["u"]["first_sender"]["mean"] >= 0.95


def test_simulated_full_defences_paper_protocol_leak_over_the_whole_round(simulated):
    tr = simulated["full"]
    assert bt_start(tr) is not None and protocol_of(tr) == "paper"
    whole = evaluate_trace(tr, audit=False)
    warm = evaluate_trace(tr, window="warmup", audit=False)
    base = whole["u_baseline_mean"]
    assert 0.1 < base < 0.2
    # inside the warm-up the paper's attacks stay near or below chance (the paper's result) ...
    for name in PAPER_ATTACKS:
        assert warm["u"][name]["mean"] < 2 * base, name
    # ... while an observer of the whole round attributes (nearly) every neighbour's update (issue 18)
    for name in ("bitfield", "bayes", "timing", "first_sender_bt", "window_count", "count"):
        assert whole["u"][name]["mean"] > 4 * base, (name, whole["u"][name]["mean"])
    assert whole["u"]["bitfield"]["mean"] >= 0.95 and whole["u"]["bayes"]["mean"] >= 0.95


def test_cli_reports_u_and_the_per_target_framing(tmp_path, capsys, epidemics):
    path = write_trace(tmp_path / "e.h5", epidemics["paper"])
    out = tmp_path / "r.json"
    assert attack_main([str(path), "--json", str(out), "--no-audit"]) == 0
    text = capsys.readouterr().out
    assert "U mean%" in text and "target mean%" in text and "protocol paper" in text
    for name in ATTACKS:
        assert name in text
    res = json.loads(out.read_text())
    assert res["trace"]["window"] == "round" and res["protocol"] == "paper"
    assert set(res["u"]) == set(ATTACKS) == set(res["target"])
    for key in ("mean", "max", "abstain"):
        assert key in res["u"]["bayes"]
    assert res["u_baseline_mean"] == pytest.approx(1 / 6) and res["u_random_max"] > res["u_baseline_max"]
    assert 0 < res["target_baseline_mean"] < 1 and res["target_random_max"] >= res["target_baseline_mean"]
    assert set(res["asr_max"]) == set(PAPER_ATTACKS)  # the paper's framing keeps its keys
    assert attack_main([str(path), "--window", "warmup", "--no-audit", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["trace"]["window"] == "cover-equivalent"  # no warm-up: its equivalent span
