"""Bitfield: the neighbour whose public holdings of d are the largest at the start of the BitTorrent phase
names d's owner; among equals, the one whose announced holdings of d were complete earliest.

Under the paper's protocol an owner's have-bitfield carries its whole update while a relay holds the few
chunks of d it fetched during the warm-up, so the bitfields alone name every neighbour's update.  Under
protocol "hidden" an owner's public state starts empty like anyone's.  Without a BitTorrent phase in the
window (warm-up-only traces) no bitfield is seen and every neighbour ties (chance).
"""

from __future__ import annotations

import numpy as np

from ..evidence import RoundEvidence
from .scoring import TripleScorer


def bitfield_scores(ev: RoundEvidence) -> TripleScorer:
    """Score = chunks of d in w's bitfield at BT start, then (as a tie-break) how early w announced all of d."""
    scale = float(ev.end + 1)

    def score(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        return ev.held0[w, d] * scale + (ev.end - ev.complete[w, d])

    return score
