"""Per-window counting: the neighbour that delivered the most chunks of d to o within some window of
`width` consecutive stages names d's owner.

Counting over a whole round dilutes a burst: under the paper's protocol an owner is, for the first stages of
the BitTorrent phase, the only holder of most of its chunks, so it sends o many chunks of its own update in a
short span, while relays send d spread over the round.  The score of (o, w, d) is the best window's count:
the largest number of chunks of d that w delivered to o in any `width` consecutive stages (sliding windows,
so no window boundary can split the burst).
"""

from __future__ import annotations

import numpy as np

from ..evidence import RoundEvidence
from .scoring import TripleScorer


def best_window_counts(ev: RoundEvidence, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique serve keys and, per key, the most deliveries inside any `width` consecutive stages."""
    if not ev.serve_key.size:
        return np.zeros(0, np.int64), np.zeros(0)
    span = int(ev.serve_stage.max()) + int(width) + 1
    comb = np.sort(ev.serve_key * span + ev.serve_stage)
    inside = np.searchsorted(comb, comb + int(width), side="left") - np.arange(comb.size)
    keys = comb // span
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.maximum.reduceat(inside, starts).astype(np.float64)


def window_count_scores(ev: RoundEvidence, width: int = 20) -> TripleScorer:
    """Score = most chunks of d that w delivered to o within `width` consecutive stages (0 if none)."""
    if width < 1:
        raise ValueError(f"window width must be >= 1 stage, got {width}")
    uniq, best = best_window_counts(ev, width)

    def score(o: np.ndarray, w: np.ndarray, d: np.ndarray) -> np.ndarray:
        return ev.lookup(uniq, best, ev.key(o, w, d), 0.0)

    return score
