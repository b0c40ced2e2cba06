"""Bitfield: the neighbour whose have-bitfield at the start of the BitTorrent phase holds the most chunks of
update d names d's owner.

Under the paper's protocol an owner's first bitfield carries its whole update while a relay holds the few
chunks of d it fetched during the warm-up, so the bitfields alone name every neighbour's update.  Under
protocol "hidden" an owner's public state starts without its own chunks like anyone's.  Only the bitfield is
used (how early holdings were announced later is `timing`'s evidence).  Without a BitTorrent phase in the
window (warm-up-only traces) no bitfield is seen and every neighbour ties (chance).
"""

from __future__ import annotations

import numpy as np

from ..evidence import RoundEvidence
from .scoring import TripleScorer


def bitfield_scores(ev: RoundEvidence) -> TripleScorer:
    """Score = chunks of d in w's bitfield at the first BitTorrent stage."""

    def score(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        return ev.held0[w, d].astype(np.float64)

    return score
