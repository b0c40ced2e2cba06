"""The privacy study (PAPER.md §7.5-7.6): simulate rounds, attack their traces, put the paper's numbers beside.

Every function returns a list of flat dict rows (one per simulated point and seed) that
jobs/scaling_study.py can dump as JSON/CSV and hand to `privacy.plots.plot_privacy`.  Columns:

  study, privacy, n, m, R, a, seed, window, window_stages, warmup_failed_open, sim_s,
  {sequence,count,cluster}_{max,mean,pooled,max_overlay_only,mean_overlay_only},
  elimination_{max,mean,max_overlay_only,mean_overlay_only}, anonymity_set_{min,mean}, truth_ruled_out,
  baseline, baseline_mean, targets_mean, degree_min, degree_mean,
  eq1_max, eq1_cap, eq1_violations, eq1_throttle_violations, eq1_checked, eq1_gating, gate_releases,
  eq2_bound, eq2_bound_paper, eq2_violations, owner_sent, owner_sent_expected, spray_revealed, audit_ok,
  paper_{sequence,count,cluster}_max (NaN where the paper gives no number),
  coalition rows also {attack}_any, {attack}_per_member, paper_any, paper_per_member.

Simulation defaults are the paper's (§6): 206 chunks of 256 KiB, uplink 15.5-25.3 Mbps, downlink
36.5-121 Mbps, m = 10, R = 0.2, T_lag = 3, K = 10% (swarm-wide), kappa = 1, GreedyFastestFirst.  Rounds
with a warm-up are simulated only up to the end of the warm-up (all the attacks look at); a round without
one is simulated for `bt_window_stages` stages, enough for every peer to first hold k chunks.

`PRIVACY_STUDY` (registered by `grids.py`) runs these sweeps under `fltorrent study` as the `privacy` study:
one point per distinct simulated round and seed (runner `study_point`; the default round n = 100, m = 10,
R = 0.2 is shared by every sweep and simulated once), rows in the study file, claims from `derive_privacy`,
report section in report.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import SwarmConfig, parse_rate
from ..privacy.attacks import PAPER_ATTACKS
from ..privacy.cli import evaluate_trace
from ..trace import Trace, write_trace
from .paper import (
    ASR_ABLATION,
    ASR_COALITION,
    ASR_DEGREE,
    ASR_PEERS,
    ASR_SPRAY,
    PAPER_CHUNK,
    PAPER_CHUNKS,
    PAPER_DOWNLINK,
    PAPER_UPLINK,
)
from .registry import GridArgs, Point, Study, points_for

NAN = float("nan")
# Figs. 6-7 measure attacks over the warm-up ("all warm-up transfers", PAPER.md §4.6); `fltorrent attack` and
# `evaluate_trace` default to the whole round, so every reproduction below asks for the warm-up explicitly.
PAPER_WINDOW = "warmup"
ABLATION_CONFIGS = ("none", "spray", "lags", "spray,lags", "gating", "full")  # Fig. 6: the defence configurations


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
    protocol: str = "paper",
    **config: Any,
) -> tuple[Trace, float]:
    """One simulated round's trace (through its warm-up, or its cover-equivalent span) and the seconds it took."""
    from ..runtime.simulator import simulate

    cfg = SwarmConfig(
        chunk_bytes=chunk_bytes,
        privacy=privacy,
        degree=degree,
        spray_ratio=spray_ratio,
        seed=seed,
        protocol=protocol,  # the paper's figures by default; the whole-round study asks for both
        **config,
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
    for a in PAPER_ATTACKS:
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
    row["truth_ruled_out"] = res["elimination"]["truth_ruled_out"]
    for k in (
        "baseline",
        "baseline_mean",
        "targets_mean",
        "eq1_max",
        "eq1_cap",
        "eq1_violations",
        "eq1_throttle_violations",
        "eq1_checked",
        "eq1_gating",
        "gate_releases",
        "eq2_bound",
    ):
        row[k] = res[k]
    row["degree_min"] = t["min_degree"]
    row["degree_mean"] = t["mean_degree"]
    row |= {
        "eq2_bound_paper": res["eq2_bound_paper"],
        "eq2_violations": res["eq2_violations"],
        "owner_sent": res["owner_sent"],
        "owner_sent_expected": res["owner_sent_expected"],
        "spray_revealed": res["spray_revealed_mean"],
        "audit_ok": res.get("audit", {}).get("ok"),
    }
    if "coalition" in res:
        for a in PAPER_ATTACKS:
            row[f"{a}_any"] = res["coalition"]["any_member_mean"][a]
            row[f"{a}_per_member"] = res["coalition"]["per_member_mean"][a]
    return row


def _paper(row: dict[str, Any], values: tuple[float, ...] | None) -> dict[str, Any]:
    for i, a in enumerate(PAPER_ATTACKS):
        row[f"paper_{a}_max"] = values[i] if values is not None and i < len(values) else NAN
    return row


def _save(trace: Trace, trace_dir: str | Path | None, name: str) -> None:
    if trace_dir is not None:
        write_trace(Path(trace_dir) / f"{name}.h5", trace)


def privacy_ablation(
    peers: int = 100,
    seeds: Iterable[int] = (0,),
    configs: Iterable[str] = ABLATION_CONFIGS,
    trace_dir: str | Path | None = None,
    **sim: Any,
) -> list[dict[str, Any]]:
    """Fig. 6: max ASR per defence configuration at n = 100, m = 10."""
    rows = []
    for priv in configs:
        for seed in seeds:
            tr, dt = simulate_round(priv, peers, seed=seed, **sim)
            _save(tr, trace_dir, f"ablation_{priv.replace(',', '+')}_n{peers}_s{seed}")
            row = _row(
                "ablation",
                evaluate_trace(tr, window=PAPER_WINDOW),
                privacy=priv,
                n=peers,
                m=sim.get("degree", 10),
                seed=seed,
            )
            row |= {"R": sim.get("spray_ratio", 0.2), "a": 1, "sim_s": dt}
            rows.append(_paper(row, ASR_ABLATION.get(priv)))
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
            row = _row(
                "degree",
                evaluate_trace(tr, window=PAPER_WINDOW),
                privacy="full",
                n=peers,
                m=m,
                R=sim.get("spray_ratio", 0.2),
            )
            row |= {"a": 1, "seed": seed, "sim_s": dt, "inv_m": 1 / m}
            rows.append(_paper(row, (ASR_DEGREE.get(m, NAN),)))
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
            row = _row(
                "spray", evaluate_trace(tr, window=PAPER_WINDOW), privacy="full", n=peers, m=sim.get("degree", 10), R=r
            )
            row |= {"a": 1, "seed": seed, "sim_s": dt}
            rows.append(_paper(row, (ASR_SPRAY.get(round(r, 2), NAN),)))
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
            row = _row("peers", evaluate_trace(tr, window=PAPER_WINDOW), privacy="full", n=n, m=sim.get("degree", 10))
            row |= {"R": sim.get("spray_ratio", 0.2), "a": 1, "seed": seed, "sim_s": dt}
            rows.append(_paper(row, ASR_PEERS.get(n)))
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
            res = evaluate_trace(tr, attackers=a, coalitions=coalitions, seed=seed, window=PAPER_WINDOW, audit=False)
            row = _row(
                "coalition", res, privacy="full", n=peers, m=sim.get("degree", 10), R=sim.get("spray_ratio", 0.2)
            )
            any_p, member_p = ASR_COALITION.get(a, (NAN, NAN))
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


# ----------------------------------------------------------------------------------- `fltorrent study privacy`
SWEEP_KEYS: dict[str, str] = {"ablation": "privacy", "degree": "m", "spray": "R", "peers": "n", "coalition": "a"}


def _paper_row(sweep: str, row: dict[str, Any]) -> dict[str, Any]:
    """The paper's value(s) for this row's place in `sweep` (NaN where the paper gives none)."""
    if sweep == "ablation":
        return _paper(row, ASR_ABLATION.get(row["privacy"]))
    if sweep == "degree":
        return _paper(row, (ASR_DEGREE.get(row["m"], NAN),))
    if sweep == "spray":
        return _paper(row, (ASR_SPRAY.get(round(row["R"], 2), NAN),))
    if sweep == "peers":
        return _paper(row, ASR_PEERS.get(row["n"]))
    any_p, member_p = ASR_COALITION.get(row["a"], (NAN, NAN))
    row |= {"paper_any": any_p, "paper_per_member": member_p}
    return _paper(row, None)


def study_point(
    sweeps: list[str],
    privacy: str = "full",
    peers: int = 100,
    degree: int = 10,
    spray_ratio: float = 0.2,
    seed: int = 0,
    update_bytes: int = PAPER_CHUNKS * PAPER_CHUNK,
    chunk_bytes: int = PAPER_CHUNK,
    uplink: tuple[str, str] = PAPER_UPLINK,
    downlink: tuple[str, str] = PAPER_DOWNLINK,
    attackers: list[int] | tuple[int, ...] = (5, 10, 15, 20, 25),
    coalitions: int = 20,
    **config: Any,
) -> dict[str, Any]:
    """Runner of one point of the `privacy` study: simulate one round, attack it, one row per sweep it is part of.

    The default round (full defences, n = 100, m = 10, R = 0.2) is a point of every sweep, so it is simulated
    once and gives the ablation's "full" row, the m = 10 / R = 20% / n = 100 rows and the coalition rows.
    """
    unknown = set(sweeps) - set(SWEEP_KEYS)
    if unknown:
        raise ValueError(f"unknown privacy sweep(s) {sorted(unknown)}")
    chunks = int(update_bytes) // int(chunk_bytes)
    tr, dt = simulate_round(
        privacy, peers, degree, spray_ratio, seed, chunks, chunk_bytes, tuple(uplink), tuple(downlink), **config
    )
    t0 = time.perf_counter()
    res = evaluate_trace(tr, window=PAPER_WINDOW)
    fields = {"privacy": privacy, "n": peers, "m": degree, "R": spray_ratio, "a": 1, "seed": seed}
    rows = []
    for sweep in sweeps:
        if sweep != "coalition":
            row = _row(sweep, res, **fields) | {"inv_m": 1 / degree, "sim_s": dt}
            rows.append(_paper_row(sweep, row))
            continue
        for a in attackers:
            ca = evaluate_trace(tr, attackers=a, coalitions=coalitions, seed=seed, window=PAPER_WINDOW, audit=False)
            row = _row("coalition", ca, **(fields | {"a": a})) | {"inv_m": 1 / degree, "sim_s": dt}
            rows.append(_paper_row("coalition", row))
    summary = {
        "sim_s": dt,
        "eval_s": time.perf_counter() - t0,
        "stages": int(tr.attrs.get("stages", 0)),
        "transfers": int(tr.transfers["stage"].size),
        "window_stages": res["trace"]["window_end_stage"],
        "audit_ok": res.get("audit", {}).get("ok"),
    }
    return {"summary": summary, "rows": rows}


def _grid_spec(mini: bool) -> dict[str, Any]:
    """Sweep values and defaults: the paper's (n = 100, m = 10, R = 0.2), or a miniature that runs in seconds."""
    if mini:
        return {
            "n": 16,
            "m": 4,
            "R": 0.2,
            "chunks": 24,
            "ablation": ABLATION_CONFIGS,
            "degree": (3, 4, 6),
            "spray": (0.1, 0.2, 0.3),
            "peers": (12, 16, 24),
            "coalition": (2, 3),
            "coalitions": 4,
        }
    return {
        "n": 100,
        "m": 10,
        "R": 0.2,
        "chunks": PAPER_CHUNKS,
        "ablation": ABLATION_CONFIGS,
        "degree": tuple(ASR_DEGREE),
        "spray": tuple(ASR_SPRAY),
        "peers": tuple(ASR_PEERS),
        "coalition": tuple(ASR_COALITION),
        "coalitions": 20,
    }


def privacy_grid(args: GridArgs) -> list[Point]:
    """Points of the `privacy` study: one per distinct simulated round and seed (see `study_point`)."""
    g = _grid_spec(bool(args.mini))
    base = {
        "update_bytes": g["chunks"] * PAPER_CHUNK,
        "chunk_bytes": PAPER_CHUNK,
        "uplink": list(PAPER_UPLINK),
        "downlink": list(PAPER_DOWNLINK),
        "attackers": list(g["coalition"]),
        "coalitions": g["coalitions"],
    }
    cells: dict[tuple[str, int, int, float], list[str]] = {}  # (privacy, n, m, R) -> sweeps it belongs to
    for priv in g["ablation"]:
        cells.setdefault((priv, g["n"], g["m"], g["R"]), []).append("ablation")
    for m in g["degree"]:
        cells.setdefault(("full", g["n"], m, g["R"]), []).append("degree")
    for r in g["spray"]:
        cells.setdefault(("full", g["n"], g["m"], r), []).append("spray")
    for n in g["peers"]:
        cells.setdefault(("full", n, g["m"], g["R"]), []).append("peers")
    cells.setdefault(("full", g["n"], g["m"], g["R"]), []).append("coalition")
    pts = []
    for (priv, n, m, r), sweeps in cells.items():
        name = f"{priv.replace(',', '+')}_n{n}_m{m}_R{round(100 * r)}"
        tags = {"privacy": priv, "n": n, "m": m, "R": r, "sweeps": sweeps}
        params = dict(base, sweeps=sweeps, privacy=priv, peers=n, degree=m, spray_ratio=r)
        for p in points_for(name, args, tags, **params):
            pts.append(replace(p, runner="fltorrent_hpc.studies.privacy_sweeps:study_point"))
    return pts


def study_rows(records: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    """The rows of a privacy study file by sweep, in the shape `privacy_study` returns (for plots and reports)."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SWEEP_KEYS}
    for rec in sorted(records, key=lambda r: (r.group, r.seed)):
        for row in rec.rows:
            out.setdefault(row["study"], []).append(row)
    order = {p: i for i, p in enumerate(ABLATION_CONFIGS)}
    for sweep, key in SWEEP_KEYS.items():
        if key == "privacy":
            out[sweep].sort(key=lambda r: (order.get(r[key], len(order)), r[key], r["seed"]))
        else:
            out[sweep].sort(key=lambda r: (r[key], r["seed"]))
    return out


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None else NAN


def sweep_means(rows: list[dict[str, Any]], key: str) -> dict[Any, dict[str, float]]:
    """Per value of `key`: the mean over seeds of every numeric column (NaN-aware), plus `seeds`."""
    import numpy as np

    by: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r[key], []).append(r)
    out: dict[Any, dict[str, float]] = {}
    for x, rs in by.items():
        cols = [c for c in rs[0] if isinstance(rs[0][c], (int, float)) or rs[0][c] is None]
        cell: dict[str, float] = {}
        for c in cols:
            v = np.array([_num(r.get(c)) for r in rs], dtype=float)
            cell[c] = float(np.nanmean(v)) if np.isfinite(v).any() else NAN
        cell["seeds"] = len(rs)
        out[x] = cell
    return out


def tracks_inverse_degree(ms: Iterable[float], asr: Iterable[float]) -> dict[str, float]:
    """How well max ASR follows 1/m: least-squares slope of log ASR on log m (1/m has slope -1) and m*ASR range.

    NaN slope when any ASR is 0 (the log is undefined: an attack that never succeeds does not track 1/m).
    """
    import numpy as np

    m = np.asarray(list(ms), dtype=float)
    a = np.asarray(list(asr), dtype=float)
    ok = np.isfinite(a)
    m, a = m[ok], a[ok]
    if m.size < 2 or (a <= 0).any():
        slope = NAN
    else:
        slope = float(np.polyfit(np.log(m), np.log(a), 1)[0])
    prod = m * a
    return {
        "slope": slope,
        "m_asr_min": float(prod.min()) if prod.size else NAN,
        "m_asr_max": float(prod.max()) if prod.size else NAN,
        "points": int(m.size),
    }


TRACK_SLOPE = (-1.5, -0.5)  # "max ASR tracks 1/m": log-log slope in this range ...
TRACK_RATIO = (0.5, 2.0)  # ... and m * max ASR in this range at every m (paper: slope -1.14, m*ASR 1.04-1.35)


def _tracks(t: dict[str, float]) -> bool:
    s = t["slope"]
    return (
        s == s
        and TRACK_SLOPE[0] <= s <= TRACK_SLOPE[1]
        and TRACK_RATIO[0] <= t["m_asr_min"]
        and t["m_asr_max"] <= TRACK_RATIO[1]
    )


def derive_privacy(recs: list[Any]) -> dict[str, Any]:
    """Per-sweep means over seeds, the 1/m fit and the issue's claims (pass/fail) for the `privacy` study."""
    rows = study_rows(recs)
    out: dict[str, Any] = {s: sweep_means(rows[s], k) for s, k in SWEEP_KEYS.items() if rows.get(s)}
    claims = []

    def claim(text: str, ok: bool, value: str) -> None:
        claims.append({"claim": text, "ok": bool(ok), "value": value})

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%" if x == x else "n/a"

    abl = out.get("ablation", {})
    none, full = abl.get("none"), abl.get("full")
    if none is not None:
        claim(
            "no defences: Sequence max ASR >= 0.9 (paper 100%)",
            none["sequence_max"] >= 0.9,
            f"Sequence {pct(none['sequence_max'])}, Count {pct(none['count_max'])}, Cluster {pct(none['cluster_max'])}"
            f" (n={none['n']:.0f}, m={none['m']:.0f})",
        )
    if full is not None:
        paper = ASR_ABLATION["full"]
        worst = max(full[f"{a}_max"] for a in PAPER_ATTACKS)
        claim(
            f"full defences at n={full['n']:.0f}, m={full['m']:.0f}: max ASR <= 0.15 for every attack "
            f"(paper {' / '.join(f'{100 * p:.1f}' for p in paper)}%)",
            worst <= 0.15,
            ", ".join(f"{a.capitalize()} {pct(full[f'{a}_max'])}" for a in PAPER_ATTACKS)
            + f"; Elimination (not in the paper) {pct(full['elimination_max'])}",
        )
    gated = [r for s in ("ablation", "degree", "spray", "peers") for r in rows.get(s, []) if r.get("eq1_gating")]
    if gated:
        viol = sum(int(r["eq1_violations"]) + int(r.get("eq1_throttle_violations") or 0) for r in gated)
        checked = sum(int(r.get("eq1_checked") or 0) for r in gated)
        claim(
            "zero Eq. 1 violations (O_u/B_u <= kappa/k and O_u <= kappa) in every gated round",
            viol == 0,
            f"{viol} violations over {checked} warm-up transfers in {len(gated)} round(s); "
            f"gated-start releases {sum(int(r['gate_releases']) for r in gated)}",
        )
    deg = out.get("degree", {})
    if len(deg) >= 2:
        ms = sorted(deg)
        best = [max(deg[m][f"{a}_max"] for a in PAPER_ATTACKS) for m in ms]
        fit = tracks_inverse_degree(ms, best)
        pm = [m for m in ms if m in ASR_DEGREE]
        pfit = tracks_inverse_degree(pm, [ASR_DEGREE[m] for m in pm])
        elim = tracks_inverse_degree(ms, [deg[m]["elimination_max"] for m in ms])
        out["inverse_degree"] = {"paper_attacks": fit, "paper": pfit, "elimination": elim}
        ref = f" (paper: slope {pfit['slope']:.2f}, m x ASR {pfit['m_asr_min']:.2f}-{pfit['m_asr_max']:.2f})"

        def slope(t: dict[str, float]) -> str:
            return f"slope {t['slope']:.2f}" if t["slope"] == t["slope"] else "slope undefined (an ASR is 0)"

        claim(
            "max ASR tracks 1/m: log-log slope of max ASR (max over Sequence/Count/Cluster) against m in "
            f"[{TRACK_SLOPE[0]}, {TRACK_SLOPE[1]}] and m x max ASR in [{TRACK_RATIO[0]}, {TRACK_RATIO[1]}] at every m"
            + (ref if pfit["points"] >= 2 else ""),
            _tracks(fit),
            ", ".join(f"m={m}: {pct(b)}" for m, b in zip(ms, best))
            + f"; {slope(fit)}; Elimination (not in the paper): {slope(elim)}, "
            f"m x ASR {elim['m_asr_min']:.2f}-{elim['m_asr_max']:.2f}",
        )
    out["claims"] = claims
    return out


PRIVACY_STUDY = Study(
    "privacy",
    "Attribution attacks: defence ablation, degree m, spray ratio R, peers n, coalitions a",
    "Figs. 6-7",
    privacy_grid,
    derive_privacy,
)
