"""The study registry: what a study is (a named grid of points), and the table `fltorrent study` looks names up in.

The registry knows nothing of any particular study: `grids.py` registers the built-in ones (the privacy study
included) explicitly, and a caller adds its own with `register(Study(...))`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import parse_bytes
from .paper import PAPER_CHUNK


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
        k = math.ceil(parse_bytes(p.get("update_bytes", 1)) / parse_bytes(p.get("chunk_bytes", PAPER_CHUNK)))
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
    """A named grid.  `derive` turns records into JSON-able figures and the issue's claims (pass/fail).
    `default_seeds`: the seeds `fltorrent study NAME` runs when --seeds is not given."""

    name: str
    title: str
    paper: str
    grid: Callable[[GridArgs], list[Point]]
    derive: Callable[[list[Record]], dict[str, Any]] | None = None
    default_seeds: tuple[int, ...] = (0,)


STUDIES: dict[str, Study] = {}


def register(study: Study) -> Study:
    """Add (or replace) a named study; other modules call this to extend `fltorrent study`."""
    STUDIES[study.name] = study
    return study


def points_for(group: str, args: GridArgs, tags: dict[str, Any] | None = None, **params: Any) -> list[Point]:
    """One point per seed: name = GROUP_sSEED, params['seed'] = seed."""
    return [Point(f"{group}_s{s}", group, s, {**params, "seed": s}, dict(tags or {}, group=group)) for s in args.seeds]
