"""Count attack (PAPER.md §4.6): the admissible descriptor a sender delivered most often in its first `horizon`
transfers (all of the window by default); ties go to the one that arrived first."""

from __future__ import annotations

import numpy as np

from ..observations import Views
from .base import Attribution, admissible, finish, pair_desc_stats


def count_attack(views: Views, horizon: int | None = None) -> Attribution:
    """Attribute each sender to its most frequent admissible descriptor among its early transfers."""
    guess = np.full(views.n_pairs, -1, dtype=np.int64)
    rows = np.arange(views.view.size)
    if horizon is not None:
        rows = rows[(rows - views.pair_start[views.pair]) < horizon]
    rows = rows[admissible(views)[rows]]
    if rows.size:
        pair, desc, counts, rank = pair_desc_stats(views, rows)  # grouped by pair
        # per pair: most frequent, then earliest (ranks are distinct within a pair, so the best is unique)
        span = int(rank.max()) + 1
        score = counts.astype(np.int64) * span + (span - 1 - rank)
        starts = np.flatnonzero(np.concatenate([[True], pair[1:] != pair[:-1]]))
        best = np.maximum.reduceat(score, starts)
        win = score == np.repeat(best, np.diff(np.append(starts, pair.size)))
        guess[pair[win]] = desc[win]
    return finish(views, "count", guess)
