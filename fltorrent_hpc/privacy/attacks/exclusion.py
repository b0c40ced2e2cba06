"""Elimination over the whole round: rule out every neighbour whose behaviour contradicts owning d.

Rules, keyed on the trace's protocol (the adversary knows the protocol, not who owns what):

- protocol "paper" (an owner holds and announces its whole update from the start, never fetches it):
  w is not d's owner if w asked o for a chunk of d (o sent w a chunk of d: in the BitTorrent phase w
  requested it, in the warm-up the tracker directed it because w lacked it); or w's have-bitfield at the
  start of the BitTorrent phase lacked a chunk of d that o or another neighbour of o held then; or, with
  cover-set gating, w served o a chunk of d during the warm-up (gated owners serve none of their own).
- protocol "hidden" (an owner behaves like a non-owner: it announces only what it received and fetches its
  own update like anyone): none of the above contradicts ownership, so nothing is ruled out by them.
- both: w served o a chunk of d that was not in w's public state at the time (BitTorrent phase, where o
  sees w's holdings).  Only an owner can hold a chunk it never received, so w is d's owner.

The guess is uniform over the neighbours left (expected success 1/|left| when the truth is left, 0 when
the rules ruled it out, e.g. after a gated-start release let an owner serve its own chunk in the warm-up).
"""

from __future__ import annotations

import numpy as np

from ...trace import PHASE_WARMUP
from ..evidence import RoundEvidence
from .scoring import TripleScorer


def warmup_serves(ev: RoundEvidence) -> tuple[np.ndarray, np.ndarray]:
    """Unique serve keys and the number of warm-up (phase 1) deliveries w -> o of update d."""
    rows = np.flatnonzero(ev.serve_phase == PHASE_WARMUP)
    return ev.row_sums(rows)


def exposures(ev: RoundEvidence) -> tuple[np.ndarray, np.ndarray]:
    """Unique serve keys and the number of chunks of d that w delivered to o, inside the BitTorrent phase,
    while they were not in w's public holdings (only an owner holds chunks it never received)."""
    if ev.bt is None:
        rows = np.zeros(0, np.int64)
    else:
        rows = np.flatnonzero((ev.serve_stage >= ev.bt) & (ev.serve_pubvis > ev.serve_stage))
    return ev.row_sums(rows)


def exclusion_scores(ev: RoundEvidence) -> TripleScorer:
    """Score -inf for a neighbour the rules rule out, 1 for one exposed as the owner, 0 otherwise."""
    wk, wn = warmup_serves(ev)
    xk, xn = exposures(ev)
    paper = ev.protocol == "paper"

    def score(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        keys = ev.key(o, w, d)
        s = np.zeros(keys.shape)
        if paper:
            out = (ev.ask_count(o, w, d) > 0) | (ev.miss(o, w, d) > 0)
            if ev.gating:
                out |= ev.lookup(wk, wn, keys, 0.0) > 0
            s[out] = -np.inf
        s[ev.lookup(xk, xn, keys, 0.0) > 0] = 1.0
        return s

    return score
