"""Sequence attack (PAPER.md §4.6): the first admissible chunk received from a sender names its update."""

from __future__ import annotations

import numpy as np

from ..observations import Views
from .base import Attribution, admissible, finish


def sequence_attack(views: Views) -> Attribution:
    """Label the first admissible chunk from each sender as the sender's own."""
    guess = np.full(views.n_pairs, -1, dtype=np.int64)
    ok = np.flatnonzero(admissible(views))
    if ok.size:
        pairs, first = np.unique(views.pair[ok], return_index=True)  # rows are in arrival order per pair
        guess[pairs] = views.desc[ok[first]]
    return finish(views, "sequence", guess)
