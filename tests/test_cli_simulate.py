"""`fltorrent simulate` (cli.py), called in-process: JSON summary, HDF5 trace, exit codes on bad input."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from fltorrent_hpc.cli import main
from fltorrent_hpc.trace import SCHEMA, config_of, read_trace

REQUIRED = {
    "peers",
    "chunks_per_update",
    "chunk_bytes",
    "stages",
    "warmup_stages",
    "round_s",
    "warmup_s",
    "bt_s",
    "warmup_share",
    "utilization",
    "complete_fraction",
    "wall_s",
    "peak_rss_bytes",
}
SMALL = ["simulate", "--peers", "12", "--update-bytes", "2MiB", "--chunk-bytes", "64KiB", "--degree", "4"]


@pytest.fixture(scope="module")
def maxflow_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    js, h5 = d / "out" / "s.json", d / "s.h5"
    args = [*SMALL, "--protocol", "paper", "--seed", "3", "--maxflow", "--quiet"]  # the paper's warm-up bound
    rc = main([*args, "--json", str(js), "--trace", str(h5)])
    return rc, js, h5


def test_simulate_writes_json_and_trace(maxflow_run):
    rc, js, h5 = maxflow_run
    assert rc == 0
    s = json.loads(js.read_text())
    assert REQUIRED | {"gff_maxflow_ratio", "maxflow_makespan_ratio"} <= set(s)
    assert s["peers"] == 12 and s["chunks_per_update"] == 32 and s["chunk_bytes"] == 65536
    assert s["update_bytes"] == 2 * 2**20 and s["privacy"] == "full" and s["scheduler"] == "gff" and s["seed"] == 3
    assert s["complete_fraction"] == 1.0 and s["round_s"] == s["warmup_s"] + s["bt_s"]
    assert 0.0 < s["utilization"] <= 1.0 and 0.0 < s["gff_maxflow_ratio"] <= 1.0
    assert s["maxflow_makespan_ratio"] > 0 and s["wall_s"] > 0 and s["peak_rss_bytes"] > 0
    with h5py.File(h5, "r") as f:
        assert f.attrs["schema"] == SCHEMA
    tr = read_trace(h5)
    assert tr.n_peers == 12 and tr.chunks_per_peer == 32
    assert len(tr.transfers["chunk"]) == s["transfers"] == 12 * 11 * 32
    assert config_of(tr)["chunk_bytes"] == 65536 and config_of(tr)["degree"] == 4


def test_simulate_without_maxflow_prints_table(tmp_path, capsys):
    js = tmp_path / "s.json"
    rc = main([*SMALL, "--privacy", "none", "--scheduler", "random-fifo", "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "utilisation" in out and "privacy=none" in out
    s = json.loads(js.read_text())
    assert REQUIRED <= set(s) and "gff_maxflow_ratio" not in s and "maxflow_makespan_ratio" not in s
    assert s["warmup_stages"] == 0 and s["privacy"] == "none" and s["scheduler"] == "random-fifo"
    assert not (tmp_path / "s.h5").exists()


def test_simulate_options_reach_the_round(tmp_path):
    js = tmp_path / "s.json"
    args = [*SMALL, "--overlay", "expander", "--uplink", "40Mbps:60Mbps", "--downlink", "100Mbps", "--cover", "0.2"]
    args += ["--cover-scope", "update", "--lag-slots", "2", "--leave", "0.25", "--leave-stage", "1", "--quiet"]
    args += ["--protocol", "paper"]  # cover and lags are the paper warm-up's knobs
    assert main([*args, "--json", str(js)]) == 0
    s = json.loads(js.read_text())
    assert s["overlay"] == "expander" and s["peers_left"] == 3 and s["cover_k"] == 7  # ceil(0.2 * 32)
    assert s["lambda2"] == s["lambda2"]  # not NaN for an expander


def test_simulate_hidden_protocol_moves_each_chunk_once_more(tmp_path):
    """The default protocol: every peer gets every chunk once (its own back included) plus one mixer hop per
    chunk, and no owner ever sends its own chunk to a neighbour."""
    js, h5 = tmp_path / "s.json", tmp_path / "s.h5"
    assert main([*SMALL, "--seed", "3", "--quiet", "--json", str(js), "--trace", str(h5)]) == 0
    s = json.loads(js.read_text())
    tr = read_trace(h5)
    t = tr.transfers
    n, N = 12, 12 * 32
    assert s["complete_fraction"] == 1.0 and config_of(tr)["protocol"] == "hidden"
    assert len(t["chunk"]) == s["transfers"] == n * N + N
    back = t["receiver"] == t["owner"]  # each owner gets each of its chunks back once
    assert np.bincount(t["receiver"][back], minlength=n).tolist() == [32] * n
    got_back = dict(zip(t["chunk"][back].tolist(), t["stage"][back].tolist()))
    e = tr.edges
    nbr = {(int(a), int(b)) for a, b in e} | {(int(b), int(a)) for a, b in e}
    own = np.flatnonzero(t["chunk"] // 32 == t["sender"])
    for i in own:  # an owner's own chunk goes to a non-neighbour (its mixer) or, once back, like any other
        c, st_ = int(t["chunk"][i]), int(t["stage"][i])
        assert (int(t["sender"][i]), int(t["receiver"][i])) not in nbr or st_ > got_back[c]


@pytest.mark.parametrize(
    ("flag", "value", "msg"),
    [
        ("--chunk-bytes", "64XB", "cannot parse size"),
        ("--update-bytes", "two", "cannot parse size"),
        ("--uplink", "10Gbit", "rate"),
        ("--downlink", "9Mbps:1Mbps", "HIGH < LOW"),
        ("--privacy", "tor", "unknown privacy mechanism"),
    ],
)
def test_bad_units_exit_2_with_message(flag, value, msg, tmp_path, capsys):
    js = tmp_path / "s.json"
    rc = main([*SMALL, flag, value, "--quiet", "--json", str(js)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("fltorrent: ") and msg in err
    assert not js.exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main([*SMALL, "--scheduler", "bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("uplink", ["0Mbps", "100Kbps"])
def test_bug_unusable_link_is_a_traceback(uplink, capsys):
    # Fixed bug: a link too slow for one chunk per slot ("100Kbps" with 64 KiB chunks) or a zero rate ("0Mbps", which
    # parse_rate accepts) raises ValueError inside simulate(); cli.main only maps ConfigError to exit code 2,
    # so the user gets a traceback instead of "fltorrent: ..." and exit status 2.
    rc = main([*SMALL, "--uplink", uplink, "--quiet"])
    assert rc == 2
    assert "fltorrent: " in capsys.readouterr().err
