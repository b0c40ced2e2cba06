"""The event-driven model of a pipelined BitTorrent phase (runtime/sim_events.py, `sim_model="events"`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.errors import ConfigError
from fltorrent_hpc.runtime.sim_events import capacity_bound, simulate_events
from fltorrent_hpc.runtime.simulator import simulate

C = 2**16
S = 20 * C + 100  # 21 chunks, the last one short

# (peers, uplinks, downlinks (0 = unpaced), overlay degree): even and 4x-spread uplinks, complete and sparse
# overlays, paced downlinks
CASES = [
    (4, np.full(4, 1e7), np.zeros(4), 3),
    (8, 1e7 * (1 + 3 * np.arange(8) / 7), np.zeros(8), 3),
    (6, np.full(6, 1e7), np.full(6, 3e7), 3),
    (16, 1e7 * (1 + np.arange(16) % 4), np.zeros(16), 4),
    (12, np.linspace(1e7, 4e7, 12), np.full(12, 5e7), 3),
]
FACTOR = 1.5  # the model's BitTorrent phase is within this factor of the capacity bound on every case


def cfg(**kw) -> SwarmConfig:
    return SwarmConfig(**{"chunk_bytes": C, "privacy": "none", "seed": 1, **kw})


def test_capacity_bound_by_hand():
    up = np.array([1.0, 2.0, 3.0])
    assert capacity_bound(up, 6) == pytest.approx(max(3 * 2 * 6 / 6, 6 / 1))  # both 6 s
    assert capacity_bound(np.array([10.0, 10.0]), 10) == pytest.approx(1.0)  # S / min(U) = n(n-1)S / sum(U)
    assert capacity_bound(np.array([10.0, 10.0]), 10, np.array([2.0, 5.0])) == pytest.approx(5.0)  # downlink
    assert capacity_bound(np.array([10.0, 10.0]), 10, np.zeros(2)) == pytest.approx(1.0)  # unpaced: no term
    # the hidden protocol: n + 1 uploads a chunk (two seed hops, and the owner's copy back); n updates taken in
    up4 = np.array([1.0, 2.0, 3.0, 4.0])
    assert capacity_bound(up4, 10, hidden=True) == pytest.approx(4 * 5 * 10 / 10)
    assert capacity_bound(up4, 10, np.full(4, 1.0), hidden=True) == pytest.approx(4 * 10 / 1.0)
    assert capacity_bound(up, 6, hidden=True) == pytest.approx(3 * 4 * 6 / 6)
    assert capacity_bound(np.array([10.0, 10.0]), 10, hidden=True) == pytest.approx(1.0)  # n = 2: no hidden hops


def test_hidden_round_near_its_own_bound_on_uneven_uplinks():
    """Seed blocks sized by the mixers' uplinks and BitTorrent in what seed stages leave: privacy full within
    1.25x of the hidden protocol's bound (4 and 8 peers, uplinks 4x apart; 4 peers took 1.85x before both)."""
    for n in (4, 8):
        up = 50e6 * (1 + 3 * np.arange(n) / (n - 1))
        c = cfg(privacy="full", chunk_bytes=1 << 20, slot_seconds=0.25, degree=3)
        r = simulate_events(c, up, np.zeros(n), 64 << 20, latency_s=5e-5, hash_rate=2e9)
        assert r.have.all()
        assert r.round_s <= 1.25 * capacity_bound(up, 64 << 20, hidden=True), (n, r.round_s)


@pytest.mark.parametrize("latency", [0.0, 1e-3])
@pytest.mark.parametrize("n,up,down,degree", CASES)
def test_round_is_above_the_bound_and_within_a_factor(n, up, down, degree, latency):
    r = simulate_events(cfg(degree=degree), up, down, S, window=4, latency_s=latency)
    bound = capacity_bound(up, S, down)
    assert bound <= r.bt_s <= FACTOR * bound, (r.bt_s, bound)
    assert r.have.all()  # every peer ends with every chunk
    assert r.warmup_s == 0.0 and r.round_s == pytest.approx(r.bt_s)  # privacy none: BitTorrent from the start


def test_hidden_protocol_owners_download_their_own_update_back():
    up = 1e7 * (1 + 3 * np.arange(6) / 5)
    c = cfg(privacy="full", slot_seconds=0.1, seed_overlap=False)
    r = simulate_events(c, up, np.zeros(6), S, latency_s=1e-4, hash_rate=1e9)
    assert r.have.all()
    assert r.warmup_stages > 0 and r.warmup_s == pytest.approx(r.warmup_stages * 0.1)
    assert r.round_s == pytest.approx(r.warmup_s + r.bt_s)
    # in BitTorrent every peer (owners included) receives all n updates: n*n*S bytes over the uplinks at least
    assert r.sent_bytes.sum() >= 6 * 6 * S - 6 * S  # minus the seeds' own copies, at most one update each
    # BitTorrent in what the seed stages leave of the uplinks: everything arrives, and sooner
    o = simulate_events(c.replace(seed_overlap=True), up, np.zeros(6), S, latency_s=1e-4, hash_rate=1e9)
    assert o.have.all() and o.round_s < r.round_s
    assert o.sent_bytes.sum() < r.sent_bytes.sum()  # part of BitTorrent ran in the seed stages


def test_deterministic_for_a_seed():
    up, down = CASES[3][1], CASES[3][2]
    a = simulate_events(cfg(degree=4), up, down, S, latency_s=1e-3, hash_rate=2e9)
    b = simulate_events(cfg(degree=4), up, down, S, latency_s=1e-3, hash_rate=2e9)
    assert np.array_equal(a.done_s, b.done_s) and np.array_equal(a.sent_bytes, b.sent_bytes)
    assert (a.transfers, a.duplicates, a.events) == (b.transfers, b.duplicates, b.events)


def test_rates_order_the_round():
    n = 8
    up = 1e7 * (1 + 3 * np.arange(n) / (n - 1))
    base = simulate_events(cfg(degree=3), up, np.zeros(n), S)
    # without latency or hashing, time scales exactly with the links
    double = simulate_events(cfg(degree=3), 2 * up, np.zeros(n), S)
    assert double.bt_s == pytest.approx(base.bt_s / 2, rel=1e-9)
    # a faster slowest peer never slows the round; faster uplinks serve more bytes
    lifted = up.copy()
    lifted[0] = up[1]
    assert simulate_events(cfg(degree=3), lifted, np.zeros(n), S).bt_s <= base.bt_s + 1e-12
    assert base.sent_bytes[-1] > 2 * base.sent_bytes[0]
    assert np.corrcoef(up, base.sent_bytes)[0, 1] > 0.9


def test_window_hides_latency():
    """With one neighbour and a message time equal to a chunk's, one request in flight idles the uplink half
    the time; a window of 4 keeps it busy."""
    up = np.full(2, 1e7)
    lat = C / 1e7
    one = simulate_events(cfg(degree=1), up, np.zeros(2), S, window=1, latency_s=lat)
    four = simulate_events(cfg(degree=1), up, np.zeros(2), S, window=4, latency_s=lat)
    assert four.bt_s < 0.6 * one.bt_s
    assert four.bt_s >= capacity_bound(up, S)


def test_verification_costs_time():
    up = np.full(4, 1e7)
    free = simulate_events(cfg(degree=3), up, np.zeros(4), S)
    slow_hash = simulate_events(cfg(degree=3), up, np.zeros(4), S, hash_rate=1e6)  # verifying is the bottleneck
    assert slow_hash.bt_s > 3 * free.bt_s
    # integrity "none": no digests, so no verification cost whatever the rate
    none = simulate_events(cfg(degree=3, integrity="none"), up, np.zeros(4), S, hash_rate=1e6)
    assert none.bt_s == pytest.approx(free.bt_s)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError):
        simulate_events(cfg(), np.array([1e7, 0.0]), np.zeros(2), S)
    with pytest.raises(ConfigError):
        simulate_events(cfg(), np.full(2, 1e7), np.zeros(3), S)
    with pytest.raises(ConfigError):
        simulate_events(cfg(), np.full(2, 1e7), np.zeros(2), S, window=0)
    with pytest.raises(ConfigError):
        SwarmConfig(sim_model="fluid")


def test_simulate_switch_keeps_slotted_by_default():
    assert SwarmConfig().sim_model == "slotted"
    kw = dict(peers=10, update_bytes=8 * C, uplink=(1e6, 4e6), downlink=(4e6, 8e6))
    slotted = simulate(cfg(degree=4), **kw)
    assert slotted.trace is not None and "sim_model" not in slotted.summary
    ev = simulate(cfg(degree=4, sim_model="events"), **kw)
    s = ev.summary
    assert s["sim_model"] == "events" and ev.trace is None
    assert s["bound_s"] <= s["round_s"] <= FACTOR * s["bound_s"]
    assert s["complete_fraction"] == 1.0 and math.isfinite(s["round_s"])
    with pytest.raises(ConfigError):
        simulate(cfg(degree=4, sim_model="events"), **kw, leave_fraction=0.2)


def test_cli_model_events(tmp_path, capsys):
    from fltorrent_hpc.cli import main

    small = ["simulate", "--peers", "8", "--update-bytes", "1MiB", "--chunk-bytes", "64KiB", "--degree", "4"]
    js = tmp_path / "s.json"
    assert main([*small, "--model", "events", "--quiet", "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    assert s["sim_model"] == "events" and s["bound_s"] <= s["round_s"]
    assert s["round_s"] == pytest.approx(s["warmup_s"] + s["bt_s"])
    rc = main([*small, "--model", "events", "--quiet", "--trace", str(tmp_path / "t.h5")])
    assert rc == 2 and "--trace needs --model slotted" in capsys.readouterr().err
