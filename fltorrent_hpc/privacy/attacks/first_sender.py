"""First sender: the first neighbour to deliver any chunk of update d to observer o names d's owner.

Without defences an owner is the only holder of its update when the round starts, so the first chunk of d
to reach o comes from d's owner.  "Over any window": only deliveries from stage `start` on count, so the
attack can skip a phase it knows is protected (`start="bt"`: from the first BitTorrent stage, where the
paper's protocol lifts gating and rarest-first sends requests for an owner's chunks straight to the owner).
"""

from __future__ import annotations

import numpy as np

from ..evidence import RoundEvidence
from .scoring import TripleScorer


def first_sender_scores(ev: RoundEvidence, start: int | str = 0) -> TripleScorer:
    """Score = minus the arrival rank of the first chunk of d that w delivered to o at a stage >= `start`
    (a neighbour that delivered none scores below every one that did)."""
    if start == "bt":
        s0 = ev.bt if ev.bt is not None else ev.end  # no BitTorrent phase in the window: no evidence
    else:
        s0 = int(start)
    rows = np.flatnonzero(ev.serve_stage >= s0)
    keys = ev.serve_key[rows]  # sorted by (key, arrival): the first row of a key is its earliest
    uniq, first = np.unique(keys, return_index=True)
    neg_rank = -ev.serve_rank[rows][first].astype(np.float64)
    floor = -float(ev.serve_rank.max(initial=0) + 1)

    def score(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        return ev.lookup(uniq, neg_rank, ev.key(o, w, d), floor)

    return score
