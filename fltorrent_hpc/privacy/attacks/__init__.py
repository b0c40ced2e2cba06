"""Attribution attacks, vectorised over all observers at once.  `ATTACKS` is the registry.

Two families, both scored by `run_round_attacks` in U ("owner among neighbours") and in the project's
per-sender-target framing (`scoring`):

- on `Views` (per-target guesses from the chunks a view received; the paper's three, PAPER.md §4.6):
  sequence (first admissible chunk from the sender), count (its most frequent admissible update), cluster
  (one-to-one matching of senders to updates on frequency, specificity, earliness);
- on `RoundEvidence` (everything a peer observes over the window, `evidence`), one score per
  (observer, peer, update): first_sender (from round start) and first_sender_bt (from the BitTorrent
  phase), window_count (best window of `width` stages), exclusion (protocol-aware elimination), bayes
  (its Bayesian form), timing, bitfield, spray_recipient (scored on spray senders).

A new attack is one new module in this package plus one entry in the table below.  Beside them:
`elimination_attack` (the warm-up gating reference, an expected success over the anonymity set) and
`any_member_success` (coalitions whose members attack alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ...trace import Trace
from ..evidence import RoundEvidence, build_evidence
from ..observations import AdversaryModel, Views, build_views
from .base import Attribution
from .bayes import bayes_scores
from .bitfield import bitfield_scores
from .cluster import cluster_attack
from .coalition import any_member_success
from .count import count_attack
from .elimination import Elimination, elimination_attack
from .exclusion import exclusion_scores
from .first_sender import first_sender_scores
from .scoring import (
    RoundScore,
    guess_scorer,
    overlay_targets,
    random_guess_max,
    score_targets,
    score_u,
    spray_targets,
)
from .sequence import sequence_attack
from .spray_recipient import spray_recipient_scores
from .timing import timing_scores
from .window_count import window_count_scores


@dataclass(frozen=True)
class Attack:
    """One registered attack.  family "views": fn(views, **options) -> Attribution (per-target guesses);
    family "round": fn(evidence, **options) -> TripleScorer.  `targets`: which senders the per-target
    framing scores ("overlay": those o received overlay transfers from; "spray": those that sprayed to o)."""

    name: str
    family: str
    fn: Callable[..., Any]
    summary: str
    targets: str = "overlay"
    options: dict[str, Any] = field(default_factory=dict)


_TABLE = [
    Attack("sequence", "views", sequence_attack, "first admissible chunk from the sender names its update"),
    Attack("count", "views", count_attack, "the sender's most frequent admissible update"),
    Attack("cluster", "views", cluster_attack, "one-to-one matching on frequency, specificity, earliness"),
    Attack("first_sender", "round", first_sender_scores, "first neighbour to deliver a chunk of d (round)"),
    Attack(
        "first_sender_bt",
        "round",
        partial(first_sender_scores, start="bt"),
        "first neighbour to deliver a chunk of d in the BitTorrent phase",
    ),
    Attack("window_count", "round", window_count_scores, "most chunks of d within any 20 stages"),
    Attack("exclusion", "round", exclusion_scores, "protocol-aware elimination (asks, bitfields, gating)"),
    Attack("bayes", "round", bayes_scores, "posterior from elimination evidence, Poisson rates by EM"),
    Attack("timing", "round", timing_scores, "showed d's chunks earliest relative to the other neighbours"),
    Attack("bitfield", "round", bitfield_scores, "most chunks of d in the BitTorrent-start bitfield"),
    Attack("spray_recipient", "round", spray_recipient_scores, "a spray's sender owns the sprayed update", "spray"),
]
ATTACKS: dict[str, Attack] = {a.name: a for a in _TABLE}
PAPER_ATTACKS: tuple[str, ...] = ("sequence", "count", "cluster")  # the paper's (Figs. 6-7 reproduce these)


def run_attacks(views: Views, count_horizon: int | None = None) -> dict[str, Attribution]:
    """Every registered `Views` attack (the paper's) on the same views (`count_horizon`: count's early window)."""
    options: dict[str, dict[str, object]] = {"count": {"horizon": count_horizon}}
    return {name: a.fn(views, **options.get(name, {})) for name, a in ATTACKS.items() if a.family == "views"}


def run_round_attacks(
    trace: Trace,
    model: AdversaryModel | None = None,
    names: list[str] | tuple[str, ...] | None = None,
    count_horizon: int | None = None,
    evidence: RoundEvidence | None = None,
    views: Views | None = None,
    attributions: dict[str, Attribution] | None = None,
) -> dict[str, RoundScore]:
    """U and per-target success of every registered attack (or `names`), each peer observing alone.

    `views`/`attributions` (single-peer views for observers 0..n-1 and their `run_attacks` results) and
    `evidence` are reused when given, so a caller that already built them pays nothing twice.
    """
    model = model or AdversaryModel()
    ev = evidence if evidence is not None else build_evidence(trace, model)
    names = list(ATTACKS) if names is None else list(names)
    out: dict[str, RoundScore] = {}
    for name in names:
        a = ATTACKS[name]
        if a.family == "views":
            if views is None:
                views = build_views(trace, None, model)
            if attributions is None:
                attributions = run_attacks(views, count_horizon)
            att = attributions[name]
            u, flat = score_u(ev, guess_scorer(ev.n, att.view, att.target, att.guess))
            per = att.asr_per_view()
            out[name] = RoundScore(name, u, flat, per, int(att.target.size))
            continue
        scorer = a.fn(ev, **a.options)
        u, flat = score_u(ev, scorer)
        targets = spray_targets(ev) if a.targets == "spray" else overlay_targets(ev)
        per, count = score_targets(ev, scorer, targets)
        out[name] = RoundScore(name, u, flat, per, count)
    return out


__all__ = [
    "ATTACKS",
    "PAPER_ATTACKS",
    "Attack",
    "Attribution",
    "Elimination",
    "RoundScore",
    "any_member_success",
    "cluster_attack",
    "count_attack",
    "elimination_attack",
    "random_guess_max",
    "run_attacks",
    "run_round_attacks",
    "sequence_attack",
]
