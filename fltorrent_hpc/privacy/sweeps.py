"""The privacy study (PAPER.md §7.5-7.6): simulate rounds, attack their traces, put the paper's numbers beside.

Every function returns a list of flat dict rows (one per simulated point and seed) that
jobs/scaling_study.py can dump as JSON/CSV and hand to `privacy.plots.plot_privacy`.  Columns:

  study, privacy, n, m, R, a, seed, window, window_stages, warmup_failed_open, sim_s,
  {sequence,count,cluster}_{max,mean,pooled,max_overlay_only,mean_overlay_only}, baseline, baseline_mean,
  eq1_max, eq1_cap, eq1_violations, gate_releases, eq2_bound, eq2_bound_paper, eq2_violations,
  owner_sent, owner_sent_expected, spray_revealed, audit_ok,
  paper_{sequence,count,cluster}_max (NaN where the paper gives no number),
  coalition rows also {attack}_any, {attack}_per_member, paper_any, paper_per_member.

Simulation defaults are the paper's (§6): 206 chunks of 256 KiB, uplink 15.5-25.3 Mbps, downlink
36.5-121 Mbps, m = 10, R = 0.2, T_lag = 3, K = 10% (swarm-wide), kappa = 1, GreedyFastestFirst.  Rounds
with a warm-up are simulated only up to the end of the warm-up (all the attacks look at); a round without
one is simulated for `bt_window_stages` stages, enough for every peer to first hold k chunks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..config import SwarmConfig, parse_rate
from ..trace import Trace, write_trace
from .attacks import ATTACKS
from .cli import evaluate_trace

PAPER_CHUNK = 256 * 1024
PAPER_CHUNKS = 206
PAPER_UPLINK = ("15.5Mbps", "25.3Mbps")
PAPER_DOWNLINK = ("36.5Mbps", "121Mbps")
NAN = float("nan")

# PAPER.md §7.5 (Fig. 6, max ASR, n = 100, m = 10); "both" = pre-round + time-lag, which the paper's Fig. 7
# calls full defences (11.25% at m = 10), so it is set beside our "full" (spray + lags + gating).
PAPER_ABLATION: dict[str, tuple[float, float, float]] = {
    "none": (1.00, 1.00, 1.00),
    "spray": (0.141, 0.099, 0.133),
    "lags": (0.689, 0.660, 0.557),
    "full": (0.112, 0.068, 0.017),
}
# PAPER.md §7.6 (Fig. 7, full defences). (a) and (b) give one "max ASR" curve without naming the attack; it
# matches Fig. 6's Sequence value at m = 10, so it is set beside Sequence.
PAPER_DEGREE: dict[int, float] = {5: 0.2699, 10: 0.1125, 15: 0.0724, 20: 0.0520, 25: 0.0429}
PAPER_SPRAY: dict[float, float] = {0.1: 0.1143, 0.2: 0.1125, 0.3: 0.1132, 0.4: 0.1119, 0.5: 0.1127}
PAPER_PEERS: dict[int, tuple[float, float, float]] = {
    100: (0.1090, 0.0558, 0.0153),
    200: (0.1008, 0.0853, 0.0261),
    300: (0.0940, 0.0787, 0.0414),
    400: (0.0820, 0.0732, 0.0411),
    500: (0.0731, 0.0678, 0.0417),
}
PAPER_COALITION: dict[int, tuple[float, float]] = {  # (any succeeds, per-attacker average)
    5: (0.1356, 0.1131),
    10: (0.1713, 0.1198),
    15: (0.2096, 0.1256),
    20: (0.2547, 0.1331),
    25: (0.3082, 0.1432),
}


def simulate_round(
    privacy: str = "full",
    peers: int = 100,
    degree: int = 10,
    spray_ratio: float = 0.2,
    seed: int = 0,
    chunks: int = PAPER_CHUNKS,
    chunk_bytes: int = PAPER_CHUNK,
    uplink: tuple[str, str] = PAPER_UPLINK,
    downlink: tuple[str, str] = PAPER_DOWNLINK,
    bt_window_stages: int | None = None,
    **config: Any,
) -> tuple[Trace, float]:
    """One simulated round's trace (through its warm-up, or its cover-equivalent span) and the seconds it took."""
    from ..transport.sim import simulate

    cfg = SwarmConfig(
        chunk_bytes=chunk_bytes, privacy=privacy, degree=degree, spray_ratio=spray_ratio, seed=seed, **config
    )
    up = (parse_rate(uplink[0]), parse_rate(uplink[1]))
    down = (parse_rate(downlink[0]), parse_rate(downlink[1]))
    warm = bool(cfg.privacy)
    if not warm:
        k = cfg.cover_threshold(peers, chunks)
        # every peer must first hold k chunks; BitTorrent feeds the slowest peers at a fraction of the mean
        # upload rate, so allow 5x the time the mean rate needs
        need = bt_window_stages or int(5 * math.ceil(k / (0.5 * (up[0] + up[1]) * cfg.slot_seconds / chunk_bytes)))
        cfg = cfg.replace(deadline_stages=need)
    t0 = time.perf_counter()
    res = simulate(cfg, peers, chunks * chunk_bytes, uplink=up, downlink=down, warmup_only=warm)
    return res.trace, time.perf_counter() - t0


def _row(study: str, res: dict[str, Any], **fields: Any) -> dict[str, Any]:
    t = res["trace"]
    row: dict[str, Any] = {"study": study, **fields}
    row |= {
        "window": t["window"],
        "window_stages": t["window_end_stage"],
        "warmup_failed_open": t["warmup_failed_open"],
    }
    for a in ATTACKS:
        row[f"{a}_max"] = res["asr_max"][a]
        row[f"{a}_mean"] = res["asr_mean"][a]
        row[f"{a}_pooled"] = res["asr_pooled"][a]
        row[f"{a}_max_overlay_only"] = res["asr_max_overlay_only"][a]
        row[f"{a}_mean_overlay_only"] = res["asr_mean_overlay_only"][a]
    row["elimination_max"] = res["elimination"]["asr_max"]
    row["elimination_mean"] = res["elimination"]["asr_mean"]
    row["anonymity_set_min"] = res["elimination"]["candidates_min"]
    row["anonymity_set_mean"] = res["elimination"]["candidates_mean"]
    row["elimination_max_overlay_only"] = res["elimination_overlay_only"]["asr_max"]
    row["elimination_mean_overlay_only"] = res["elimination_overlay_only"]["asr_mean"]
    for k in ("baseline", "baseline_mean", "eq1_max", "eq1_cap", "eq1_violations", "gate_releases", "eq2_bound"):
        row[k] = res[k]
    row |= {
        "eq2_bound_paper": res["eq2_bound_paper"],
        "eq2_violations": res["eq2_violations"],
        "owner_sent": res["owner_sent"],
        "owner_sent_expected": res["owner_sent_expected"],
        "spray_revealed": res["spray_revealed_mean"],
        "audit_ok": res.get("audit", {}).get("ok"),
    }
    if "coalition" in res:
        for a in ATTACKS:
            row[f"{a}_any"] = res["coalition"]["any_member_mean"][a]
            row[f"{a}_per_member"] = res["coalition"]["per_member_mean"][a]
    return row


def _paper(row: dict[str, Any], values: tuple[float, ...] | None) -> dict[str, Any]:
    for i, a in enumerate(ATTACKS):
        row[f"paper_{a}_max"] = values[i] if values is not None and i < len(values) else NAN
    return row


def _save(trace: Trace, trace_dir: str | Path | None, name: str) -> None:
    if trace_dir is not None:
        write_trace(Path(trace_dir) / f"{name}.h5", trace)


def privacy_ablation(
    peers: int = 100,
    seeds: Iterable[int] = (0,),
    configs: Iterable[str] = ("none", "spray", "lags", "spray,lags", "gating", "full"),
    trace_dir: str | Path | None = None,
    **sim: Any,
) -> list[dict[str, Any]]:
    """Fig. 6: max ASR per defence configuration at n = 100, m = 10."""
    rows = []
    for priv in configs:
        for seed in seeds:
            tr, dt = simulate_round(priv, peers, seed=seed, **sim)
            _save(tr, trace_dir, f"ablation_{priv.replace(',', '+')}_n{peers}_s{seed}")
            row = _row("ablation", evaluate_trace(tr), privacy=priv, n=peers, m=sim.get("degree", 10), seed=seed)
            row |= {"R": sim.get("spray_ratio", 0.2), "a": 1, "sim_s": dt}
            rows.append(_paper(row, PAPER_ABLATION.get(priv)))
    return rows


def sweep_degree(
    degrees: Iterable[int] = (5, 10, 15, 20, 25),
    peers: int = 100,
    seeds: Iterable[int] = (0,),
    trace_dir: str | Path | None = None,
    **sim: Any,
) -> list[dict[str, Any]]:
    """Fig. 7(a): max ASR against the minimum degree m under full defences (baseline 1/m)."""
    rows = []
    for m in degrees:
        for seed in seeds:
            tr, dt = simulate_round("full", peers, degree=m, seed=seed, **sim)
            _save(tr, trace_dir, f"degree_m{m}_n{peers}_s{seed}")
            row = _row("degree", evaluate_trace(tr), privacy="full", n=peers, m=m, R=sim.get("spray_ratio", 0.2))
            row |= {"a": 1, "seed": seed, "sim_s": dt, "inv_m": 1 / m}
            rows.append(_paper(row, (PAPER_DEGREE.get(m, NAN),)))
    return rows


def sweep_spray(
    ratios: Iterable[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
    peers: int = 100,
    seeds: Iterable[int] = (0,),
    trace_dir: str | Path | None = None,
    **sim: Any,
) -> list[dict[str, Any]]:
    """Fig. 7(b): max ASR against the pre-round spray ratio R under full defences."""
    rows = []
    for r in ratios:
        for seed in seeds:
            tr, dt = simulate_round("full", peers, spray_ratio=r, seed=seed, **sim)
            _save(tr, trace_dir, f"spray_R{int(round(100 * r))}_n{peers}_s{seed}")
            row = _row("spray", evaluate_trace(tr), privacy="full", n=peers, m=sim.get("degree", 10), R=r)
            row |= {"a": 1, "seed": seed, "sim_s": dt}
            rows.append(_paper(row, (PAPER_SPRAY.get(round(r, 2), NAN),)))
    return rows


def sweep_peers(
    sizes: Iterable[int] = (100, 200, 300, 400, 500),
    seeds: Iterable[int] = (0,),
    trace_dir: str | Path | None = None,
    **sim: Any,
) -> list[dict[str, Any]]:
    """Fig. 7(c): ASR of each attack against the number of peers (m = 10, full defences)."""
    rows = []
    for n in sizes:
        for seed in seeds:
            tr, dt = simulate_round("full", n, seed=seed, **sim)
            _save(tr, trace_dir, f"peers_n{n}_s{seed}")
            row = _row("peers", evaluate_trace(tr), privacy="full", n=n, m=sim.get("degree", 10))
            row |= {"R": sim.get("spray_ratio", 0.2), "a": 1, "seed": seed, "sim_s": dt}
            rows.append(_paper(row, PAPER_PEERS.get(n)))
    return rows


def sweep_coalitions(
    sizes: Iterable[int] = (5, 10, 15, 20, 25),
    peers: int = 100,
    seeds: Iterable[int] = (0,),
    coalitions: int = 20,
    trace_dir: str | Path | None = None,
    **sim: Any,
) -> list[dict[str, Any]]:
    """Fig. 7(d): colluding coalitions of a peers on the same full-defence rounds."""
    rows = []
    for seed in seeds:
        tr, dt = simulate_round("full", peers, seed=seed, **sim)
        _save(tr, trace_dir, f"coalition_n{peers}_s{seed}")
        for a in sizes:
            res = evaluate_trace(tr, attackers=a, coalitions=coalitions, seed=seed, audit=False)
            row = _row(
                "coalition", res, privacy="full", n=peers, m=sim.get("degree", 10), R=sim.get("spray_ratio", 0.2)
            )
            any_p, member_p = PAPER_COALITION.get(a, (NAN, NAN))
            row |= {"a": a, "seed": seed, "sim_s": dt, "paper_any": any_p, "paper_per_member": member_p}
            rows.append(_paper(row, None))
    return rows


def privacy_study(
    quick: bool = False,
    seeds: Iterable[int] = (0,),
    trace_dir: str | Path | None = None,
    **sim: Any,
) -> dict[str, list[dict[str, Any]]]:
    """All of Figs. 6-7.  `quick` runs the n = 100 points only (4-8 minutes on 2 cores; n = 500 alone about 6)."""
    seeds = tuple(seeds)
    study = {
        "ablation": privacy_ablation(seeds=seeds, trace_dir=trace_dir, **sim),
        "degree": sweep_degree(seeds=seeds, trace_dir=trace_dir, **sim),
        "spray": sweep_spray(seeds=seeds, trace_dir=trace_dir, **sim),
        "coalition": sweep_coalitions(seeds=seeds, trace_dir=trace_dir, **sim),
    }
    study["peers"] = sweep_peers(sizes=(100,) if quick else (100, 200, 300, 400, 500), seeds=seeds, **sim)
    return study
