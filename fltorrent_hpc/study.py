"""Named scaling studies: grids of simulated rounds, run in parallel, resumable, one HDF5 file per study.

    fltorrent study table3 --jobs 2              # Table III: n = 100..500, full privacy, GFF
    fltorrent study ablation --seeds 3           # Fig. 4 with three seeds per configuration
    fltorrent study beyond --out runs/ --traces runs/traces
    fltorrent report results/*.h5 --out docs/figures --markdown docs/RESULTS.md

A study is a list of points; a point is (name, params) and one run of `transport.sim.simulate`.  Workers
(one process per point, so each point's peak RSS is its own) return results; only this parent process
writes the study file, and each point is committed by an atomic file replace with a `done` attribute, so an
interrupted study resumes where it stopped and a crash never leaves a half-written point behind.
Layout of STUDY.h5 (and the JSON summary beside it) is in docs/STUDIES.md.

Other modules add studies with `register(Study(...))`; the privacy sweeps are picked up lazily from
`fltorrent_hpc.privacy.sweeps.register_studies(register)` when that module provides it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "fltorrent-study/1"
PAPER_CHUNK = 256 * 1024
PAPER_CHUNKS = 206
PAPER_UPLINK = ("15.5Mbps", "25.3Mbps")
PAPER_DOWNLINK = ("36.5Mbps", "121Mbps")
MINI_CHUNKS = 24  # chunks per update in --mini grids: keeps every mini round well under a second
SIM_KWARGS = ("peers", "update_bytes", "uplink", "downlink", "maxflow", "leave_fraction", "leave_stage", "warmup_only")
PLUGINS = ("fltorrent_hpc.privacy.sweeps",)
STAGE_ARRAYS = {
    "utilization": np.float32,
    "phase": np.int8,
    "transfers": np.int32,
    "capacity": np.int64,
    "maxflow": np.int32,
}
LLM_MODELS = {  # DESIGN.md: bf16 update sizes
    "Gemma-7B": "17.1GB",
    "DeepSeek-R1-14B": "29.5GB",
    "Qwen2.5-32B": "65.5GB",
    "Llama-3.3-70B": "141GB",
}


# --------------------------------------------------------------------------------------------- data model
@dataclass(frozen=True)
class Point:
    """One run of a study.  `params` must be JSON-able; `tags` label it in tables (not passed to the runner)."""

    name: str
    group: str
    seed: int
    params: dict[str, Any]
    tags: dict[str, Any] = field(default_factory=dict)
    runner: str = "simulate"  # "simulate" or "module:function" returning rows (see `run_point`)

    def cost(self) -> float:
        """Rough relative cost (transfers to simulate), to start the longest points first."""
        p = self.params
        n = int(p.get("peers", 1))
        k = math.ceil(_bytes(p.get("update_bytes", 1)) / _bytes(p.get("chunk_bytes", PAPER_CHUNK)))
        c = float(n) * max(n - 1, 1) * max(k, 1)
        # measured at n = 100 (paper defaults): a warm-up is ~7% of a round's wall time, computing the per-stage
        # max-flow bound makes it ~40x slower, and scheduling by max-flow ~300x (it also needs ~4x the stages)
        if p.get("warmup_only"):
            c *= 0.07
        if p.get("maxflow"):
            c *= 40.0
        if p.get("scheduler") == "maxflow":
            c *= 300.0
        return c


@dataclass
class Record:
    """A finished point as read back from a study file."""

    name: str
    group: str
    seed: int
    params: dict[str, Any]
    tags: dict[str, Any]
    summary: dict[str, Any]
    arrays: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    elapsed_s: float


@dataclass(frozen=True)
class GridArgs:
    mini: bool = False
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Study:
    """A named grid.  `derive` turns records into JSON-able figures and the issue's claims (pass/fail)."""

    name: str
    title: str
    paper: str
    grid: Callable[[GridArgs], list[Point]]
    derive: Callable[[list[Record]], dict[str, Any]] | None = None


STUDIES: dict[str, Study] = {}
_plugins_loaded = False


def register(study: Study) -> Study:
    """Add (or replace) a named study; other modules call this to extend `fltorrent study`."""
    STUDIES[study.name] = study
    return study


def studies() -> dict[str, Study]:
    """All registered studies, with plugin modules imported on first use (absent plugins are skipped)."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for mod in PLUGINS:
            try:
                m = importlib.import_module(mod)
            except ImportError:
                continue
            hook = getattr(m, "register_studies", None)
            if callable(hook):
                hook(register)
    return STUDIES


# --------------------------------------------------------------------------------------------- helpers
def _bytes(v: Any) -> int:
    from .config import parse_bytes

    return parse_bytes(v)


def points_for(group: str, args: GridArgs, tags: dict[str, Any] | None = None, **params: Any) -> list[Point]:
    """One point per seed: name = GROUP_sSEED, params['seed'] = seed."""
    return [Point(f"{group}_s{s}", group, s, {**params, "seed": s}, dict(tags or {}, group=group)) for s in args.seeds]


def paper_setup(mini: bool, **over: Any) -> dict[str, Any]:
    """The paper's §6 defaults (206 x 256 KiB update, residential links, m = 10, full privacy, GFF)."""
    chunks = MINI_CHUNKS if mini else PAPER_CHUNKS
    base = {
        "update_bytes": chunks * PAPER_CHUNK,
        "chunk_bytes": PAPER_CHUNK,
        "uplink": list(PAPER_UPLINK),
        "downlink": list(PAPER_DOWNLINK),
        "degree": 10,
        "privacy": "full",
        "scheduler": "gff",
    }
    base.update(over)
    return base


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _dumps(v: Any) -> str:
    return json.dumps(_jsonable(v), sort_keys=True)


# --------------------------------------------------------------------------------------------- running a point
def _stage_trace_class():
    from .trace import Trace

    class StageTrace(Trace):
        """Keeps per-stage rows and drops per-transfer rows: an n = 500 round has ~50M transfers (GBs)."""

        def add_transfers(self, **cols: Any) -> None:
            return None

    return StageTrace


@contextmanager
def _stage_only_traces():
    # The simulator has no stage-only trace mode yet (asked for); swap the Trace class it instantiates for the
    # duration of one call.  This runs in the worker process (or the parent with --jobs 1), single-threaded.
    from .transport import sim

    orig = getattr(sim, "Trace", None)
    if orig is None:
        yield False
        return
    sim.Trace = _stage_trace_class()
    try:
        yield True
    finally:
        sim.Trace = orig


def _simulate_point(params: dict[str, Any], trace_path: str | None) -> dict[str, Any]:
    from .config import SwarmConfig, parse_range, parse_rate
    from .trace import write_trace
    from .transport.sim import simulate

    cfg_fields = set(SwarmConfig.__dataclass_fields__) - {"extra"}
    unknown = set(params) - cfg_fields - set(SIM_KWARGS) - {"spectrum"}
    if unknown:
        raise ValueError(f"unknown study parameter(s) {sorted(unknown)}")
    cfg = SwarmConfig(**{k: v for k, v in params.items() if k in cfg_fields})
    kw = {k: params[k] for k in SIM_KWARGS if k in params and params[k] is not None}
    kw["update_bytes"] = _bytes(kw["update_bytes"])
    kw["uplink"] = parse_range(kw["uplink"], parse_rate)
    kw["downlink"] = parse_range(kw["downlink"], parse_rate)
    if trace_path:
        res = simulate(cfg, trace=True, **kw)
    else:
        with _stage_only_traces() as ok:
            res = simulate(cfg, trace=ok, **kw)
    summary = dict(res.summary)
    arrays: dict[str, np.ndarray] = {}
    if res.trace is not None:
        st = res.trace.stages
        for k, dt in STAGE_ARRAYS.items():
            if k in st and (k != "maxflow" or kw.get("maxflow")):
                arrays["stage_" + k] = np.asarray(st[k], dtype=dt)
        if trace_path:
            tmp = trace_path + ".tmp"
            write_trace(tmp, res.trace)
            os.replace(tmp, trace_path)
    summary["ideal_round_s"] = ideal_round_stages(params) * cfg.slot_seconds
    if params.get("spectrum"):
        summary.update(_spectrum(cfg, int(kw["peers"])))
    return {"summary": summary, "arrays": arrays, "rows": []}


def _spectrum(cfg: Any, n: int) -> dict[str, Any]:
    """Second-eigenvalue figures of the round's initial overlay (the simulator fills lambda2 only for expanders)."""
    from .swarm.overlay import build_overlay

    ov = build_overlay(n, cfg, cfg.seed)
    deg = ov.degree
    return {
        "overlay_lambda2": float(ov.second_eigenvalue()),
        "ramanujan_bound": 2.0 * math.sqrt(max(cfg.degree - 1, 0)),
        "degree_min": int(deg.min()),
        "degree_mean": float(deg.mean()),
        "degree_max": int(deg.max()),
    }


def sim_code_hash() -> str:
    """Short hash of the simulator's sources: points of one study that ran on different code are flagged."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha1()
    for p in sorted([*root.glob("swarm/*.py"), root / "transport" / "sim.py", root / "config.py"]):
        if p.exists():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:10]


def run_point(point: Point, trace_dir: str | None = None) -> dict[str, Any]:
    """Run one point (in a worker) and return {summary, arrays, rows, elapsed_s}; never touches the study file.

    A runner other than "simulate" is "package.module:function": called with **params, it returns a list of
    row dicts (e.g. the privacy sweeps), or a dict with any of summary/arrays/rows.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    code = sim_code_hash()
    if point.runner == "simulate":
        tp = str(Path(trace_dir) / f"{point.name}.h5") if trace_dir else None
        out = _simulate_point(point.params, tp)
    else:
        mod, _, fn = point.runner.partition(":")
        got = getattr(importlib.import_module(mod), fn)(**point.params)
        out = {"summary": {}, "arrays": {}, "rows": got} if isinstance(got, list) else dict(got)
        out.setdefault("summary", {})
        out.setdefault("arrays", {})
        out.setdefault("rows", [])
    out["elapsed_s"] = time.perf_counter() - t0
    out["summary"]["sim_code"] = code
    # CPU seconds of this point: on a shared machine wall time measures the neighbours too
    out["summary"]["cpu_s"] = time.process_time() - c0
    return out


# --------------------------------------------------------------------------------------------- the study file
def _open_h5(path: Path, mode: str):
    import h5py

    return h5py.File(path, mode)


def load_records(path: str | Path) -> tuple[dict[str, Any], list[Record]]:
    """Root attributes and the finished points of a study file."""
    path = Path(path)
    with _open_h5(path, "r") as f:
        if f.attrs.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not an fltorrent study file (schema {f.attrs.get('schema')!r})")
        meta = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        recs = []
        pts = f.get("points")
        for name in pts if pts is not None else []:
            g = pts[name]
            if not g.attrs.get("done", False):
                continue
            recs.append(
                Record(
                    name=name,
                    group=str(g.attrs["group"]),
                    seed=int(g.attrs["seed"]),
                    params=json.loads(g.attrs["params"]),
                    tags=json.loads(g.attrs["tags"]),
                    summary=json.loads(g.attrs["summary"]),
                    arrays={k: g[k][()] for k in g},
                    rows=json.loads(g.attrs.get("rows", "[]")),
                    elapsed_s=float(g.attrs.get("elapsed_s", float("nan"))),
                )
            )
    return meta, recs


def _done_points(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    with _open_h5(path, "r") as f:
        pts = f.get("points")
        if pts is None:
            return {}
        return {n: json.loads(pts[n].attrs["params"]) for n in pts if pts[n].attrs.get("done", False)}


def _commit(path: Path, write: Callable[[Any], None]) -> None:
    """Apply `write(h5file)` to a copy of the study file, then atomically replace the original."""
    tmp = path.with_name(path.name + ".tmp")
    if path.exists():
        shutil.copyfile(path, tmp)
    elif tmp.exists():
        tmp.unlink()
    with _open_h5(tmp, "a") as f:
        write(f)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_point(path: Path, point: Point, result: dict[str, Any]) -> None:
    def write(f) -> None:
        pts = f.require_group("points")
        if point.name in pts:
            del pts[point.name]
        g = pts.create_group(point.name)
        g.attrs["group"] = point.group
        g.attrs["seed"] = point.seed
        g.attrs["runner"] = point.runner
        g.attrs["params"] = _dumps(point.params)
        g.attrs["tags"] = _dumps(point.tags)
        g.attrs["summary"] = _dumps(result["summary"])
        g.attrs["rows"] = json.dumps(_jsonable(result.get("rows", [])))  # keep the column order
        g.attrs["elapsed_s"] = float(result["elapsed_s"])
        for k, v in result.get("arrays", {}).items():
            a = np.asarray(v)
            big = a.size > 4096
            g.create_dataset(k, data=a, compression="gzip" if big else None)
        g.attrs["done"] = True

    _commit(path, write)


def _write_root(path: Path, study: Study, args: GridArgs, command: str) -> None:
    def write(f) -> None:
        f.attrs["schema"] = SCHEMA
        f.attrs["study"] = study.name
        f.attrs["title"] = study.title
        f.attrs["paper"] = study.paper
        f.attrs["mini"] = bool(args.mini)
        f.attrs["seeds"] = _dumps(list(args.seeds))
        f.attrs["command"] = command
        f.attrs["code_version"] = _code_version()
        f.attrs["host_cpus"] = os.cpu_count() or 0
        if "created" not in f.attrs:
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.require_group("points")

    _commit(path, write)


def _log_run(path: Path, stats: RunStats, jobs: int, command: str) -> None:
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

    _commit(path, write)


def _code_version() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    tmp.write_text(json.dumps(_jsonable(doc), indent=1, sort_keys=False))
    os.replace(tmp, out)
    return doc


# --------------------------------------------------------------------------------------------- the driver
@dataclass
class RunStats:
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
    done = _done_points(path)
    for p in points:
        if p.name in done and _jsonable(p.params) != done[p.name]:
            raise ValueError(
                f"{path}: point {p.name} was run with other parameters ({done[p.name]}); "
                "use --fresh to start over or another --out"
            )
    trace_dir = None
    if traces:
        trace_dir = Path(traces) / path.stem
        trace_dir.mkdir(parents=True, exist_ok=True)
    _write_root(path, study, args, command or f"fltorrent study {name}")
    stats = RunStats(path)
    todo = sorted((p for p in points if p.name not in done), key=lambda p: -p.cost())
    stats.skipped = [p.name for p in points if p.name in done]
    t0 = time.perf_counter()
    with _Progress(len(points), len(stats.skipped), study.name, quiet) as prog:
        if stats.skipped:
            prog.note(f"{path}: {len(stats.skipped)} finished point(s) skipped")

        def finished(p: Point, res: dict[str, Any] | None, err: str | None) -> None:
            if err is not None:
                stats.failed[p.name] = err
                prog.note(f"[red]failed[/red] {p.name}: {err.strip().splitlines()[-1]}")
            else:
                _write_point(path, p, res)
                stats.ran.append(p.name)
                prog.note(_point_line(p, res))
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
            _run_pool(todo, jobs, str(trace_dir) if trace_dir else None, finished)
    stats.wall_s = time.perf_counter() - t0
    _log_run(path, stats, jobs, command or f"fltorrent study {name}")
    doc = write_summary_json(path, study)
    stats.derived = doc.get("derived", {})
    return stats


def _run_pool(todo: list[Point], jobs: int, trace_dir: str | None, finished) -> None:
    import multiprocessing as mp

    # one BLAS/OpenMP thread per worker: the cores are already shared out between workers
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    # the compiled swarm passes run their receivers in parallel: give each worker its share of the cores, since
    # oversubscribed threads stall every parallel region (tens of thousands per round) on a descheduled thread
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(jobs, 1))))
    # a fresh process per point: a big point's memory goes back to the OS and each peak RSS is its own
    # SIGTERM (scancel, kill) stops the study like Ctrl-C: running points are dropped and their workers
    # terminated, instead of the workers computing on, orphaned, after the parent is gone
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
            pending: dict[Future, Point] = {ex.submit(run_point, p, trace_dir): p for p in todo}
            try:
                while pending:
                    ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in ready:
                        p = pending.pop(fut)
                        try:
                            res = fut.result()
                        except Exception:
                            finished(p, None, traceback.format_exc())
                        else:
                            finished(p, res, None)
            except KeyboardInterrupt:
                for fut in pending:
                    fut.cancel()
                # finished points are already committed; the running ones restart on resume
                for proc in list(getattr(ex, "_processes", {}).values()):
                    proc.terminate()
                ex.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _point_line(p: Point, res: dict[str, Any]) -> str:
    s = res["summary"]
    bits = [f"[green]done[/green] {p.name}"]
    for key, fmt in (
        ("round_s", "round {:.0f}s"),
        ("warmup_s", "warm-up {:.0f}s"),
        ("warmup_share", "share {:.1%}"),
        ("utilization", "util {:.1%}"),
        ("gff_maxflow_ratio", "GFF/max-flow {:.3f}"),
    ):
        if isinstance(s.get(key), (int, float)):
            bits.append(fmt.format(s[key]))
    bits.append(f"wall {res['elapsed_s']:.1f}s")
    return "  ".join(bits)


class _Progress:
    """rich progress over points; without a terminal, plain lines, at least one every HEARTBEAT_S.

    A point can run for minutes, so a log or pipe gets a heartbeat line between finished points too.
    """

    HEARTBEAT_S = 10.0

    def __init__(self, total: int, already: int, label: str, quiet: bool) -> None:
        self.total, self.already, self.label, self.quiet = total, already, label, quiet
        self.p = None
        self.done = already
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> _Progress:
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(
                TextColumn(f"study {self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                disable=not sys.stderr.isatty(),
            )
            self.p.start()
            self.task = self.p.add_task(self.label, total=self.total, completed=self.already)
            from .swarm.bt_kernel import compile_note

            note = compile_note()
            if note:
                self.note(note)
            if self.p.disable:
                self.note(
                    f"study {self.label}: {self.total - self.already} point(s) to run; a line every "
                    f"{self.HEARTBEAT_S:.0f}s"
                )
                self._beat = threading.Thread(target=self._heartbeat, name="study-heartbeat", daemon=True)
                self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            self.note(f"study {self.label}: {self.done}/{self.total} points done, {time.monotonic() - self.t0:.0f}s")

    def note(self, line: str) -> None:
        if self.quiet:
            return
        if self.p is not None and not self.p.disable:
            self.p.console.print(line, soft_wrap=True)
        else:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(line, soft_wrap=True)

    def advance(self) -> None:
        self.done += 1
        if self.p is not None:
            self.p.advance(self.task)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.p is not None:
            self.p.stop()


# --------------------------------------------------------------------------------------------- derivations
def groups(recs: Iterable[Record]) -> dict[str, list[Record]]:
    """Records by group (one group = one grid cell across seeds), in name order."""
    out: dict[str, list[Record]] = {}
    for r in sorted(recs, key=lambda r: (r.group, r.seed)):
        out.setdefault(r.group, []).append(r)
    return out


def mean_std(rs: Sequence[Record], key: str) -> tuple[float, float]:
    """Mean and sample std (0 for one seed) of a summary figure across a group's seeds; NaN if absent."""
    v = np.array([float(r.summary[key]) for r in rs if isinstance(r.summary.get(key), (int, float))], float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _mean(rs: Sequence[Record], key: str) -> float:
    return mean_std(rs, key)[0]


def _claim(text: str, ok: bool, value: str) -> dict[str, Any]:
    return {"claim": text, "ok": bool(ok), "value": value}


def _by_tag(recs: Iterable[Record], tag: str) -> dict[Any, list[Record]]:
    out: dict[Any, list[Record]] = {}
    for rs in groups(recs).values():
        out.setdefault(rs[0].tags.get(tag), []).extend(rs)
    return out


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares y = a + b x with R^2 and the largest relative residual (how 'about linear' it is)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan"), "max_rel_residual": 0.0}
    b, a = np.polyfit(x, y, 1)
    fit = a + b * x
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - fit) ** 2).sum()) / ss if ss > 0 else 1.0
    return {
        "slope": float(b),
        "intercept": float(a),
        "r2": r2,
        "max_rel_residual": float(np.max(np.abs(y - fit) / np.maximum(np.abs(y), 1e-12))),
    }


def two_core_estimate(recs: Sequence[Record], workers: int = 2) -> float:
    """Wall time of the study on `workers` idle cores: per-point CPU seconds, largest first to the least loaded.

    On a shared machine the measured wall time includes the neighbours' load; CPU time does not.  NaN when a
    point has no CPU time recorded.
    """
    cpu = [r.summary.get("cpu_s") for r in recs]
    if not cpu or any(not isinstance(c, (int, float)) for c in cpu):
        return float("nan")
    load = [0.0] * workers
    for c in sorted(cpu, reverse=True):
        load[load.index(min(load))] += c
    return max(load)


def derive_table3(recs: list[Record]) -> dict[str, Any]:
    by_n = {int(k): v for k, v in _by_tag(recs, "n").items()}
    ns = sorted(by_n)
    rows = {
        n: {
            k: _mean(by_n[n], k)
            for k in (
                "warmup_s",
                "warmup_share",
                "utilization",
                "round_s",
                "wall_s",
                "peak_rss_bytes",
                "complete_fraction",
            )
        }
        for n in ns
    }
    fit = linear_fit(ns, [rows[n]["round_s"] for n in ns])
    cpu = two_core_estimate(recs)
    shares = [rows[n]["warmup_share"] for n in ns]
    claims = [
        _claim(
            "warm-up share within 9-15% at every n",
            all(0.09 <= s <= 0.15 for s in shares),
            ", ".join(f"n={n}: {rows[n]['warmup_share']:.1%}" for n in ns),
        ),
        _claim(
            "round time grows about linearly in n (R^2 >= 0.98, residuals <= 10%)",
            len(ns) >= 3 and fit["r2"] >= 0.98 and fit["max_rel_residual"] <= 0.10,
            f"R^2 = {fit['r2']:.4f}, slope = {fit['slope']:.2f} s/peer, max residual {fit['max_rel_residual']:.1%}",
        ),
        _claim(
            "every peer completes the round",
            all(rows[n]["complete_fraction"] >= 1.0 for n in ns),
            ", ".join(f"n={n}: {rows[n]['complete_fraction']:.1%}" for n in ns),
        ),
    ]
    if cpu == cpu:
        claims.append(
            _claim(
                "the whole study fits in 15 min on 2 cores (per-point CPU time, largest first on 2 workers)",
                cpu <= 900,
                f"{cpu / 60:.1f} min",
            )
        )
    return {"by_n": rows, "round_fit": fit, "two_core_estimate_s": cpu, "claims": claims}


def derive_ablation(recs: list[Record]) -> dict[str, Any]:
    by = _by_tag(recs, "privacy")
    rows = {
        p: {k: _mean(rs, k) for k in ("round_s", "warmup_s", "bt_s", "utilization")}
        | {"round_std": mean_std(rs, "round_s")[1], "seeds": len(rs)}
        for p, rs in by.items()
    }
    base = rows.get("none", {}).get("round_s", float("nan"))
    for r in rows.values():
        r["overhead"] = r["round_s"] / base - 1.0 if base == base and base > 0 else float("nan")
    full = rows.get("full", {}).get("overhead", float("nan"))
    claims = [
        _claim("full-privacy round within 10% of BitTorrent-only (paper +3.9%)", abs(full) <= 0.10, f"{full:+.1%}")
    ]
    return {"by_privacy": rows, "claims": claims}


def derive_cover(recs: list[Record]) -> dict[str, Any]:
    by = {float(k): v for k, v in _by_tag(recs, "cover").items()}
    ks = sorted(by)
    rows = {k: {m: _mean(by[k], m) for m in ("warmup_s", "round_s", "warmup_share", "cover_k")} for k in ks}
    w = [rows[k]["warmup_s"] for k in ks]
    claims = [
        _claim(
            "warm-up duration increases with K",
            all(b >= a for a, b in zip(w, w[1:])),
            ", ".join(f"K={k:.0%}: {rows[k]['warmup_s']:.0f}s" for k in ks),
        )
    ]
    return {"by_cover": {f"{k:g}": v for k, v in rows.items()}, "claims": claims}


def derive_schedulers(recs: list[Record]) -> dict[str, Any]:
    by = _by_tag(recs, "scheduler")
    rows = {
        s: {
            k: _mean(rs, k)
            for k in (
                "warmup_stages",
                "warmup_utilization",
                "gff_maxflow_ratio",
                "maxflow_warmup_transfers",
                "transfers",
            )
        }
        for s, rs in by.items()
    }
    out: dict[str, Any] = {"by_scheduler": rows, "claims": []}
    gff = rows.get("gff")
    if gff is None:
        return out
    ratio = gff["gff_maxflow_ratio"]
    mf = rows.get("maxflow", {}).get("warmup_stages", float("nan"))
    out["gff_maxflow_ratio"] = ratio
    out["maxflow_makespan_ratio"] = mf / gff["warmup_stages"] if gff["warmup_stages"] else float("nan")
    heur = {s: r["warmup_stages"] for s, r in rows.items() if s != "maxflow"}
    first = min(heur.values()) if heur else float("nan")
    out["claims"] = [
        _claim(
            "GFF moves >= 0.90 of the stage max-flow bound over its warm-up (paper about 0.92)",
            ratio >= 0.90,
            f"{ratio:.3f}",
        ),
        _claim(
            "GFF finishes warm-up first among the heuristics",
            gff["warmup_stages"] <= first,
            ", ".join(f"{s}: {v:.0f}" for s, v in sorted(heur.items(), key=lambda kv: kv[1])),
        ),
    ]
    return out


def derive_llm(recs: list[Record]) -> dict[str, Any]:
    rows: dict[str, dict[str, float]] = {}
    for rs in groups(recs).values():
        t = rs[0].tags
        rows.setdefault(t["model"], {})[t["mode"]] = _mean(rs, "round_s")
        rows[t["model"]]["chunks_per_update"] = _mean(rs, "chunks_per_update")
        if t["mode"] == "full":
            rows[t["model"]]["warmup_s"] = _mean(rs, "warmup_s")
    for r in rows.values():
        if "none" in r and "full" in r:
            r["overhead"] = r["full"] / r["none"] - 1.0
    ov = [r.get("overhead", float("nan")) for r in rows.values()]
    claims = [
        _claim(
            "full-privacy overhead over BitTorrent-only <= 10% for every model (paper 6.6-10.0%)",
            bool(ov) and all(o <= 0.10 for o in ov),
            ", ".join(f"{m}: {r.get('overhead', float('nan')):+.1%}" for m, r in rows.items()),
        )
    ]
    return {"by_model": rows, "claims": claims}


def derive_beyond(recs: list[Record]) -> dict[str, Any]:
    parts: dict[str, dict[str, Any]] = {"scale": {}, "overlay": {}, "churn": {}}
    keys = (
        "round_s",
        "warmup_s",
        "warmup_share",
        "utilization",
        "wall_s",
        "peak_rss_bytes",
        "complete_fraction",
        "reconstructable_fraction",
        "deadline_hit",
        "lambda2",
        "overlay_lambda2",
        "ramanujan_bound",
        "degree_mean",
        "peers_left",
    )
    for g, rs in groups(recs).items():
        t = rs[0].tags
        row = {k: _mean(rs, k) for k in keys} | {k: v for k, v in t.items() if k != "group"}
        row["leave_stage"] = rs[0].params.get("leave_stage")
        parts[t["part"]][g] = row
    claims = []
    big = [
        r
        for r in parts["scale"].values()
        if r.get("n") == max((x.get("n", 0) for x in parts["scale"].values()), default=0)
    ]
    if big:
        r = big[0]
        claims.append(
            _claim(
                f"n = {r['n']} completes within 30 min and 8 GB on this machine",
                r["complete_fraction"] >= 1.0 and r["wall_s"] <= 1800 and r["peak_rss_bytes"] <= 8e9,
                f"wall {r['wall_s']:.0f}s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, "
                f"complete {r['complete_fraction']:.1%}",
            )
        )
    if parts["churn"]:
        claims.append(
            _claim(
                "rounds under churn complete over the remaining peers (no deadline hit)",
                all(not r["deadline_hit"] for r in parts["churn"].values()),
                ", ".join(
                    f"{r['overlay']} {r['leave']:.0%}: complete {r['complete_fraction']:.1%}"
                    for r in parts["churn"].values()
                ),
            )
        )
    exp = [r for r in parts["overlay"].values() if r.get("overlay") == "expander"]
    if exp:
        claims.append(
            _claim(
                "expander overlays meet the Ramanujan bound 2*sqrt(d-1)",
                all(r["overlay_lambda2"] <= r["ramanujan_bound"] + 1e-9 for r in exp),
                ", ".join(f"n={r['n']}: lambda2 {r['overlay_lambda2']:.2f} <= {r['ramanujan_bound']:.2f}" for r in exp),
            )
        )
    return {**parts, "claims": claims}


# --------------------------------------------------------------------------------------------- the named studies
def _grid_table3(a: GridArgs) -> list[Point]:
    sizes = (10, 20, 30) if a.mini else (100, 200, 300, 400, 500)
    return [p for n in sizes for p in points_for(f"n{n}", a, {"n": n}, peers=n, **paper_setup(a.mini))]


ABLATION_CONFIGS = ("none", "gating", "spray", "lags", "spray,gating", "lags,gating", "spray,lags", "full")


def _grid_ablation(a: GridArgs) -> list[Point]:
    n = 16 if a.mini else 100
    return [
        p
        for priv in ABLATION_CONFIGS
        for p in points_for(
            priv.replace(",", "+"), a, {"privacy": priv, "n": n}, peers=n, **paper_setup(a.mini, privacy=priv)
        )
    ]


def _grid_cover(a: GridArgs) -> list[Point]:
    n = 16 if a.mini else 100
    ks = (0.05, 0.10, 0.20) if a.mini else (0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.40, 0.50)
    return [
        p
        for k in ks
        for p in points_for(f"K{round(k * 100):02d}", a, {"cover": k, "n": n}, peers=n, **paper_setup(a.mini, cover=k))
    ]


def _grid_schedulers(a: GridArgs) -> list[Point]:
    n = 16 if a.mini else 100
    pts = []
    for s in ("gff", "random-ff", "random-fifo", "flooding", "maxflow"):
        extra = {"maxflow": True} if s == "gff" else {}
        pts += points_for(
            s, a, {"scheduler": s, "n": n}, peers=n, warmup_only=True, **paper_setup(a.mini, scheduler=s), **extra
        )
    return pts


def _grid_llm(a: GridArgs) -> list[Point]:
    n = 8 if a.mini else 64
    scale = 64 if a.mini else 1  # --mini: updates 64x smaller (4..33 chunks per peer)
    pts = []
    for model, size in LLM_MODELS.items():
        nbytes = _bytes(size) // scale
        for mode in ("none", "full"):
            pts += points_for(
                f"{model}_{mode}",
                a,
                {"model": model, "mode": mode, "size": size},
                peers=n,
                update_bytes=nbytes,
                chunk_bytes="64MiB",
                uplink=["7Gbps", "10Gbps"],
                downlink=["7Gbps", "10Gbps"],
                degree=10,
                privacy=mode,
                scheduler="gff",
            )
    return pts


def ideal_round_stages(params: dict[str, Any]) -> float:
    """Uplink-bound lower bound on a full round: every peer must receive K(n-1) chunks over the sum of budgets."""
    from .config import parse_range, parse_rate
    from .transport.sim import budgets, draw_links

    n, C = int(params["peers"]), _bytes(params["chunk_bytes"])
    K = math.ceil(_bytes(params["update_bytes"]) / C)
    up, _ = draw_links(
        n,
        parse_range(params["uplink"], parse_rate),
        parse_range(params["downlink"], parse_rate),
        int(params.get("seed", 0)),
    )
    ub = budgets(up, C, float(params.get("slot_seconds", 1.0)))
    return K * n * (n - 1) / max(int(ub.sum()), 1)


def mid_round_stage(params: dict[str, Any]) -> int:
    """Half the uplink-bound ideal round of this point's peers and links: 'mid-round' for the churn runs."""
    return int(0.5 * ideal_round_stages(params))


def _grid_beyond(a: GridArgs) -> list[Point]:
    scale = (24, 30) if a.mini else (1000, 2000)
    over_n = (20,) if a.mini else (100, 500)
    churn_n = 16 if a.mini else 100
    leaves = (0.1, 0.3) if a.mini else (0.1, 0.2, 0.3)
    pts = []
    for n in scale:
        pts += points_for(
            f"scale_n{n}", a, {"part": "scale", "n": n, "overlay": "random"}, peers=n, **paper_setup(a.mini)
        )
    for n in over_n:
        for ov in ("random", "expander"):
            pts += points_for(
                f"overlay_{ov}_n{n}",
                a,
                {"part": "overlay", "n": n, "overlay": ov},
                peers=n,
                spectrum=True,
                **paper_setup(a.mini, overlay=ov),
            )
    for ov in ("random", "expander"):
        for f in leaves:
            for s in a.seeds:
                prm = {"peers": churn_n, **paper_setup(a.mini, overlay=ov), "leave_fraction": f, "seed": s}
                prm["leave_stage"] = mid_round_stage(prm)
                g = f"churn_{ov}_{round(f * 100)}pct"
                pts.append(
                    Point(
                        f"{g}_s{s}", g, s, prm, {"part": "churn", "n": churn_n, "overlay": ov, "leave": f, "group": g}
                    )
                )
    return pts


register(Study("table3", "Scaling with n (full privacy, GreedyFastestFirst)", "Table III", _grid_table3, derive_table3))
register(Study("ablation", "Round cost of each privacy mechanism (n = 100)", "Fig. 4", _grid_ablation, derive_ablation))
register(
    Study("cover", "Warm-up duration against the cover threshold K (n = 100)", "Fig. 5", _grid_cover, derive_cover)
)
register(
    Study(
        "schedulers",
        "Warm-up schedulers against the stage max-flow bound (n = 100)",
        "Fig. 3",
        _grid_schedulers,
        derive_schedulers,
    )
)
register(
    Study("llm", "LLM-size updates over 7-10 Gbps links (64 peers, 64 MiB chunks)", "Fig. 8", _grid_llm, derive_llm)
)
register(
    Study(
        "beyond",
        "Beyond the paper: n = 1000-2000, expander vs random overlays, churn",
        "(new)",
        _grid_beyond,
        derive_beyond,
    )
)


# --------------------------------------------------------------------------------------------- command lines
def parse_seeds(text: str) -> tuple[int, ...]:
    """'3' -> (0, 1, 2); '0,5,7' -> (0, 5, 7)."""
    t = text.strip()
    if "," in t:
        return tuple(int(x) for x in t.split(",") if x.strip())
    n = int(t)
    if n < 1:
        raise argparse.ArgumentTypeError("--seeds needs a count >= 1 or a comma list")
    return tuple(range(n))


def study_main(argv: list[str] | None = None) -> int:
    """`fltorrent study NAME [--out DIR] [--jobs N] [--seeds S] [--mini] [--traces DIR]`."""
    reg = studies()
    ap = argparse.ArgumentParser(
        prog="fltorrent study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("name", nargs="?", help="study: " + ", ".join(sorted(reg)))
    ap.add_argument("--out", default="results", help="directory of STUDY.h5 and STUDY.json (default results/)")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--seeds", type=parse_seeds, default=(0,), help="a count (3 = seeds 0,1,2) or a list 0,4,7")
    ap.add_argument("--mini", action="store_true", help="miniature grid (n <= 30, 24-chunk updates): smoke test")
    ap.add_argument("--traces", default=None, metavar="DIR", help="also write each point's full trace here")
    ap.add_argument("--only", default=None, help="comma list of point or group names to run")
    ap.add_argument("--fresh", action="store_true", help="discard the study file and start over")
    ap.add_argument("--check", action="store_true", help="exit 1 when one of the study's claims fails")
    ap.add_argument("--list", action="store_true", help="list the studies and their points, run nothing")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.list or not a.name:
        for s in sorted(reg.values(), key=lambda s: s.name):
            pts = s.grid(GridArgs(mini=a.mini, seeds=a.seeds))
            print(f"{s.name:11s} {s.paper:10s} {len(pts):3d} points  {s.title}")
            if a.name == s.name:
                print("\n".join(f"    {p.name}  {_dumps(p.params)}" for p in pts))
        return 0 if a.list else 2
    if a.name not in reg:
        print(f"fltorrent study: unknown study {a.name!r}; known: {', '.join(sorted(reg))}", file=sys.stderr)
        return 2
    # the command that reproduces the whole study (without --only/--fresh, which only steer one invocation)
    cmd = f"fltorrent study {a.name} --out {a.out} --jobs {a.jobs}"
    seeds = ",".join(map(str, a.seeds)) + ("," if len(a.seeds) == 1 else "")  # "5," is seed 5, "5" is 5 seeds
    cmd += (f" --seeds {seeds}" if a.seeds != (0,) else "") + (" --mini" if a.mini else "")
    cmd += f" --traces {a.traces}" if a.traces else ""
    st = run_study(
        a.name, a.out, a.jobs, a.seeds, a.mini, a.traces, a.fresh, a.only.split(",") if a.only else None, a.quiet, cmd
    )
    if not a.quiet:
        print(
            f"{st.path}: {len(st.ran)} point(s) run, {len(st.skipped)} skipped, {len(st.failed)} failed "
            f"in {st.wall_s:.1f}s; summary {st.path.with_suffix('.json')}"
        )
        for c in st.derived.get("claims", []):
            print(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['claim']}: {c['value']}")
    if st.failed:
        return 1
    if a.check and not all(c["ok"] for c in st.derived.get("claims", [])):
        return 1
    return 0


def report_main(argv: list[str] | None = None) -> int:
    """`fltorrent report STUDY.h5 [...] --out DIR [--markdown FILE]` (implemented in report.py)."""
    from .report import report_main as _main

    return _main(argv)
