"""From a study's records to its figures and claims: grouping over seeds, fits, and one `derive_*` per study.

Each `derive_*` returns JSON-able figures and the issue's claims (pass/fail) that `fltorrent study` prints
and writes into STUDY.json; report.py reads the same records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from . import paper
from .registry import Record


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


def mean(rs: Sequence[Record], key: str) -> float:
    return mean_std(rs, key)[0]


def claim(text: str, ok: bool, value: str) -> dict[str, Any]:
    return {"claim": text, "ok": bool(ok), "value": value}


def by_tag(recs: Iterable[Record], tag: str) -> dict[Any, list[Record]]:
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
    by_n = {int(k): v for k, v in by_tag(recs, "n").items()}
    ns = sorted(by_n)
    rows = {
        n: {
            k: mean(by_n[n], k)
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
        claim(
            "warm-up share within 9-15% at every n",
            all(0.09 <= s <= 0.15 for s in shares),
            ", ".join(f"n={n}: {rows[n]['warmup_share']:.1%}" for n in ns),
        ),
        claim(
            "round time grows about linearly in n (R^2 >= 0.98, residuals <= 10%)",
            len(ns) >= 3 and fit["r2"] >= 0.98 and fit["max_rel_residual"] <= 0.10,
            f"R^2 = {fit['r2']:.4f}, slope = {fit['slope']:.2f} s/peer, max residual {fit['max_rel_residual']:.1%}",
        ),
        claim(
            "every peer completes the round",
            all(rows[n]["complete_fraction"] >= 1.0 for n in ns),
            ", ".join(f"n={n}: {rows[n]['complete_fraction']:.1%}" for n in ns),
        ),
    ]
    if cpu == cpu:
        claims.append(
            claim(
                "the whole study fits in 15 min on 2 cores (per-point CPU time, largest first on 2 workers)",
                cpu <= 900,
                f"{cpu / 60:.1f} min",
            )
        )
    return {"by_n": rows, "round_fit": fit, "two_core_estimate_s": cpu, "claims": claims}


def derive_ablation(recs: list[Record]) -> dict[str, Any]:
    by = by_tag(recs, "privacy")
    rows = {
        p: {k: mean(rs, k) for k in ("round_s", "warmup_s", "bt_s", "utilization")}
        | {"round_std": mean_std(rs, "round_s")[1], "seeds": len(rs)}
        for p, rs in by.items()
    }
    base = rows.get("none", {}).get("round_s", float("nan"))
    for r in rows.values():
        r["overhead"] = r["round_s"] / base - 1.0 if base == base and base > 0 else float("nan")
    full = rows.get("full", {}).get("overhead", float("nan"))
    claims = [
        claim(
            f"full-privacy round within 10% of BitTorrent-only (paper {paper.ABLATION_FULL_OVERHEAD:+.1%})",
            abs(full) <= 0.10,
            f"{full:+.1%}",
        )
    ]
    return {"by_privacy": rows, "claims": claims}


def derive_cover(recs: list[Record]) -> dict[str, Any]:
    by = {float(k): v for k, v in by_tag(recs, "cover").items()}
    ks = sorted(by)
    rows = {k: {m: mean(by[k], m) for m in ("warmup_s", "round_s", "warmup_share", "cover_k")} for k in ks}
    w = [rows[k]["warmup_s"] for k in ks]
    claims = [
        claim(
            "warm-up duration increases with K",
            all(b >= a for a, b in zip(w, w[1:])),
            ", ".join(f"K={k:.0%}: {rows[k]['warmup_s']:.0f}s" for k in ks),
        )
    ]
    return {"by_cover": {f"{k:g}": v for k, v in rows.items()}, "claims": claims}


def derive_schedulers(recs: list[Record]) -> dict[str, Any]:
    by = by_tag(recs, "scheduler")
    rows = {
        s: {
            k: mean(rs, k)
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
        claim(
            f"GFF moves >= 0.90 of the stage max-flow bound over its warm-up (paper about {paper.GFF_OF_MAXFLOW:.2f})",
            ratio >= 0.90,
            f"{ratio:.3f}",
        ),
        claim(
            "GFF finishes warm-up first among the heuristics",
            gff["warmup_stages"] <= first,
            ", ".join(f"{s}: {v:.0f}" for s, v in sorted(heur.items(), key=lambda kv: kv[1])),
        ),
    ]
    return out


def _llm_paper_overheads() -> str:
    """The paper's range of LLM full-privacy overheads, as printed in its text (e.g. '6.6-10.0%')."""
    ov = [v[2] for v in paper.LLM.values()]
    return f"{100 * min(ov):.1f}-{100 * max(ov):.1f}%"


def derive_llm(recs: list[Record]) -> dict[str, Any]:
    rows: dict[str, dict[str, float]] = {}
    for rs in groups(recs).values():
        t = rs[0].tags
        rows.setdefault(t["model"], {})[t["mode"]] = mean(rs, "round_s")
        rows[t["model"]]["chunks_per_update"] = mean(rs, "chunks_per_update")
        if t["mode"] == "full":
            rows[t["model"]]["warmup_s"] = mean(rs, "warmup_s")
    for r in rows.values():
        if "none" in r and "full" in r:
            r["overhead"] = r["full"] / r["none"] - 1.0
    ov = [r.get("overhead", float("nan")) for r in rows.values()]
    claims = [
        claim(
            f"full-privacy overhead over BitTorrent-only <= 10% for every model (paper {_llm_paper_overheads()})",
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
        row = {k: mean(rs, k) for k in keys} | {k: v for k, v in t.items() if k != "group"}
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
            claim(
                f"n = {r['n']} completes within 30 min and 8 GB on this machine",
                r["complete_fraction"] >= 1.0 and r["wall_s"] <= 1800 and r["peak_rss_bytes"] <= 8e9,
                f"wall {r['wall_s']:.0f}s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, "
                f"complete {r['complete_fraction']:.1%}",
            )
        )
    if parts["churn"]:
        claims.append(
            claim(
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
            claim(
                "expander overlays meet the Ramanujan bound 2*sqrt(d-1)",
                all(r["overlay_lambda2"] <= r["ramanujan_bound"] + 1e-9 for r in exp),
                ", ".join(f"n={r['n']}: lambda2 {r['overlay_lambda2']:.2f} <= {r['ramanujan_bound']:.2f}" for r in exp),
            )
        )
    return {**parts, "claims": claims}
