"""`run_study`: run every unfinished point of a study (in-process or on the worker pool), commit each one to the
study file, log the invocation and regenerate STUDY.json with the study's derived figures and claims."""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .grids import studies
from .pool import run_pool
from .progress import StudyProgress, point_line
from .registry import GridArgs, Point, Study
from .runner import run_point
from .store import commit, done_points, jsonable, load_records, write_point, write_root


@dataclass
class RunStats:
    """What one `run_study` call did: points run, skipped (already in the file) and failed, wall time, claims."""

    path: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    derived: dict[str, Any] = field(default_factory=dict)


def run_study(
    name: str,
    out: str | Path = "results",
    jobs: int = 1,
    seeds: Sequence[int] = (0,),
    mini: bool = False,
    traces: str | Path | None = None,
    fresh: bool = False,
    only: Iterable[str] | None = None,
    quiet: bool = False,
    command: str = "",
) -> RunStats:
    """Run every unfinished point of study `name`; returns what ran, what was skipped, what failed."""
    reg = studies()
    if name not in reg:
        raise KeyError(f"unknown study {name!r}; known: {', '.join(sorted(reg))}")
    study = reg[name]
    args = GridArgs(mini=mini, seeds=tuple(int(s) for s in seeds))
    points = study.grid(args)
    if only:
        keep = set(only)
        points = [p for p in points if p.name in keep or p.group in keep]
    if len({p.name for p in points}) != len(points):
        raise ValueError(f"study {name}: duplicate point names")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{'-mini' if mini else ''}.h5"
    if fresh and path.exists():
        path.unlink()
    done = done_points(path)
    for p in points:
        if p.name in done and jsonable(p.params) != done[p.name]:
            raise ValueError(
                f"{path}: point {p.name} was run with other parameters ({done[p.name]}); "
                "use --fresh to start over or another --out"
            )
    trace_dir = None
    if traces:
        trace_dir = Path(traces) / path.stem
        trace_dir.mkdir(parents=True, exist_ok=True)
    write_root(path, study, args, command or f"fltorrent study {name}")
    stats = RunStats(path)
    todo = sorted((p for p in points if p.name not in done), key=lambda p: -p.cost())
    stats.skipped = [p.name for p in points if p.name in done]
    t0 = time.perf_counter()
    with StudyProgress(len(points), len(stats.skipped), study.name, quiet) as prog:
        if stats.skipped:
            prog.note(f"{path}: {len(stats.skipped)} finished point(s) skipped")

        def finished(p: Point, res: dict[str, Any] | None, err: str | None) -> None:
            if err is not None:
                stats.failed[p.name] = err
                prog.note(f"[red]failed[/red] {p.name}: {err.strip().splitlines()[-1]}")
            else:
                write_point(path, p, res)
                stats.ran.append(p.name)
                prog.note(point_line(p, res))
            prog.advance()

        if jobs <= 1 or len(todo) <= 1:
            for p in todo:
                try:
                    res = run_point(p, str(trace_dir) if trace_dir else None)
                except Exception:  # a failed point is reported and retried on the next run
                    finished(p, None, traceback.format_exc())
                else:
                    finished(p, res, None)
        else:
            run_pool(todo, jobs, str(trace_dir) if trace_dir else None, finished)
    stats.wall_s = time.perf_counter() - t0
    log_run(path, stats, jobs, command or f"fltorrent study {name}")
    doc = write_summary_json(path, study)
    stats.derived = doc.get("derived", {})
    return stats


def log_run(path: Path, stats: RunStats, jobs: int, command: str) -> None:
    """Append this invocation (command, jobs, wall time, points run) to the file's `runs` attribute."""

    def write(f) -> None:
        runs = json.loads(f.attrs.get("runs", "[]"))
        runs.append(
            {
                "command": command,
                "jobs": jobs,
                "wall_s": round(stats.wall_s, 2),
                "ran": len(stats.ran),
                "skipped": len(stats.skipped),
                "failed": len(stats.failed),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        f.attrs["runs"] = json.dumps(runs)

    commit(path, write)


def write_summary_json(path: Path, study: Study | None = None) -> dict[str, Any]:
    """Regenerate STUDY.json from STUDY.h5: every finished point's params and summary, plus derived figures."""
    meta, recs = load_records(path)
    study = study or studies().get(str(meta.get("study")))
    doc: dict[str, Any] = {
        "study": meta.get("study"),
        "title": meta.get("title"),
        "paper": meta.get("paper"),
        "command": meta.get("command"),
        "code_version": meta.get("code_version"),
        "runs": json.loads(meta.get("runs", "[]")),
        "mini": bool(meta.get("mini", False)),
        "points": [
            {
                "name": r.name,
                "group": r.group,
                "seed": r.seed,
                "tags": r.tags,
                "params": r.params,
                "summary": r.summary,
                "elapsed_s": r.elapsed_s,
                **({"rows": r.rows} if r.rows else {}),
            }
            for r in recs
        ],
    }
    if study is not None and study.derive is not None and recs:
        doc["derived"] = study.derive(recs)
    out = path.with_suffix(".json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(doc), indent=1, sort_keys=False))
    os.replace(tmp, out)
    return doc
