"""Spray recipient: a spray arrival (phase 0) names its sender as the owner of the sprayed update.

Under the paper's protocol a spray is a direct tunnel from the owner to a non-neighbour, so the recipient
learns the owner of every update sprayed to it.  It is scored in the project's framing, per sender target:
the targets are the peers o received spray hops from, the guess is the update they sprayed (success 100%
by construction under "paper"; a spray through a mixing hop makes it a relay's pseudonym instead).  Sprays
go to non-neighbours, so for U (owner among neighbours) it has no evidence and scores chance.
"""

from __future__ import annotations

import numpy as np

from ..evidence import RoundEvidence
from .scoring import TripleScorer


def spray_recipient_scores(ev: RoundEvidence) -> TripleScorer:
    """Score = spray arrivals of chunks of d that o received from w."""
    uniq, counts = np.unique(ev.spray_key, return_counts=True)

    def score(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        return ev.lookup(uniq, counts, ev.key(o, w, d), 0.0)

    return score
