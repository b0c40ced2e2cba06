"""Simulated transport: slots of Δ seconds, per-peer link budgets, no bytes moved.

It drives the same `SwarmRound` the MPI engine drives, marks every scheduled transfer delivered, and
records the round in a `Trace`.  Use `simulate(...)` from code, `fltorrent simulate` from a shell.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import SwarmConfig, privacy_label
from ..errors import ConfigError
from ..swarm import SwarmRound, rng
from ..swarm.budget import chunk_budgets, too_slow
from ..swarm.round import BT, WARMUP
from ..trace import Trace
from .recorder import RoundRecorder

PAPER_UPLINK = ("15.5Mbps", "25.3Mbps")
PAPER_DOWNLINK = ("36.5Mbps", "121Mbps")
PAPER_CHUNK = 256 * 1024
PAPER_UPDATE = 206 * PAPER_CHUNK


@dataclass
class SimResult:
    summary: dict[str, Any]
    trace: Trace | None
    round: SwarmRound


def draw_links(
    n: int, uplink: tuple[float, float], downlink: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-peer uplink and downlink rates (bytes/s), uniform in the given ranges."""
    gen = rng.generator(seed, rng.RATES)
    up = gen.uniform(uplink[0], uplink[1], size=n) if uplink[1] > uplink[0] else np.full(n, uplink[0])
    down = gen.uniform(downlink[0], downlink[1], size=n) if downlink[1] > downlink[0] else np.full(n, downlink[0])
    return up, down


def _peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def simulate(
    config: SwarmConfig,
    peers: int,
    update_bytes: int,
    uplink: tuple[float, float],
    downlink: tuple[float, float],
    maxflow: bool = False,
    progress: bool = False,
    leave_fraction: float = 0.0,
    leave_stage: int | None = None,
    trace: bool = True,
    warmup_only: bool = False,
    maxflow_every: int = 1,
) -> SimResult:
    """Run one round in simulated time and summarise it (fields listed in docs/ARCHITECTURE.md).

    With `maxflow`, the stage bound is solved on every `maxflow_every`-th warm-up stage only (GFF / max-flow is
    then the ratio over those stages), and a second, max-flow-scheduled warm-up gives the makespan ratio.
    """
    t0 = time.perf_counter()
    C = config.chunk_bytes
    K = max(1, math.ceil(update_bytes / C)) if update_bytes > 0 else 0
    up_rate, down_rate = draw_links(peers, uplink, downlink, config.seed)
    slow = too_slow(up_rate, C, config.slot_seconds) | too_slow(down_rate, C, config.slot_seconds)
    if np.any(slow) or np.any(up_rate <= 0) or np.any(down_rate <= 0):
        raise ConfigError(
            f"a link of {min(up_rate.min(), down_rate.min()):.0f} B/s moves less than one {C}-byte chunk per "
            f"{config.slot_seconds}s slot; raise --slot-seconds or lower --chunk-bytes"
        )
    if config.sim_model == "events":
        return _simulate_events(config, peers, update_bytes, up_rate, down_rate, maxflow, leave_fraction, t0)
    ub, db = chunk_budgets(up_rate, C, config.slot_seconds), chunk_budgets(down_rate, C, config.slot_seconds)
    rnd = SwarmRound(config, peers, K, ub, db, seed=config.seed, compute_maxflow=maxflow, maxflow_every=maxflow_every)
    s_max = rnd.deadline()
    rec = None
    if trace:
        rec = RoundRecorder(
            rnd,
            config,
            "sim",
            update_bytes,
            seed=config.seed,
            attrs={
                "update_bytes": int(update_bytes),
                "config": {**config.to_dict(), "update_bytes": int(update_bytes)},
            },
            peers={"uplink": up_rate, "downlink": down_rate, "weight": np.ones(rnd.n)},
        )
    leavers = np.zeros(0, dtype=np.int64)
    if leave_fraction > 0:
        gen = rng.generator(config.seed, rng.LEAVE)
        leavers = np.sort(gen.choice(peers, size=int(round(leave_fraction * peers)), replace=False))
    bar = _progress(progress, peers * rnd.N, "max-flow reference" if warmup_only else "swarm")
    moved = cap = wu_moved = wu_cap = 0
    mf_sum = mf_gff = 0
    try:
        while not rnd.done and rnd.stage < s_max:
            if leavers.size and rnd.stage == (leave_stage if leave_stage is not None else 0):
                rnd.leave(leavers, repair=config.overlay == "expander")
            if warmup_only and rnd.phase == BT:
                break
            st = rnd.next_stage()
            if warmup_only and st.phase == BT:
                break
            rnd.complete(st)
            moved += st.size
            cap += st.capacity
            if st.phase == WARMUP:
                wu_moved += st.size
                wu_cap += st.capacity
                if st.maxflow >= 0:
                    mf_sum += st.maxflow
                    mf_gff += int(np.count_nonzero(st.kind == WARMUP))
            if rec is not None:
                dt = config.slot_seconds
                rec.stage(st, t_start=st.index * dt, t=(st.index + 1) * dt)
            if bar is not None and bar.due(st.index):
                bar.update(int(rnd.held[rnd.active[: rnd.n]].sum()), rnd.stage)
    finally:
        if bar is not None:
            bar.stop()
    stages = rnd.stage
    s_bt = rnd.s_bt if rnd.s_bt >= 0 else stages
    dt = config.slot_seconds
    act = rnd.active[: rnd.n]
    A = rnd.reconstructable()
    summary: dict[str, Any] = {
        **_summary_head(config, peers, K, update_bytes),
        "cover_k": rnd.k,
        "stages": stages,
        "warmup_stages": s_bt,
        "round_s": stages * dt,
        "warmup_s": s_bt * dt,
        "bt_s": (stages - s_bt) * dt,
        "warmup_share": (s_bt / stages) if stages else 0.0,
        "utilization": moved / cap if cap else 0.0,
        "warmup_utilization": wu_moved / wu_cap if wu_cap else 0.0,
        "complete_fraction": float(np.mean(rnd.complete_stage[act] >= 0)) if act.any() else 0.0,
        "reconstructable_fraction": float(A[act].mean()) if act.any() else 0.0,
        "deadline_stages": s_max,
        "deadline_hit": bool(not rnd.done and not warmup_only),
        "warmup_failed_open": rnd.warmup_failed_open,
        "gate_releases": rnd.releases,
        "transfers": moved,
        "peers_left": int(leavers.size),
        "lambda2": float(rnd.overlay.lambda2),
        "wall_s": time.perf_counter() - t0,
        "peak_rss_bytes": _peak_rss(),
    }
    if maxflow:
        summary["gff_maxflow_ratio"] = mf_gff / mf_sum if mf_sum else 1.0
        summary["maxflow_warmup_transfers"] = mf_sum
        summary["maxflow_every"] = max(1, int(maxflow_every))
        if not warmup_only and config.scheduler != "maxflow" and rnd.privacy:
            ref = simulate(
                config.replace(scheduler="maxflow"),
                peers,
                update_bytes,
                uplink,
                downlink,
                trace=False,
                warmup_only=True,
                progress=progress,
            )
            summary["maxflow_warmup_stages"] = ref.summary["warmup_stages"]
            summary["maxflow_makespan_ratio"] = ref.summary["warmup_stages"] / max(s_bt, 1)
    tr = None
    if rec is not None:
        tr = rec.finish(A, A[act].all(axis=0) if act.any() else np.ones(rnd.n, dtype=bool), s_bt, stages)
    return SimResult(summary, tr, rnd)


def _simulate_events(
    config: SwarmConfig,
    peers: int,
    update_bytes: int,
    up: np.ndarray,
    down: np.ndarray,
    maxflow: bool,
    leave_fraction: float,
    t0: float,
) -> SimResult:
    """`sim_model="events"`: the warm-up in slots, BitTorrent in continuous time (runtime/sim_events.py).
    No trace (no stages to record) and no departures or max-flow bound, which are stage-based."""
    from .sim_events import capacity_bound, simulate_events

    if maxflow or leave_fraction > 0:
        raise ConfigError("sim_model 'events' has no max-flow bound or departures (stage-based); use 'slotted'")
    r = simulate_events(config, up, down, update_bytes)
    K = max(1, math.ceil(update_bytes / config.chunk_bytes)) if update_bytes > 0 else 0
    summary: dict[str, Any] = {
        **_summary_head(config, peers, K, update_bytes),
        "sim_model": "events",
        "stages": r.warmup_stages,
        "warmup_stages": r.warmup_stages,
        "round_s": r.round_s,
        "warmup_s": r.warmup_s,
        "bt_s": r.bt_s,
        "warmup_share": r.warmup_s / r.round_s if r.round_s else 0.0,
        "bound_s": capacity_bound(up, update_bytes, down),
        "complete_fraction": float(np.mean(r.have.all(axis=1))) if r.have.size else 1.0,
        "transfers": r.transfers,
        "duplicates": r.duplicates,
        "events": r.events,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_bytes": _peak_rss(),
    }
    return SimResult(summary, None, r.round)


def _summary_head(config: SwarmConfig, peers: int, K: int, update_bytes: int) -> dict[str, Any]:
    """What a round was: the first keys of both models' summaries."""
    return {
        "peers": peers,
        "chunks_per_update": K,
        "chunk_bytes": config.chunk_bytes,
        "update_bytes": int(update_bytes),
        "privacy": privacy_label(config.privacy),
        "scheduler": config.scheduler,
        "overlay": config.overlay,
        "degree": config.degree,
        "seed": config.seed,
    }


def _progress(on: bool, total: int, label: str):
    """A bar on a terminal; elsewhere (logs, pipes, batch jobs) a plain line every PROGRESS_EVERY_S."""
    if not on:
        return None
    return _Bar(total, label) if sys.stderr.isatty() else _Lines(total, label)


PROGRESS_EVERY_S = 10.0


class _Bar:
    def __init__(self, total: int, label: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(
            TextColumn(label), BarColumn(), TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn(), transient=True
        )
        self.p.start()
        self.task = self.p.add_task(label, total=total)

    def due(self, stage: int) -> bool:
        return stage % 10 == 0

    def update(self, held: int, stage: int) -> None:
        self.p.update(self.task, completed=held)

    def stop(self) -> None:
        self.p.stop()


class _Lines:
    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = max(total, 1), label
        self.t0 = time.monotonic()
        self.next = self.t0 + PROGRESS_EVERY_S

    def due(self, stage: int) -> bool:
        return time.monotonic() >= self.next

    def update(self, held: int, stage: int) -> None:
        now = time.monotonic()
        self.next = now + PROGRESS_EVERY_S
        print(
            f"{self.label}: {held / self.total:6.1%} of chunk copies held, stage {stage}, {now - self.t0:.0f}s",
            file=sys.stderr,
            flush=True,
        )

    def stop(self) -> None:
        pass
