"""`fltorrent attack TRACE.h5 [--window round|warmup|N] [--attackers a] [--json FILE]`: attacks, bounds and audit
on one round trace.

Every attack sees the whole round by default (an honest-but-curious peer does not stop watching when the warm-up
ends); `--window warmup` is the paper's scope.  The same command reads a simulated round and a merged real MPI
round (one HDF5 schema, docs/TRACE.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..trace import Trace, config_of, read_trace
from .attacks import (
    ATTACKS,
    PAPER_ATTACKS,
    any_member_success,
    elimination_attack,
    random_guess_max,
    run_attacks,
    run_round_attacks,
)
from .attacks.scoring import overlay_targets
from .audit import audit_trace
from .bounds import check_eq1, eval_eq2
from .evidence import build_evidence
from .observations import AdversaryModel, build_views, degrees, protocol_of, random_coalitions


def _nanstat(x: np.ndarray, fn) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(fn(x)) if x.size else float("nan")


def _asr_block(trace: Trace, observers: list[np.ndarray] | None, model: AdversaryModel, horizon: int | None):
    views = build_views(trace, observers, model)
    atts = run_attacks(views, count_horizon=horizon)
    per = {name: att.asr_per_view() for name, att in atts.items()}
    return views, atts, per


def _pooled(views, atts) -> dict[str, float]:
    """Fraction of all guesses (over every view) that are correct: the smooth companion of max/mean ASR."""
    return {name: float(att.correct.mean()) if att.correct.size else float("nan") for name, att in atts.items()}


def _elimination(views) -> dict[str, float]:
    el = elimination_attack(views)
    per = el.asr_per_view()
    return {
        "asr_max": _nanstat(per, np.max),
        "asr_mean": _nanstat(per, np.mean),
        "asr_pooled": float(el.success.mean()) if el.success.size else float("nan"),
        "candidates_min": int(el.candidates.min()) if el.candidates.size else 0,
        "candidates_mean": float(el.candidates.mean()) if el.candidates.size else float("nan"),
        "truth_ruled_out": float(((el.success == 0) & (el.candidates > 0)).mean()) if el.success.size else 0.0,
    }


def _round_block(trace: Trace, model: AdversaryModel, views, atts, horizon: int | None) -> dict[str, Any]:
    """U and per-target success of every registered attack, each peer observing alone, with their baselines."""
    ev = build_evidence(trace, model)
    scores = run_round_attacks(trace, model, count_horizon=horizon, evidence=ev, views=views, attributions=atts)
    has = ev.deg > 0
    inv = np.divide(1.0, ev.deg, out=np.full(ev.n, np.nan), where=has)
    targets = np.bincount(overlay_targets(ev)[0], minlength=ev.n)  # targets per observer
    cand = ev.n - ev.excluded.sum(axis=1)  # updates a target's own could be, in o's eyes
    p_target = np.divide(1.0, cand, out=np.full(ev.n, np.nan), where=cand > 0)
    seen = targets > 0
    return {
        "u": {
            name: {"mean": _nanstat(r.u, np.mean), "max": _nanstat(r.u, np.max), "abstain": r.u_abstain}
            for name, r in scores.items()
        },
        "target": {
            name: {"mean": _nanstat(r.target, np.mean), "max": _nanstat(r.target, np.max), "targets": r.targets}
            for name, r in scores.items()
        },
        "u_baseline_mean": _nanstat(inv[has], np.mean),
        "u_baseline_max": _nanstat(inv[has], np.max),
        "u_random_max": random_guess_max(inv, ev.deg),
        "target_baseline_mean": _nanstat(p_target[seen], np.mean),
        "target_random_max": random_guess_max(p_target, targets),
        "protocol": ev.protocol,
        "bt_start": ev.bt,
    }


def evaluate_trace(
    trace: Trace,
    attackers: int = 1,
    coalitions: int = 20,
    seed: int = 0,
    window: str | int = "round",
    count_horizon: int | None = None,
    epsilon: float = 0.0,
    q: float = 1.0,
    audit: bool = True,
) -> dict[str, Any]:
    """Everything `fltorrent attack` reports, as a JSON-ready dict (NaN where a quantity is undefined).

    `window`: "round" (default: everything a peer observes in the round), "warmup" (the paper's scope) or a
    stage count.  `u` / `target`: every registered attack, each peer observing alone, scored as U (owner among
    neighbours, baseline 1/deg) and per sender target (the project's framing), mean and max over observers.
    asr_* are the paper's three attacks in the per-target framing, for the views below.
    attackers = 1: every peer attacks alone, ASR per receiver.  attackers = a > 1: `coalitions` random
    coalitions of a peers pool their observations; asr_max/asr_mean are over coalitions, and the paper's
    Fig. 7(d) readings (any member succeeds; mean of members attacking alone) are given beside them.
    `elimination` is the warm-up gating reference ("served it, so not its own"), a rule that holds only
    inside the warm-up: with window "round" it is evaluated on the warm-up window.
    """
    n = trace.n_peers
    cfg = config_of(trace)
    model = AdversaryModel(window=window, spray=True)
    paper_model = AdversaryModel(window=window, spray=False)
    single_views, single_atts, single = _asr_block(trace, None, model, count_horizon)
    deg = degrees(trace)
    out: dict[str, Any] = {
        "trace": {
            "source": trace.attrs.get("source", "?"),
            "n_peers": n,
            "chunks_per_peer": trace.chunks_per_peer,
            "privacy": cfg.get("privacy", "?"),
            "degree": cfg.get("degree"),
            "spray_ratio": cfg.get("spray_ratio"),
            "lag_slots": cfg.get("lag_slots"),
            "cover_k": int(trace.attrs.get("cover_k", 0)),
            "kappa": int(trace.attrs.get("kappa", cfg.get("kappa", 1))),
            "seed": int(trace.attrs.get("seed", 0)),
            "min_degree": int(deg.min()) if deg.size else 0,
            "mean_degree": float(deg.mean()) if deg.size else 0.0,
            "protocol": protocol_of(trace),
            "window": single_views.window.how,
            "window_end_stage": single_views.window.end_stage,
            "warmup_failed_open": bool(trace.attrs.get("warmup_failed_open", False)),
        },
        "attackers": int(attackers),
    }
    out |= _round_block(trace, model, single_views, single_atts, count_horizon)
    groups = None if attackers <= 1 else random_coalitions(n, attackers, coalitions, seed)
    if groups is None:
        views, atts, per = single_views, single_atts, single
        paper_views, _, per_paper = _asr_block(trace, None, paper_model, count_horizon)
    else:
        views, atts, per = _asr_block(trace, groups, model, count_horizon)
        paper_views, _, per_paper = _asr_block(trace, groups, paper_model, count_horizon)
        anyc = any_member_success(n, single_atts, groups)
        members = {name: np.array([np.nanmean(single[name][g]) for g in groups]) for name in PAPER_ATTACKS}
        out["coalition"] = {
            "count": len(groups),
            "any_member_mean": {a: _nanstat(anyc[a], np.mean) for a in PAPER_ATTACKS},
            "any_member_max": {a: _nanstat(anyc[a], np.max) for a in PAPER_ATTACKS},
            "per_member_mean": {a: _nanstat(members[a], np.mean) for a in PAPER_ATTACKS},
            "per_receiver_asr_max": {a: _nanstat(single[a], np.max) for a in PAPER_ATTACKS},
        }
    out["asr_max"] = {a: _nanstat(per[a], np.max) for a in PAPER_ATTACKS}
    out["asr_mean"] = {a: _nanstat(per[a], np.mean) for a in PAPER_ATTACKS}
    out["asr_pooled"] = _pooled(views, atts)
    if single_views.window.how == "round":  # the gating rule holds only inside the warm-up: judge it there
        warm = AdversaryModel(window="warmup", spray=True)
        views_el = build_views(trace, groups, warm)
        paper_el = build_views(trace, groups, AdversaryModel(window="warmup", spray=False))
    else:
        views_el, paper_el = views, paper_views
    out["elimination"] = _elimination(views_el) | {"window": views_el.window.how}
    out["elimination_overlay_only"] = _elimination(paper_el) | {"window": paper_el.window.how}
    out["asr_max_overlay_only"] = {a: _nanstat(per_paper[a], np.max) for a in PAPER_ATTACKS}
    out["asr_mean_overlay_only"] = {a: _nanstat(per_paper[a], np.mean) for a in PAPER_ATTACKS}
    seen = views.targets_per_view() > 0
    out["baseline"] = _nanstat(views.baseline[seen], np.max)
    out["baseline_mean"] = _nanstat(views.baseline[seen], np.mean)
    out["targets_mean"] = float(views.targets_per_view()[seen].mean()) if seen.any() else 0.0
    out["spray_revealed_mean"] = float(views.spray_revealed.mean() / max(n - 1, 1))

    e1 = check_eq1(trace)
    out |= {
        "eq1_max": e1.max_ratio,
        "eq1_cap": e1.cap,
        "eq1_violations": e1.violations,
        "eq1_throttle_violations": e1.throttle_violations,
        "eq1_checked": e1.checked,
        "eq1_unchecked": e1.unchecked,
        "eq1_gating": e1.gating,
        "gate_releases": e1.gate_releases,
        "eq1_gate_exception_transfers": e1.gate_exception_transfers,
        "owner_sent": e1.owner_sent,
        "owner_sent_expected": e1.expected_owner_sent,
        "open_gate_transfers": e1.open_transfers,
        "open_gate_owner_sent": e1.open_owner_sent,
        "open_gate_owner_expected": e1.open_expected,
    }
    e2 = eval_eq2(trace, epsilon=epsilon, q=q)
    out |= {
        "eq2_bound": e2.max_bound,
        "eq2_bound_mean": float(e2.bound.mean()) if e2.bound.size else float("nan"),
        "eq2_bound_expected_max": float(e2.bound_expected.max()) if e2.bound.size else float("nan"),
        "eq2_bound_paper": e2.bound_paper,
        "eq2_realized_max": _nanstat(e2.realized, np.max),
        "eq2_violations": e2.violations,
        "eq2_violating_senders": e2.violating_senders,
        "eq2_epsilon": epsilon,
        "eq2_q": q,
        "spray_received_mean": float(e2.spray_received.mean()) if n else 0.0,
    }
    if audit:
        try:
            rep = audit_trace(trace)
            out["audit"] = {"ok": rep.ok, "fail_open": rep.fail_open, "failures": rep.failures}
        except Exception as exc:  # the audit needs the swarm core; a trace from elsewhere still gets attacked
            out["audit"] = {"ok": None, "error": f"{type(exc).__name__}: {exc}"}
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _pct(x: float | None) -> str:
    return "   n/a" if x is None or not math.isfinite(x) else f"{100 * x:6.2f}"


def format_table(res: dict[str, Any]) -> str:
    """Human-readable summary of `evaluate_trace` (percentages)."""
    t = res["trace"]
    a = res["attackers"]
    lines = [
        f"trace: {t['source']} n={t['n_peers']} K={t['chunks_per_peer']} privacy={t['privacy']} "
        f"m={t['degree']} (min {t['min_degree']}, mean {t['mean_degree']:.1f}) R={t['spray_ratio']} "
        f"T_lag={t['lag_slots']} k={t['cover_k']} kappa={t['kappa']}",
        f"window: {t['window']} (stages < {t['window_end_stage']})"
        + ("  WARM-UP FAILED OPEN" if t["warmup_failed_open"] else ""),
        "",
        f"every attack, each peer observing alone; protocol {res['protocol']}, BitTorrent phase from stage "
        f"{'(not in window)' if res['bt_start'] is None else res['bt_start']}",
        f"  U (owner among neighbours): random guess 1/deg = {_pct(res['u_baseline_mean']).strip()}% mean, "
        f"{_pct(res['u_baseline_max']).strip()}% at the min degree; a random guesser's max over observers "
        f"{_pct(res['u_random_max']).strip()}%",
        f"  target (per sender, the project's framing): random guess over candidate updates "
        f"{_pct(res['target_baseline_mean']).strip()}% mean, its max over observers "
        f"{_pct(res['target_random_max']).strip()}%",
        f"  {'attack':16s} {'U mean%':>8s} {'U max%':>7s} {'no-info%':>9s}   {'target mean%':>12s} "
        f"{'target max%':>11s} {'targets':>8s}",
    ]
    for name in ATTACKS:
        u, tg = res["u"][name], res["target"][name]
        lines.append(
            f"  {name:16s} {_pct(u['mean']):>8s} {_pct(u['max']):>7s} {_pct(u['abstain']):>9s}   "
            f"{_pct(tg['mean']):>12s} {_pct(tg['max']):>11s} {tg['targets']:>8d}"
        )
    lines += [
        "",
        f"paper's attacks, per sender target (ASR); views: {'each receiver alone' if a <= 1 else f'coalitions of {a}'}"
        f"; targets/view {res['targets_mean']:.1f}; spray reveals {100 * res['spray_revealed_mean']:.1f}% "
        "of owners to each view",
        f"{'attack':10s} {'max ASR%':>9s} {'mean ASR%':>10s} {'pooled%':>8s} {'max%(overlay-only)':>19s} "
        f"{'baseline%':>10s}",
    ]
    for name in PAPER_ATTACKS:
        lines.append(
            f"{name:10s} {_pct(res['asr_max'][name]):>9s} {_pct(res['asr_mean'][name]):>10s} "
            f"{_pct(res['asr_pooled'][name]):>8s} {_pct(res['asr_max_overlay_only'][name]):>19s} "
            f"{_pct(res['baseline']):>10s}"
        )
    el = res["elimination"]
    lines.append(
        f"{'eliminate':10s} {_pct(el['asr_max']):>9s} {_pct(el['asr_mean']):>10s} {_pct(el['asr_pooled']):>8s}   "
        f"(gating reference, {el['window']} window: anonymity set min {el['candidates_min']}, mean "
        f"{el['candidates_mean']:.1f}; truth ruled out for {100 * el['truth_ruled_out']:.1f}% of targets)"
    )
    if "coalition" in res:
        c = res["coalition"]
        lines.append("")
        lines.append(f"{'coalition':10s} {'any member%':>12s} {'per member%':>12s}   ({c['count']} coalitions)")
        for name in PAPER_ATTACKS:
            lines.append(f"{name:10s} {_pct(c['any_member_mean'][name]):>12s} {_pct(c['per_member_mean'][name]):>12s}")
    lines += [
        "",
        f"Eq.1  cap kappa/k = {res['eq1_cap']:.3g}; max O/B = {res['eq1_max']:.3g} over {res['eq1_checked']} "
        f"warm-up transfers ({res['eq1_unchecked']} unrecorded); violations {res['eq1_violations']} "
        f"(throttle {res['eq1_throttle_violations']}){'' if res['eq1_gating'] else '  [gating off: cap not claimed]'}",
        f"      gated-start releases {res['gate_releases']} (Eq.1 exceptions, "
        f"{res['eq1_gate_exception_transfers']} transfers while below k); owner-sent {res['owner_sent']} "
        f"vs {res['owner_sent_expected']:.1f} expected from O/B (senders with O>0: {res['open_gate_owner_sent']} of "
        f"{res['open_gate_transfers']} vs {res['open_gate_owner_expected']:.1f})",
        f"Eq.2  max bound (actual spray/lags/degree) = {res['eq2_bound']:.3g}; "
        f"expected form {res['eq2_bound_expected_max']:.3g}; paper closed form {res['eq2_bound_paper']:.3g}; "
        f"violations {res['eq2_violations']} ({res['eq2_violating_senders']} senders; eps={res['eq2_epsilon']}, "
        f"q={res['eq2_q']}){'' if res['eq1_gating'] else '  [no throttle: bound not claimed]'}",
    ]
    if "audit" in res:
        au = res["audit"]
        if au.get("ok") is None:
            lines.append(f"audit: not run ({au.get('error')})")
        else:
            lines.append("audit: ok" if au["ok"] else f"audit: FAILED -> round fails open {au['failures']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fltorrent attack", description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path, help="HDF5 round trace (simulator or merged MPI)")
    p.add_argument("--attackers", "-a", type=int, default=1, help="coalition size a (1 = each receiver alone)")
    p.add_argument("--coalitions", type=int, default=20, help="random coalitions drawn when a > 1")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing coalitions")
    p.add_argument(
        "--window",
        default="round",
        help="'round' (default: everything a peer observes in the round), 'warmup' (the paper's scope) or a "
        "number of stages from the round's start",
    )
    p.add_argument("--count-horizon", type=int, default=None, help="Count attack: first H transfers per sender")
    p.add_argument("--epsilon", type=float, default=0.0, help="Eq. 2 epsilon")
    p.add_argument("--q", type=float, default=1.0, help="Eq. 2 availability factor q")
    p.add_argument("--no-audit", action="store_true", help="skip the commit/reveal audit of the trace")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    return p


def attack_main(argv: list[str] | None = None) -> int:
    """Entry point of `fltorrent attack`; returns 0, or 2 on bad input."""
    args = _parser().parse_args(argv)
    try:
        trace = read_trace(args.trace)
        window: str | int = int(args.window) if str(args.window).isdigit() else args.window
        res = evaluate_trace(
            trace,
            attackers=args.attackers,
            coalitions=args.coalitions,
            seed=args.seed,
            window=window,
            count_horizon=args.count_horizon,
            epsilon=args.epsilon,
            q=args.q,
            audit=not args.no_audit,
        )
    except (OSError, ValueError, KeyError) as exc:
        print(f"fltorrent attack: {exc}", file=sys.stderr)
        return 2
    print(format_table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json_safe(res), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(attack_main())
