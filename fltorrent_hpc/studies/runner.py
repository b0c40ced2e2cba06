"""One point of a study, run: a simulated round (or a "module:function" runner) -> {summary, arrays, rows}.

This runs in a worker process and never touches the study file (only the parent writes it, see `store`).
"""

from __future__ import annotations

import importlib
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..config import parse_bytes
from .registry import Point

SIM_KWARGS = ("peers", "update_bytes", "uplink", "downlink", "maxflow", "leave_fraction", "leave_stage", "warmup_only")
STAGE_ARRAYS = {
    "utilization": np.float32,
    "phase": np.int8,
    "transfers": np.int32,
    "capacity": np.int64,
    "maxflow": np.int32,
}


def _stage_trace_class():
    from ..trace import Trace

    class StageTrace(Trace):
        """Keeps per-stage rows and drops per-transfer rows: an n = 500 round has ~50M transfers (GBs)."""

        def add_transfers(self, **cols: Any) -> None:
            return None

    return StageTrace


@contextmanager
def _stage_only_traces():
    # The simulator has no stage-only trace mode yet (asked for); swap the Trace class it instantiates for the
    # duration of one call.  This runs in the worker process (or the parent with --jobs 1), single-threaded.
    from ..runtime import simulator as sim

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
    from ..config import SwarmConfig, parse_range, parse_rate
    from ..runtime.simulator import simulate
    from ..trace import write_trace

    cfg_fields = set(SwarmConfig.__dataclass_fields__) - {"extra"}
    unknown = set(params) - cfg_fields - set(SIM_KWARGS) - {"spectrum"}
    if unknown:
        raise ValueError(f"unknown study parameter(s) {sorted(unknown)}")
    cfg = SwarmConfig(**{k: v for k, v in params.items() if k in cfg_fields})
    kw = {k: params[k] for k in SIM_KWARGS if k in params and params[k] is not None}
    kw["update_bytes"] = parse_bytes(kw["update_bytes"])
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
    from ..swarm.overlay import build_overlay

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

    root = Path(__file__).resolve().parent.parent  # the package
    h = hashlib.sha1()
    for p in sorted([*root.glob("swarm/*.py"), root / "runtime" / "simulator.py", root / "config.py"]):
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


def ideal_round_stages(params: dict[str, Any]) -> float:
    """Uplink-bound lower bound on a full round: every peer must receive K(n-1) chunks over the sum of budgets."""
    from ..config import parse_range, parse_rate
    from ..runtime.simulator import draw_links
    from ..swarm.budget import chunk_budgets

    n, C = int(params["peers"]), parse_bytes(params["chunk_bytes"])
    K = math.ceil(parse_bytes(params["update_bytes"]) / C)
    up, _ = draw_links(
        n,
        parse_range(params["uplink"], parse_rate),
        parse_range(params["downlink"], parse_rate),
        int(params.get("seed", 0)),
    )
    ub = chunk_budgets(up, C, float(params.get("slot_seconds", 1.0)))
    return K * n * (n - 1) / max(int(ub.sum()), 1)


def mid_round_stage(params: dict[str, Any]) -> int:
    """Half the uplink-bound ideal round of this point's peers and links: 'mid-round' for the churn runs."""
    return int(0.5 * ideal_round_stages(params))
