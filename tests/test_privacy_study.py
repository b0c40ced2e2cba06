"""The `privacy` study (Figs. 6-7) through the public entry points: `fltorrent study privacy --mini`, the
JSON claims, resume, and its section of `fltorrent report`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from fltorrent_hpc.studies import cli as study_cli
from fltorrent_hpc.studies import driver, grids, paper, registry
from fltorrent_hpc.studies import privacy_sweeps as sweeps
from fltorrent_hpc.studies.report import report_main

CLAIMS = ("no defences", "full defences", "Eq. 1", "tracks 1/m")


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("privacy")
    assert study_cli.study_main(["privacy", "--mini", "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    return out


def test_privacy_study_is_a_builtin_study() -> None:
    st = grids.studies()["privacy"]
    assert st.derive is sweeps.derive_privacy and st.paper == "Figs. 6-7"
    full = st.grid(registry.GridArgs())
    names = [p.name for p in full]
    assert len(names) == len(set(names))
    assert all(p.runner == "fltorrent_hpc.studies.privacy_sweeps:study_point" for p in full)
    cells = {
        s: sorted(p.tags[sweeps.SWEEP_KEYS[s]] for p in full if s in p.tags["sweeps"])
        for s in sweeps.SWEEP_KEYS
        if s != "coalition"
    }
    assert cells["degree"] == [5, 10, 15, 20, 25]
    assert cells["spray"] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert cells["peers"] == [100, 200, 300, 400, 500]
    assert sorted(cells["ablation"]) == sorted(sweeps.ABLATION_CONFIGS)
    default = next(p for p in full if len(p.tags["sweeps"]) == 5)  # the n=100, m=10, R=0.2 round, simulated once
    assert (
        default.params["peers"] == 100
        and default.params["degree"] == 10
        and default.params["attackers"]
        == [
            5,
            10,
            15,
            20,
            25,
        ]
    )
    assert len(st.grid(registry.GridArgs(seeds=(0, 1)))) == 2 * len(full)


def test_mini_privacy_study_writes_rows_and_claims(mini: Path) -> None:
    doc = json.loads((mini / "privacy-mini.json").read_text())
    grid = grids.studies()["privacy"].grid(registry.GridArgs(mini=True))
    assert doc["study"] == "privacy" and doc["mini"] and len(doc["points"]) == len(grid)
    claims = doc["derived"]["claims"]
    assert [next(c for c in CLAIMS if c in cl["claim"]) for cl in claims] == list(CLAIMS)
    assert all(isinstance(cl["ok"], bool) and cl["value"] for cl in claims)
    assert claims[0]["ok"], claims[0]  # no defences: Sequence attributes (almost) every neighbour
    assert claims[2]["ok"], claims[2]  # gating holds Eq. 1 on every warm-up transfer
    rows = [r for p in doc["points"] for r in p["rows"]]
    by = {s: [r for r in rows if r["study"] == s] for s in sweeps.SWEEP_KEYS}
    assert {r["m"] for r in by["degree"]} == {3, 4, 6} and {r["a"] for r in by["coalition"]} == {2, 3}
    assert len(by["ablation"]) == len(sweeps.ABLATION_CONFIGS)
    for r in rows:
        for a in ("sequence", "count", "cluster", "elimination"):
            assert 0.0 <= r[f"{a}_max"] <= 1.0 and r[f"{a}_mean"] <= r[f"{a}_max"] + 1e-12
    assert all("sequence_any" in r and "paper_any" in r for r in by["coalition"])
    assert doc["derived"]["degree"] and "inverse_degree" in doc["derived"]
    # the default round is simulated once and shared by every sweep
    full = [
        r for r in rows if r["privacy"] == "full" and r["n"] == 16 and r["m"] == 4 and r["R"] == 0.2 and r["a"] == 1
    ]
    assert len({json.dumps([r["sequence_max"], r["window_stages"], r["eq1_checked"]]) for r in full}) == 1
    # resume: nothing left to run
    st = driver.run_study("privacy", mini, mini=True, quiet=True)
    assert not st.ran and len(st.skipped) == len(grid)


def test_report_renders_the_privacy_section(mini: Path, tmp_path: Path) -> None:
    md = tmp_path / "R.md"
    assert report_main([str(mini / "privacy-mini.h5"), "--out", str(tmp_path / "fig"), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "## privacy:" in text
    for head in ("Defence ablation (Fig. 6)", "Minimum degree m (Fig. 7a)", "Spray ratio R (Fig. 7b)"):
        assert head in text
    assert "Peers n (Fig. 7c)" in text and "Coalitions of a attackers (Fig. 7d)" in text
    assert "| m | 1/m |" in text and "tracks 1/m" in text
    for png in ("ablation", "degree", "spray", "peers", "coalition"):
        p = tmp_path / "fig" / f"privacy_{png}.png"
        assert p.stat().st_size > 5000
        assert f"(fig/privacy_{png}.png)" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_inverse_degree_fit_and_claim_logic() -> None:
    ms = [5, 10, 15, 20, 25]
    fit = sweeps.tracks_inverse_degree(ms, [1 / m for m in ms])
    assert fit["slope"] == pytest.approx(-1.0) and fit["m_asr_min"] == pytest.approx(1.0)
    assert sweeps._tracks(fit)
    theirs = sweeps.tracks_inverse_degree(ms, [paper.ASR_DEGREE[m] for m in ms])
    assert sweeps._tracks(theirs) and -1.2 < theirs["slope"] < -1.1  # the paper's Fig. 7a passes its own claim
    zero = sweeps.tracks_inverse_degree(ms, [0.0, 0.1, 0.1, 0.1, 0.1])
    assert math.isnan(zero["slope"]) and not sweeps._tracks(zero)
    flat = sweeps.tracks_inverse_degree(ms, [0.1] * 5)
    assert flat["slope"] == pytest.approx(0.0, abs=1e-12) and not sweeps._tracks(flat)
