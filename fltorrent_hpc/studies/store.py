"""The study file (STUDY.h5): HDF5 records of finished points, written only by the parent process.

Each point is committed by an atomic file replace with a `done` attribute, so an interrupted study resumes
where it stopped and a crash never leaves a half-written point behind.  Layout: docs/STUDIES.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .registry import GridArgs, Point, Record, Study

SCHEMA = "fltorrent-study/1"


def jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
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


def dumps(v: Any) -> str:
    return json.dumps(jsonable(v), sort_keys=True)


def open_h5(path: Path, mode: str):
    import h5py

    return h5py.File(path, mode)


def load_records(path: str | Path) -> tuple[dict[str, Any], list[Record]]:
    """Root attributes and the finished points of a study file."""
    path = Path(path)
    with open_h5(path, "r") as f:
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


def done_points(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    with open_h5(path, "r") as f:
        pts = f.get("points")
        if pts is None:
            return {}
        return {n: json.loads(pts[n].attrs["params"]) for n in pts if pts[n].attrs.get("done", False)}


def commit(path: Path, write: Callable[[Any], None]) -> None:
    """Apply `write(h5file)` to a copy of the study file, then atomically replace the original."""
    tmp = path.with_name(path.name + ".tmp")
    if path.exists():
        shutil.copyfile(path, tmp)
    elif tmp.exists():
        tmp.unlink()
    with open_h5(tmp, "a") as f:
        write(f)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_point(path: Path, point: Point, result: dict[str, Any]) -> None:
    def write(f) -> None:
        pts = f.require_group("points")
        if point.name in pts:
            del pts[point.name]
        g = pts.create_group(point.name)
        g.attrs["group"] = point.group
        g.attrs["seed"] = point.seed
        g.attrs["runner"] = point.runner
        g.attrs["params"] = dumps(point.params)
        g.attrs["tags"] = dumps(point.tags)
        g.attrs["summary"] = dumps(result["summary"])
        g.attrs["rows"] = json.dumps(jsonable(result.get("rows", [])))  # keep the column order
        g.attrs["elapsed_s"] = float(result["elapsed_s"])
        for k, v in result.get("arrays", {}).items():
            a = np.asarray(v)
            big = a.size > 4096
            g.create_dataset(k, data=a, compression="gzip" if big else None)
        g.attrs["done"] = True

    commit(path, write)


def write_root(path: Path, study: Study, args: GridArgs, command: str) -> None:
    def write(f) -> None:
        f.attrs["schema"] = SCHEMA
        f.attrs["study"] = study.name
        f.attrs["title"] = study.title
        f.attrs["paper"] = study.paper
        f.attrs["mini"] = bool(args.mini)
        f.attrs["seeds"] = dumps(list(args.seeds))
        f.attrs["command"] = command
        f.attrs["code_version"] = code_version()
        f.attrs["host_cpus"] = os.cpu_count() or 0
        if "created" not in f.attrs:
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.require_group("points")

    commit(path, write)


def code_version() -> str:
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
