"""`fltorrent study unlinkability --mini` end to end: rows, the derived cells and checks, the report's section."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from fltorrent_hpc.studies import grids, registry, store
from fltorrent_hpc.studies.cli import study_main
from fltorrent_hpc.studies.report import report_main
from fltorrent_hpc.studies.unlinkability import MINI, VARIANTS, cells, unlink_rows


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unlink")
    assert study_main(["unlinkability", "--mini", "--seeds", "1,", "--jobs", "1", "--out", str(out), "--quiet"]) == 0
    return out


def test_grid_is_registered_with_its_seeds() -> None:
    st = grids.studies()["unlinkability"]
    assert st.default_seeds == (1, 2, 3)
    full = st.grid(registry.GridArgs(seeds=st.default_seeds))
    assert len(full) == 2 * 4 * len(VARIANTS) * 3  # n = 100, 500; m = 5, 10, 15, 20; seeds 1-3
    assert {p.params["peers"] for p in full} == {100, 500} and {p.params["degree"] for p in full} == {5, 10, 15, 20}
    assert all(p.runner.endswith("unlinkability:unlink_point") for p in full)
    # the paper studies keep seed 0 by default
    assert all(s.default_seeds == (0,) for n, s in grids.studies().items() if n != "unlinkability")


def test_mini_rows_hidden_at_chance_none_attributed(mini: Path) -> None:
    meta, recs = store.load_records(mini / "unlinkability-mini.h5")
    assert meta["mini"] and meta["command"].endswith("--seeds 1, --mini")
    assert len(recs) == len(MINI["peers"]) * len(MINI["degrees"]) * len(VARIANTS)
    rows = unlink_rows(recs)
    assert len(rows) == len(recs) and all(r["stages"] > 0 and r["u"] for r in rows)
    for r in rows:
        assert 0 < r["u_baseline"] < 1 and r["worst_u_mean"] == max(v[0] for v in r["u"].values())
    cs = cells(rows)
    for m in MINI["degrees"]:
        n = MINI["peers"][0]
        hid, none, pap = cs[(n, m, "hidden")], cs[(n, m, "none")], cs[(n, m, "paper")]
        # the hidden protocol: every attack near a random guess over the whole round
        assert hid["worst_u_ratio"] <= 1.5, hid
        # without defences and under the paper's protocol, the owner is found
        assert none["u_mean"]["first_sender"] >= 0.9 and none["worst_u_ratio"] >= 3.0, none
        assert pap["worst_u_ratio"] >= 3.0, pap
        for c in cs.values():
            if c["m"] == m:
                assert math.isfinite(c["time_ratio"]) and 0.8 <= c["time_ratio"] <= 1.5, c
        assert none["time_ratio"] == 1.0
    doc = json.loads((mini / "unlinkability-mini.json").read_text())
    claims = {c["claim"].split(":")[0]: c for c in doc["derived"]["claims"]}
    assert any(k.startswith("hidden protocol") for k in claims)
    none_claim = next(c for k, c in claims.items() if k.startswith("privacy none"))
    assert none_claim["ok"], none_claim


def test_report_renders_the_section_and_plot(mini: Path, tmp_path: Path) -> None:
    md = tmp_path / "docs" / "RESULTS.md"
    figs = tmp_path / "docs" / "figures"
    assert report_main([str(mini / "unlinkability-mini.h5"), "--out", str(figs), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "## unlinkability:" in text and "round / BT-only" in text and "hidden_r4" in text
    assert (figs / "unlinkability_tradeoff.png").stat().st_size > 5000
    assert "(figures/unlinkability_tradeoff.png)" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
