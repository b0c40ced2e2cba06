"""Every named study end to end on its miniature grid, resume, the parallel path, the registry, and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import pytest

from fltorrent_hpc.studies import cli as study_cli
from fltorrent_hpc.studies import derive, driver, grids, paper, registry, runner, store
from fltorrent_hpc.studies.report import report_main, write_report
from fltorrent_hpc.trace import read_trace

PAPER_STUDIES = ("table3", "ablation", "cover", "schedulers", "llm", "beyond")


@pytest.fixture(scope="module")
def minis(tmp_path_factory) -> tuple[Path, dict[str, driver.RunStats]]:
    out = tmp_path_factory.mktemp("studies")
    stats = {name: driver.run_study(name, out, jobs=1, mini=True, quiet=True) for name in PAPER_STUDIES}
    return out, stats


@pytest.mark.parametrize("name", PAPER_STUDIES)
def test_mini_study_end_to_end(minis, name: str) -> None:
    out, stats = minis
    st = stats[name]
    grid = grids.studies()[name].grid(registry.GridArgs(mini=True))
    assert not st.failed, st.failed
    assert sorted(st.ran) == sorted(p.name for p in grid)
    doc = json.loads((out / f"{name}-mini.json").read_text())
    assert doc["study"] == name and doc["mini"] is True and len(doc["points"]) == len(grid)
    assert doc["derived"]["claims"], "every paper study states its acceptance checks"
    assert doc["runs"][-1]["ran"] == len(grid)
    meta, recs = store.load_records(out / f"{name}-mini.h5")
    assert meta["schema"] == store.SCHEMA and meta["mini"]
    for r in recs:
        assert r.summary["stages"] > 0 and r.summary["complete_fraction"] >= 0 and r.summary["sim_code"]
        u = r.arrays["stage_utilization"]
        assert u.size == r.summary["stages"] and 0.0 <= float(u.min()) and float(u.max()) <= 1.0 + 1e-9
        assert r.arrays["stage_phase"].size == u.size


def test_study_specific_figures(minis) -> None:
    out, stats = minis
    sched = stats["schedulers"].derived
    assert 0.0 < sched["gff_maxflow_ratio"] <= 1.0 + 1e-9 and sched["maxflow_makespan_ratio"] > 0
    _, recs = store.load_records(out / "schedulers-mini.h5")
    gff = next(r for r in recs if r.tags["scheduler"] == "gff")
    assert "stage_maxflow" in gff.arrays and all(r.summary["warmup_share"] == 1.0 for r in recs)
    llm = stats["llm"].derived["by_model"]
    assert set(llm) == set(paper.LLM_MODELS) and all("overhead" in v for v in llm.values())
    abl = stats["ablation"].derived["by_privacy"]
    assert set(abl) == set(grids.ABLATION_CONFIGS) and abl["none"]["warmup_s"] == 0
    beyond = stats["beyond"].derived
    assert beyond["scale"] and beyond["overlay"] and beyond["churn"]
    for row in beyond["churn"].values():
        assert row["peers_left"] == round(row["leave"] * row["n"]) and 0 < row["leave_stage"]
    exp = [r for r in beyond["overlay"].values() if r["overlay"] == "expander"]
    assert exp and all(r["overlay_lambda2"] <= r["ramanujan_bound"] for r in exp)
    t3 = stats["table3"].derived
    assert set(t3["by_n"]) == {10, 20, 30} and t3["round_fit"]["slope"] > 0


def test_resume_skips_finished_points_and_reruns_unfinished(minis) -> None:
    out, _ = minis
    path = out / "table3-mini.h5"
    again = driver.run_study("table3", out, mini=True, quiet=True)
    assert again.ran == [] and len(again.skipped) == 3
    with h5py.File(path, "a") as f:  # as if the parent died after creating the group, before marking it done
        f["points/n20_s0"].attrs["done"] = False
    third = driver.run_study("table3", out, mini=True, quiet=True)
    assert third.ran == ["n20_s0"] and sorted(third.skipped) == ["n10_s0", "n30_s0"]
    assert len(store.load_records(path)[1]) == 3
    assert not path.with_name(path.name + ".tmp").exists()


def test_changed_parameters_are_refused(minis, monkeypatch) -> None:
    out, _ = minis
    orig = registry.STUDIES["cover"]

    def grid(a: registry.GridArgs) -> list[registry.Point]:
        return [registry.Point(p.name, p.group, p.seed, {**p.params, "degree": 6}, p.tags) for p in orig.grid(a)]

    monkeypatch.setitem(registry.STUDIES, "cover", registry.Study("cover", orig.title, orig.paper, grid, orig.derive))
    with pytest.raises(ValueError, match="other parameters"):
        driver.run_study("cover", out, mini=True, quiet=True)


def test_parallel_workers_and_seeds(tmp_path) -> None:
    st = driver.run_study(
        "schedulers",
        tmp_path,
        jobs=2,
        seeds=(0, 1),
        mini=True,
        quiet=True,
        only=["flooding"],
        traces=tmp_path / "traces",
    )
    assert not st.failed and sorted(st.ran) == ["flooding_s0", "flooding_s1"]
    tr = read_trace(tmp_path / "traces" / "schedulers-mini" / "flooding_s1.h5")  # --traces: full per-point trace
    assert len(tr.transfers["stage"]) > 0 and tr.attrs["seed"] == 1
    _, recs = store.load_records(tmp_path / "schedulers-mini.h5")
    assert {r.seed for r in recs} == {0, 1}
    # each point ran in its own process: peak RSS is per point, not cumulative
    assert all(r.summary["peak_rss_bytes"] > 0 for r in recs)


def _rows_point(x: int, seed: int) -> list[dict]:
    return [{"x": x, "seed": seed, "y": x * x}]


def test_registered_study_and_row_runner(tmp_path, monkeypatch) -> None:
    """A study added with `register` (not built in) runs through a row runner and gets a generic report table."""

    def grid(a: registry.GridArgs) -> list[registry.Point]:
        return [
            registry.Point(f"x{x}_s{s}", f"x{x}", s, {"x": x, "seed": s}, {"x": x}, runner=f"{__name__}:_rows_point")
            for x in (1, 2)
            for s in a.seeds
        ]

    monkeypatch.delitem(registry.STUDIES, "fake", raising=False)  # removed again when the test ends
    registry.register(registry.Study("fake", "an added study", "none", grid))
    assert "fake" in grids.studies() and set(grids.studies()) >= {*PAPER_STUDIES, "privacy"}
    st = driver.run_study("fake", tmp_path, quiet=True)
    assert sorted(st.ran) == ["x1_s0", "x2_s0"]
    _, recs = store.load_records(tmp_path / "fake.h5")
    assert sorted(r.rows[0]["y"] for r in recs) == [1, 4]
    md, _ = write_report([tmp_path / "fake.h5"], tmp_path / "fig")
    assert "## fake" in md.read_text() and "| x | seed | y |" in md.read_text()


def test_studies_and_privacy_import_without_cycles() -> None:
    """studies/ modules import each other without a cycle, and privacy/ (a lower layer) imports nothing of studies/."""
    import ast

    import fltorrent_hpc

    root = Path(fltorrent_hpc.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in sorted((root / "studies").glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = {d.split(".")[0] for d in deps} & {p.stem for p in (root / "studies").glob("*.py")}
    done: set[str] = set()

    def visit(m: str, stack: tuple[str, ...]) -> None:
        assert m not in stack, "import cycle: " + " -> ".join((*stack, m))
        if m not in done:
            for d in graph[m]:
                visit(d, (*stack, m))
            done.add(m)

    for m in graph:
        visit(m, ())
    assert "report" not in {d for m, ds in graph.items() if m != "cli" for d in ds}
    for path in (root / "privacy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            assert not any("studies" in n.split(".") for n in names), f"{path} imports from studies/"


def test_report_renders_every_study(minis, tmp_path) -> None:
    out, _ = minis
    files = [str(out / f"{n}-mini.h5") for n in PAPER_STUDIES]
    md = tmp_path / "docs" / "RESULTS.md"
    assert report_main([*files, "--out", str(tmp_path / "docs" / "figures"), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert text.count("fltorrent report") >= 2  # says how it was made, and how to regenerate it
    for n in PAPER_STUDIES:
        assert f"## {n}:" in text
    for png in (
        "table3_round_time",
        "table3_warmup_share",
        "table3_utilization",
        "ablation_overhead",
        "cover_warmup",
        "schedulers_utilization",
        "llm_round_time",
        "beyond_round_time",
        "beyond_churn",
    ):
        p = tmp_path / "docs" / "figures" / f"{png}.png"
        assert p.stat().st_size > 5000, png
        assert f"(figures/{png}.png)" in text  # links are relative to the markdown file
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_cli_resume_and_list(minis, capsys) -> None:
    out, _ = minis
    assert study_cli.study_main(["table3", "--mini", "--out", str(out), "--jobs", "1", "--quiet"]) == 0
    assert study_cli.study_main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(n in listing for n in PAPER_STUDIES)
    assert study_cli.study_main(["nonexistent"]) == 2
    assert report_main([str(out / "missing.h5"), "--out", str(out)]) == 2


def test_helpers() -> None:
    assert study_cli.parse_seeds("3") == (0, 1, 2) and study_cli.parse_seeds("0,5") == (0, 5)
    fit = derive.linear_fit([100, 200, 300], [1000, 2000, 3000])
    assert fit["slope"] == pytest.approx(10) and fit["r2"] == pytest.approx(1)
    p = {"peers": 100, **grids.paper_setup(False), "seed": 0}
    assert 1500 < runner.ideal_round_stages(p) < 3000 and runner.mid_round_stage(p) == int(
        runner.ideal_round_stages(p) / 2
    )
    pts = grids.studies()["table3"].grid(registry.GridArgs())
    assert [p.params["peers"] for p in pts] == [100, 200, 300, 400, 500]
    assert all(p.params["privacy"] == "full" and p.params["scheduler"] == "gff" for p in pts)
    llm = grids.studies()["llm"].grid(registry.GridArgs())
    assert len(llm) == 8 and {p.params["peers"] for p in llm} == {64}


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads worker pids from /proc (Linux)")
def test_sigterm_stops_the_workers_too(tmp_path) -> None:
    """scancel/kill of a running study leaves no worker computing on (finished points stay committed)."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "fltorrent_hpc.cli", "study", "table3", "--out", str(tmp_path), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(workers) < 2:
        workers = (
            {k for k in _children(proc.pid) if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")}
            if _alive(proc.pid)
            else set()
        )
        time.sleep(0.2)
    assert len(workers) == 2, "the study did not start its two workers"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)
