"""HDF5 round traces (trace.py, docs/TRACE.md): write/read round trip of a simulated round, schema, replay."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from fltorrent_hpc.config import SwarmConfig
from fltorrent_hpc.runtime.simulator import simulate
from fltorrent_hpc.trace import (
    GATE_COLUMNS,
    PEER_COLUMNS,
    SCHEMA,
    STAGE_COLUMNS,
    TRANSFER_COLUMNS,
    Trace,
    config_of,
    read_trace,
    write_trace,
)

C = 1000  # chunk bytes
UPDATE = 4500  # 5 chunks, the last one 500 bytes


@pytest.fixture(scope="module")
def sim_round():
    cfg = SwarmConfig(protocol="paper", degree=3, chunk_bytes=C, privacy="full", cover=0.1, seed=4)
    return simulate(cfg, 9, UPDATE, (2000, 4000), (3000, 6000), trace=True)


@pytest.fixture(scope="module")
def gated_round():
    cfg = SwarmConfig(protocol="paper", degree=3, chunk_bytes=C, privacy="gating", cover=0.2, seed=2)
    return simulate(cfg, 8, UPDATE, (2000, 3000), (3000, 4000), trace=True)


def assert_traces_equal(a: Trace, b: Trace) -> None:
    for k, v in a.attrs.items():
        got = b.attrs[k]
        if isinstance(v, (dict, list)):
            continue  # stored as JSON text; checked through config_of
        if isinstance(v, float) and np.isnan(v):
            assert np.isnan(got)
        else:
            assert got == v, f"attr {k}: {got!r} != {v!r}"
    assert set(a.peers) == set(b.peers)
    for k in a.peers:
        assert np.array_equal(np.asarray(a.peers[k]), b.peers[k]), f"peers/{k}"
        if k in PEER_COLUMNS:
            assert b.peers[k].dtype == PEER_COLUMNS[k], f"peers/{k} dtype"
    assert np.array_equal(a.edges, b.edges)
    for k, v in a.overlay_attrs.items():
        got = b.overlay_attrs[k]
        assert (np.isnan(v) and np.isnan(got)) if isinstance(v, float) and np.isnan(v) else got == v, f"overlay {k}"
    for name, schema in (("transfers", TRANSFER_COLUMNS), ("stages", STAGE_COLUMNS), ("gate_releases", GATE_COLUMNS)):
        ta, tb = getattr(a, name), getattr(b, name)
        assert set(tb) == set(schema)
        for k in schema:
            assert tb[k].dtype == np.dtype(schema[k]), f"{name}/{k} dtype {tb[k].dtype}"
            assert np.array_equal(ta[k], tb[k], equal_nan=tb[k].dtype.kind == "f"), f"{name}/{k} differs"
    for k in ("reconstructable", "agreed"):
        assert np.array_equal(getattr(a, k), getattr(b, k))


def test_round_trip(sim_round, tmp_path):
    tr = sim_round.trace
    path = write_trace(tmp_path / "sub" / "round.h5", tr)  # parent directories are created
    assert path.exists()
    back = read_trace(path)
    assert_traces_equal(tr, back)
    assert back.n_peers == 9 and back.chunks_per_peer == 5
    cfg = config_of(back)
    assert cfg["privacy"] == "full" and cfg["update_bytes"] == UPDATE and cfg["chunk_bytes"] == C
    assert cfg == config_of(tr) and cfg["degree"] == 3
    # write again over the same file: overwrites
    write_trace(path, back)
    assert_traces_equal(tr, read_trace(path))


def test_schema_attribute_and_layout(sim_round, tmp_path):
    path = write_trace(tmp_path / "r.h5", sim_round.trace)
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == SCHEMA == "fltorrent-trace/1"
        assert f.attrs["source"] == "sim"
        for key in ("n_peers", "chunks_per_peer", "chunk_bytes", "cover_k", "kappa", "seed", "slot_seconds"):
            assert key in f.attrs, f"root attribute {key} missing"
        for key in ("warmup_stages", "stages", "warmup_failed_open"):
            assert key in f.attrs
        assert set(f) >= {"peers", "overlay", "transfers", "stages", "gate_releases", "result"}
        assert f["overlay/edges"].shape[1] == 2 and f["overlay/edges"].dtype == np.int32
        assert set(f["transfers"]) == set(TRANSFER_COLUMNS)
        assert f["result/reconstructable"].shape == (9, 9)


def test_wrong_schema_is_rejected(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f.attrs["schema"] = "something-else/9"
    with pytest.raises(ValueError, match="not an fltorrent trace"):
        read_trace(p)
    q = tmp_path / "bare.h5"
    h5py.File(q, "w").close()
    with pytest.raises(ValueError, match="schema"):
        read_trace(q)


def test_trace_matches_the_round(sim_round):
    tr, s, rnd = sim_round.trace, sim_round.summary, sim_round.round
    t, stg = tr.transfers, tr.stages
    K, n = 5, 9
    assert len(t["chunk"]) == s["transfers"] == stg["transfers"].sum()
    assert np.array_equal(stg["stage"], np.arange(s["stages"]))
    assert np.array_equal(t["owner"], t["chunk"] // K)
    assert np.all(t["t"] == t["stage"] + 1.0) and np.all(t["t_start"] == t["stage"])
    assert np.all(t["bytes"] == np.where(t["chunk"] % K == K - 1, 500, C))
    assert t["ok"].all()
    assert set(np.unique(t["phase"]).tolist()) <= {0, 1, 2}
    assert np.all(np.diff(t["stage"]) >= 0), "transfers not in delivery order"
    # per-stage rows agree with the transfer table and the capacity
    assert np.array_equal(np.bincount(t["stage"], minlength=len(stg["stage"])), stg["transfers"])
    assert np.allclose(stg["utilization"], stg["transfers"] / stg["capacity"])
    assert tr.attrs["warmup_stages"] == s["warmup_stages"] and tr.attrs["stages"] == s["stages"]
    assert np.array_equal(tr.peers["up_budget"], rnd.up) and np.array_equal(tr.peers["lag"], rnd.lag)
    nb = tr.neighbors()
    for v in range(n):
        assert np.array_equal(nb[v], np.sort(rnd.overlay.neighbors[v]))
    # warm-up transfers carry Eq. 1 figures; owner <= buffer
    wu = t["phase"] == 1
    assert np.all(t["sender_owned"][wu] <= t["sender_buffer"][wu])


def test_replay_reproduces_result(sim_round):
    """Applying the transfer table to the initial inventories gives /result and /peers/complete_stage."""
    tr = sim_round.trace
    n, K = tr.n_peers, tr.chunks_per_peer
    have = np.zeros((n, n * K), bool)
    have[np.arange(n * K) // K, np.arange(n * K)] = True
    complete = np.full(n, -1)
    t = tr.transfers
    for st in np.unique(t["stage"]):
        sel = t["stage"] == st
        r, c = t["receiver"][sel], t["chunk"][sel]
        assert not have[r, c].any(), "trace delivers a chunk twice"
        assert have[t["sender"][sel], c].all(), "trace has a sender without the chunk"
        have[r, c] = True
        complete[(complete < 0) & have.all(axis=1)] = st
    A = have.reshape(n, n, K).all(axis=2)
    assert np.array_equal(A, tr.reconstructable)
    assert np.array_equal(complete, tr.peers["complete_stage"])
    act = tr.peers["active"]
    assert np.array_equal(tr.agreed, A[act].all(axis=0))


def test_gate_releases_round_trip(gated_round, tmp_path):
    tr = gated_round.trace
    g = tr.gate_releases
    assert len(g["stage"]) == gated_round.summary["gate_releases"] > 0  # no spray: gated start needs releases
    assert np.all(g["chunk"] // tr.chunks_per_peer == g["peer"])
    back = read_trace(write_trace(tmp_path / "g.h5", tr))
    assert_traces_equal(tr, back)


def test_columns_fill_missing_and_reject_unknown(tmp_path):
    tr = Trace(attrs={"n_peers": 2, "chunks_per_peer": 1})
    tr.add_transfers(stage=[0, 1], sender=[0, 1], receiver=[1, 0], chunk=[0, 1])
    t = tr.transfers
    assert t["ok"].tolist() == [True, True]  # a writer that does not know `ok` means delivered
    assert t["owner"].tolist() == [-1, -1] and np.isnan(t["t"]).all()
    with pytest.raises(KeyError, match="unknown column"):
        tr.add_transfers(stage=[2], colour=[1])
    tr.add_stage(stage=[0], phase=[1], transfers=[2])
    assert tr.stages["maxflow"].tolist() == [-1]
    back = read_trace(write_trace(tmp_path / "small.h5", tr))
    assert back.transfers["chunk"].tolist() == [0, 1] and back.reconstructable is None
    assert config_of(back) == {}


def test_empty_trace_round_trip(tmp_path):
    tr = Trace(attrs={"n_peers": 0, "chunks_per_peer": 0, "config": {"a": 1}})
    back = read_trace(write_trace(tmp_path / "e.h5", tr))
    assert len(back.transfers["stage"]) == 0 and back.edges.shape == (0, 2)
    assert config_of(back) == {"a": 1}
